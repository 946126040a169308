"""DiffSeg end to end: images in, segment labels out.

As the official implementation (Stable Diffusion 1.4, keras-cv): centre-crop to a square, resize to
`resolution` (bilinear, half-pixel centres, no antialiasing), scale to [-1, 1]
(`diffseg.preprocess`); the latent is the VAE posterior **mean** times the VAE scaling factor; one
UNet pass at timestep 300 conditioned on the empty prompt `""` padded to 77 tokens; the
self-attention probabilities of every transformer block, averaged over heads and over the blocks of
each resolution (`diffseg.attention`), are aggregated (`diffseg.aggregate`) and merged
(`diffseg.merge`): `diffseg.segmenter`.

`DiffSegPipeline` is a diffusers `DiffusionPipeline`: loading, saving and `.to(device, dtype)` are
diffusers'; model folders are described in `diffseg.loading`.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any, ClassVar

import torch
from diffusers import AutoencoderKL, DDPMScheduler, DiffusionPipeline, UNet2DConditionModel
from PIL import Image
from safetensors.torch import save_file
from transformers import CLIPTextModel, CLIPTokenizer

from diffseg.attention import (
    AttentionStore,
    SelfAttentionCaptureProcessor,
    capture_self_attention,
    self_attention_layers,
)
from diffseg.devices import resolve_device, resolve_dtype
from diffseg.features import capture_features
from diffseg.loading import PROMPT_EMBEDS_FILE, check_folder, load_prompt_embeds, model_folder
from diffseg.models import build_tiny
from diffseg.preprocess import to_model_input
from diffseg.segmenter import AttentionSegmenter, DiffSegOutput, UNetPass

__all__ = ["DiffSegOutput", "DiffSegPipeline", "UNetPass", "resolve_device", "resolve_dtype"]


class DiffSegPipeline(DiffusionPipeline, AttentionSegmenter):
    """Stable Diffusion's UNet, VAE and text encoder plus DiffSeg's capture; aggregation and merging
    come from `AttentionSegmenter` (`aggregate`, `__call__`).

    Build with `from_pretrained` (hub id or local diffusers folder) or `from_tiny`. The text
    encoder and tokenizer are optional when `prompt_embeds` (the empty prompt's embedding) is
    given. Text embeddings are computed once per prompt and cached. `capture_max_elements`
    bounds the attention scores the capture materialises at once (None: by device, see
    `diffseg.attention.default_max_elements`).
    """

    _optional_components: ClassVar[list[str]] = ["text_encoder", "tokenizer"]

    def __init__(
        self,
        unet: UNet2DConditionModel,
        vae: AutoencoderKL,
        scheduler: DDPMScheduler,
        text_encoder: CLIPTextModel | None = None,
        tokenizer: CLIPTokenizer | None = None,
        prompt_embeds: torch.Tensor | None = None,
    ) -> None:
        super().__init__()
        if prompt_embeds is None and (text_encoder is None or tokenizer is None):
            raise ValueError(
                "give text_encoder and tokenizer, or prompt_embeds (the empty-prompt embedding)"
            )
        self.register_modules(
            unet=unet, vae=vae, scheduler=scheduler, text_encoder=text_encoder, tokenizer=tokenizer
        )
        for module in (unet, vae, text_encoder):
            if module is not None:
                module.eval().requires_grad_(False)
        self.capture_max_elements: int | None = None
        self._prompt_embeds: dict[str, torch.Tensor] = {}
        if prompt_embeds is not None:
            self._prompt_embeds[""] = self._check_embeds(prompt_embeds)
        # Set by compile_unet: the capture processors then stay installed, feeding this store.
        self._capture_store: AttentionStore | None = None
        self.num_self_attention_layers = len(self_attention_layers(unet))
        self.vae_scale_factor = 2 ** (len(vae.config.block_out_channels) - 1)
        self.latent_multiple = 2 ** (len(unet.config.down_block_types) - 1)

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_tiny(
        cls,
        seed: int = 0,
        device: str | torch.device | None = None,
        dtype: str | torch.dtype | None = torch.float32,
    ) -> DiffSegPipeline:
        """The SD-shaped tiny model with seeded random weights (no download); float32 unless
        ``dtype`` says otherwise (None: as :func:`resolve_dtype`)."""
        return cls(**build_tiny(seed)).place(device, dtype)

    @classmethod
    def from_pretrained(
        cls,
        model: str | os.PathLike,
        revision: str | None = None,
        dtype: str | torch.dtype | None = None,
        device: str | torch.device | None = None,
    ) -> DiffSegPipeline:
        """Load a Stable Diffusion model from a hub id or a local folder in diffusers layout
        (`diffseg.loading`), in ``dtype`` (None: as :func:`resolve_dtype`) on ``device``.

        Raises `diffseg.loading.ModelNotFoundError` (a FileNotFoundError) for a missing local
        folder or subfolder and `ModelLoadError` (an OSError) when a hub model cannot be fetched;
        both say how to load a local copy instead.
        """
        device_ = resolve_device(device)
        dtype_ = resolve_dtype(dtype, device_)
        folder = model_folder(str(model), revision)
        skip = check_folder(folder)
        with warnings.catch_warnings():
            # Recent diffusers deprecate `torch_dtype` for `dtype`, which older ones do not know.
            warnings.filterwarnings("ignore", ".*torch_dtype", FutureWarning)
            pipe = super().from_pretrained(
                str(folder), torch_dtype=dtype_, prompt_embeds=load_prompt_embeds(folder), **skip
            )
        return pipe.place(device_, dtype_)

    def place(
        self, device: str | torch.device | None = None, dtype: str | torch.dtype | None = None
    ) -> DiffSegPipeline:
        """`.to(device, dtype)` with :func:`resolve_device` and :func:`resolve_dtype`'s defaults;
        casts only when the dtype differs (diffusers warns on every cast). Returns self."""
        device_ = resolve_device(device)
        dtype_ = resolve_dtype(dtype, device_)
        self.to(device_, silence_dtype_warnings=True)
        if self.dtype != dtype_:
            self.to(dtype=dtype_, silence_dtype_warnings=True)
        return self

    def save_pretrained(
        self, save_directory: str | os.PathLike, prompt_embeds_only: bool = False, **kwargs: Any
    ) -> None:
        """Write the model in the layout `from_pretrained` reads (``kwargs``: as diffusers').

        With `prompt_embeds_only`, the text encoder and tokenizer are replaced by
        `prompt_embeds.safetensors` (the empty prompt's embedding), so only `prompt=""` works.
        """
        if not prompt_embeds_only:
            if self.text_encoder is None or self.tokenizer is None:
                raise ValueError("this pipeline has no text encoder: use prompt_embeds_only=True")
            super().save_pretrained(save_directory, **kwargs)
            return
        embeds = self.encode_prompt("")
        slim = type(self)(self.unet, self.vae, self.scheduler, prompt_embeds=embeds)
        DiffusionPipeline.save_pretrained(slim, save_directory, **kwargs)
        save_file(
            {"prompt_embeds": embeds.float().cpu().contiguous()},
            Path(save_directory) / PROMPT_EMBEDS_FILE,
        )

    # ------------------------------------------------------------------ steps
    def _check_embeds(self, embeds: torch.Tensor) -> torch.Tensor:
        if embeds.ndim == 2:
            embeds = embeds[None]
        dim = self.unet.config.cross_attention_dim
        if embeds.ndim != 3 or embeds.shape[0] != 1 or embeds.shape[-1] != dim:
            raise ValueError(
                f"prompt_embeds must have shape (1, L, {dim}) for this UNet, got {tuple(embeds.shape)}"
            )
        return embeds

    @torch.inference_mode()
    def encode_prompt(self, prompt: str = "") -> torch.Tensor:
        """Text embedding `(1, 77, D)` of `prompt`, padded to the tokenizer's length; cached."""
        if prompt not in self._prompt_embeds:
            self._prompt_embeds[prompt] = self._check_embeds(self._run_text_encoder(prompt))
        embeds = self._prompt_embeds[prompt]
        if embeds.device != self.device or embeds.dtype != self.dtype:
            # Not a registered module, so `.to()` leaves it behind: follow the pipeline here.
            embeds = self._prompt_embeds[prompt] = embeds.to(self.device, self.dtype)
        return embeds

    def _run_text_encoder(self, prompt: str) -> torch.Tensor:
        if self.text_encoder is None or self.tokenizer is None:
            raise ValueError(
                f"prompt={prompt!r}: this model was loaded with only the empty-prompt embedding "
                f"({PROMPT_EMBEDS_FILE}); other prompts need text_encoder/ and tokenizer/"
            )
        tokens = self.tokenizer(
            prompt,
            padding="max_length",
            max_length=self.tokenizer.model_max_length,
            truncation=True,
            return_tensors="pt",
        )
        mask = None
        if getattr(self.text_encoder.config, "use_attention_mask", False):
            mask = tokens.attention_mask.to(self.device)
        return self.text_encoder(tokens.input_ids.to(self.device), attention_mask=mask)[0]

    def preprocess(
        self, images: torch.Tensor | Sequence[Image.Image], resolution: int
    ) -> torch.Tensor:
        """Images -> `(B, 3, resolution, resolution)` in [-1, 1] on the pipeline's device/dtype."""
        return to_model_input(images, resolution, self.device, self.dtype)

    @torch.inference_mode()
    def encode_images(self, pixels: torch.Tensor) -> torch.Tensor:
        """`(B, 3, R, R)` in [-1, 1] -> latents `(B, C, R/8, R/8)`: posterior mean x scaling factor."""
        return self.vae.encode(pixels).latent_dist.mean * self.vae.config.scaling_factor

    @torch.inference_mode()
    def capture_attention(
        self,
        latents: torch.Tensor,
        timestep: int = 300,
        prompt: str = "",
        noise: bool = False,
        seed: int = 0,
    ) -> dict[int, torch.Tensor]:
        """One UNet pass; resolution `r` -> block- and head-averaged attention `(B, r*r, r*r)`."""
        steps = self.scheduler.config.num_train_timesteps
        if not 0 <= int(timestep) < steps:
            raise ValueError(f"timestep must be in [0, {steps}), got {timestep}")
        t = torch.tensor([int(timestep)], device=self.device)
        if noise:
            generator = torch.Generator().manual_seed(seed)
            eps = torch.randn(latents.shape, generator=generator).to(latents.device, latents.dtype)
            latents = self.scheduler.add_noise(latents, eps, t)
        context = self.encode_prompt(prompt).expand(latents.shape[0], -1, -1)
        if self._capture_store is not None:
            store = self._capture_store
            store.reset()
            self.unet(latents, t, encoder_hidden_states=context)
        else:
            with capture_self_attention(self.unet, max_elements=self.capture_max_elements) as store:
                self.unet(latents, t, encoder_hidden_states=context)
        if sum(store.counts.values()) != self.num_self_attention_layers:
            raise RuntimeError(
                f"captured {sum(store.counts.values())} self-attention layers, expected "
                f"{self.num_self_attention_layers}"
            )
        return dict(zip(store.resolutions, store.averaged(), strict=True))

    @property
    def compiled(self) -> bool:
        """Whether `compile_unet` has run (the capture processors then stay installed)."""
        return self._capture_store is not None

    def compile_unet(self, **options: Any) -> None:
        """`torch.compile` the UNet (in place, `nn.Module.compile`; `options` go to it, e.g.
        `mode="max-autotune"` or `backend="eager"`).

        The capture processors are installed for good first, writing into one store that each
        `capture_attention` resets: swapping processors per call (what `capture_self_attention`
        does) would make every call recompile. A no-op when already compiled. Worth it on CUDA for
        many batches of one shape; the first calls pay for compilation.
        """
        if self.compiled:
            return
        store = AttentionStore()
        processor = SelfAttentionCaptureProcessor(store, self.capture_max_elements)
        layers = set(self_attention_layers(self.unet))
        self.unet.set_attn_processor(
            {n: processor if n in layers else p for n, p in self.unet.attn_processors.items()}
        )
        self.unet.compile(**options)
        self._capture_store = store

    def check_resolution(self, resolution: int) -> None:
        """Raise ValueError unless ``resolution`` is an input side this model takes."""
        multiple = self.vae_scale_factor * self.latent_multiple
        if not isinstance(resolution, int) or resolution <= 0 or resolution % multiple:
            raise ValueError(
                f"resolution must be a positive multiple of {multiple} for this model "
                f"(VAE factor {self.vae_scale_factor} x UNet factor {self.latent_multiple}), "
                f"got {resolution!r}"
            )

    def attention(
        self,
        images: torch.Tensor | Sequence[Image.Image],
        timestep: int = 300,
        resolution: int = 512,
        prompt: str = "",
        noise: bool = False,
        seed: int = 0,
    ) -> dict[int, torch.Tensor]:
        """Preprocess, encode, one UNet pass: resolution `r` (largest first) -> `(B, r*r, r*r)`.

        The one step that runs the model; `aggregate` and `__call__` build on it, so a subclass of
        `AttentionSegmenter` with its own `attention` (e.g. `eval.attention_cache`) changes where
        the attention comes from.
        """
        self.check_resolution(resolution)
        latents = self.encode_images(self.preprocess(images, resolution))
        return self.capture_attention(latents, timestep, prompt, noise, seed)

    def unet_pass(  # noqa: PLR0913 (diffusers' keyword-call style: conf/segmenter keys)
        self,
        images: torch.Tensor | Sequence[Image.Image],
        timestep: int = 300,
        resolution: int = 512,
        prompt: str = "",
        noise: bool = False,
        seed: int = 0,
        features: bool = True,
    ) -> UNetPass:
        """`attention` (same arguments), with DiffCut's UNet features `(B, C, h, w)` captured in
        the same pass when `features` (`diffseg.features.capture_features`: forward hooks that
        change no computation, so the attention is the same as without them)."""
        if not features:
            return UNetPass(self.attention(images, timestep, resolution, prompt, noise, seed))
        with capture_features(self.unet) as store:
            attention = self.attention(images, timestep, resolution, prompt, noise, seed)
        return UNetPass(attention, store.features)

    def __repr__(self) -> str:
        config: dict[str, Any] = dict(self.unet.config)
        return (
            f"{type(self).__name__}(device={self.device}, dtype={self.dtype}, "
            f"unet_channels={config['block_out_channels']}, "
            f"self_attention_layers={self.num_self_attention_layers})"
        )
