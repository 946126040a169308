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

The text conditioning of SD 1.x- and SDXL-shaped UNets (SDXL, SSD-1B) is one object chosen at
construction (`diffseg.conditioning`); a pass's settings are one `diffseg.passes.PassSettings`,
whose numerics say how it rounds (DiffSeg's plain pass, or DiffCut's mixed precision). The noise
schedule is read as DDPM's whatever scheduler the folder names (SDXL ships Euler, whose
`add_noise` is another parametrisation): only `add_noise` is used, and DDPM's is DiffCut's (DDIM's,
the same formula).
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Sequence
from contextlib import nullcontext
from pathlib import Path
from typing import Any, ClassVar

import torch
from diffusers import (
    AutoencoderKL,
    DDPMScheduler,
    DiffusionPipeline,
    SchedulerMixin,
    UNet2DConditionModel,
)
from PIL import Image
from safetensors.torch import save_file
from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

from diffseg.attention import (
    AttentionStore,
    attention_levels,
    capture_self_attention,
    install_capture,
    self_attention_layers,
)
from diffseg.conditioning import SDXLConditioning, conditioning_for
from diffseg.devices import resolve_device, resolve_dtype
from diffseg.features import capture_features
from diffseg.loading import PROMPT_EMBEDS_FILE, check_folder, load_prompt_embeds, model_folder
from diffseg.models import build_tiny, build_tiny_xl
from diffseg.passes import DEFAULT_PASS, PassSettings
from diffseg.preprocess import to_model_input
from diffseg.segmenter import AttentionSegmenter, DiffSegOutput, UNetPass

__all__ = ["DiffSegOutput", "DiffSegPipeline", "UNetPass", "resolve_device", "resolve_dtype"]


class DiffSegPipeline(DiffusionPipeline, AttentionSegmenter):
    """Stable Diffusion's UNet, VAE and text encoder(s) plus DiffSeg's capture; aggregation and
    merging come from `AttentionSegmenter` (`aggregate`, `__call__`).

    Build with `from_pretrained` (hub id or local diffusers folder) or `from_tiny`. The text
    encoders and tokenizers are optional when `prompt_embeds` (the empty prompt's embedding; for
    an SDXL-shaped UNet also `pooled_prompt_embeds`, the second encoder's pooled projection) is
    given. Text embeddings are computed once per prompt and cached. `capture_max_elements`
    bounds the attention scores the capture materialises at once (None: by device, see
    `diffseg.attention.default_max_elements`). `scheduler`: any diffusers scheduler, kept as a
    `DDPMScheduler` of the same noise schedule (module docstring).
    """

    _optional_components: ClassVar[list[str]] = [
        "text_encoder",
        "tokenizer",
        "text_encoder_2",
        "tokenizer_2",
    ]

    def __init__(  # noqa: PLR0913 (diffusers' pipeline components, one argument each)
        self,
        unet: UNet2DConditionModel,
        vae: AutoencoderKL,
        scheduler: SchedulerMixin,
        text_encoder: CLIPTextModel | None = None,
        tokenizer: CLIPTokenizer | None = None,
        text_encoder_2: CLIPTextModelWithProjection | None = None,
        tokenizer_2: CLIPTokenizer | None = None,
        prompt_embeds: torch.Tensor | None = None,
        pooled_prompt_embeds: torch.Tensor | None = None,
    ) -> None:
        super().__init__()
        if not isinstance(scheduler, DDPMScheduler):
            scheduler = DDPMScheduler.from_config(scheduler.config)
        self.register_modules(
            unet=unet,
            vae=vae,
            scheduler=scheduler,
            text_encoder=text_encoder,
            tokenizer=tokenizer,
            text_encoder_2=text_encoder_2,
            tokenizer_2=tokenizer_2,
        )
        # SD 1.x's or SDXL's text conditioning, by the UNet's config (diffseg.conditioning).
        self.conditioning = conditioning_for(unet)
        self.conditioning.setup(self, prompt_embeds, pooled_prompt_embeds)
        for module in (unet, vae, text_encoder, text_encoder_2):
            if module is not None:
                module.eval().requires_grad_(False)
        self.capture_max_elements: int | None = None
        # Set by compile_unet: the capture processors then stay installed, feeding this store.
        self._capture_store: AttentionStore | None = None
        self.num_self_attention_layers = len(self_attention_layers(unet))
        self.vae_scale_factor = 2 ** (len(vae.config.block_out_channels) - 1)
        self.latent_multiple = 2 ** (len(unet.config.down_block_types) - 1)
        self.attention_levels = attention_levels(unet)
        self.attention_scale_factor = self.vae_scale_factor * 2 ** self.attention_levels[0]

    @property
    def is_xl(self) -> bool:
        """Whether the UNet is SDXL-shaped: it takes the pooled text embedding and time ids."""
        return isinstance(self.conditioning, SDXLConditioning)

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_tiny(
        cls,
        seed: int = 0,
        device: str | torch.device | None = None,
        dtype: str | torch.dtype | None = torch.float32,
        layout: str = "sd",
    ) -> DiffSegPipeline:
        """The tiny model with seeded random weights (no download), SD 1.x-shaped (``layout="sd"``)
        or SDXL-shaped (``"sdxl"``); float32 unless ``dtype`` says otherwise (None: as
        :func:`resolve_dtype`)."""
        builders = {"sd": build_tiny, "sdxl": build_tiny_xl}
        if layout not in builders:
            raise ValueError(f"layout must be one of {sorted(builders)}, got {layout!r}")
        return cls(**builders[layout](seed)).place(device, dtype)

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
                str(folder), torch_dtype=dtype_, **load_prompt_embeds(folder), **skip
            )
        return pipe.place(device_, dtype_)

    def place(
        self, device: str | torch.device | None = None, dtype: str | torch.dtype | None = None
    ) -> DiffSegPipeline:
        """`.to(device, dtype)` with :func:`resolve_device` and :func:`resolve_dtype`'s defaults;
        casts only when the dtype differs (diffusers warns on every cast); an SDXL VAE whose
        config says `force_upcast` stays in float32. Returns self."""
        device_ = resolve_device(device)
        dtype_ = resolve_dtype(dtype, device_)
        self.to(device_, silence_dtype_warnings=True)
        if self.dtype != dtype_:
            self.to(dtype=dtype_, silence_dtype_warnings=True)
        if self.conditioning.vae_upcast(self.vae) and self.vae.dtype != torch.float32:
            self.vae.to(dtype=torch.float32)
        return self

    def save_pretrained(
        self, save_directory: str | os.PathLike, prompt_embeds_only: bool = False, **kwargs: Any
    ) -> None:
        """Write the model in the layout `from_pretrained` reads (``kwargs``: as diffusers').

        With `prompt_embeds_only`, the text encoders and tokenizers are replaced by
        `prompt_embeds.safetensors` (the empty prompt's embedding, and for an SDXL-shaped UNet its
        pooled embedding), so only `prompt=""` works.
        """
        if not prompt_embeds_only:
            if self.text_encoder is None or self.tokenizer is None:
                raise ValueError("this pipeline has no text encoder: use prompt_embeds_only=True")
            super().save_pretrained(save_directory, **kwargs)
            return
        embeds, pooled = self.prompt_conditioning("")
        tensors = {"prompt_embeds": embeds, "pooled_prompt_embeds": pooled}
        tensors = {k: v.float().cpu().contiguous() for k, v in tensors.items() if v is not None}
        slim = type(self)(self.unet, self.vae, self.scheduler, **tensors)
        DiffusionPipeline.save_pretrained(slim, save_directory, **kwargs)
        save_file(tensors, Path(save_directory) / PROMPT_EMBEDS_FILE)

    # ------------------------------------------------------------------ steps
    @torch.inference_mode()
    def prompt_conditioning(self, prompt: str = "") -> tuple[torch.Tensor, torch.Tensor | None]:
        """`prompt`'s text embedding `(1, 77, D)` (padded to the tokenizer's length) and, for an
        SDXL-shaped UNet, its pooled embedding `(1, P)` (else None); cached."""
        return self.conditioning.embeddings(self, prompt)

    def encode_prompt(self, prompt: str = "") -> torch.Tensor:
        """Text embedding `(1, 77, D)` of `prompt` (:meth:`prompt_conditioning`)."""
        return self.prompt_conditioning(prompt)[0]

    def preprocess(
        self,
        images: torch.Tensor | Sequence[Image.Image],
        resolution: int,
        dtype: torch.dtype | None = None,
    ) -> torch.Tensor:
        """Images -> `(B, 3, resolution, resolution)` in [-1, 1] on the pipeline's device, in
        ``dtype`` (None: the pipeline's)."""
        return to_model_input(images, resolution, self.device, dtype or self.dtype)

    @torch.inference_mode()
    def encode_images(self, pixels: torch.Tensor) -> torch.Tensor:
        """`(B, 3, R, R)` in [-1, 1] -> latents `(B, C, R/8, R/8)`: posterior mean x scaling factor
        (in the VAE's dtype, float32 for an upcast SDXL VAE; returned in the pixels')."""
        latents = self.vae.encode(pixels.to(self.vae.dtype)).latent_dist.mean
        return (latents * self.vae.config.scaling_factor).to(pixels.dtype)

    @torch.inference_mode()
    def capture_attention(
        self, latents: torch.Tensor, settings: PassSettings = DEFAULT_PASS
    ) -> dict[int, torch.Tensor]:
        """One UNet pass under ``settings`` (its resolution is the latents'); resolution `r` ->
        block- and head-averaged attention `(B, r*r, r*r)`, or {} for numerics that capture none.

        With `noise`, the latents are noised to `timestep` (DDPM's forward process, in the
        latents' dtype) with one `(1, C, h, w)` normal draw from a generator on the pipeline's
        device seeded `seed`, shared by the batch as DiffCut's `tools/ldm.py` draws it: an image's
        noise depends neither on its batch nor on its position in it (on CUDA, seed 42, DiffCut's
        own noise values).
        """
        steps = self.scheduler.config.num_train_timesteps
        if not 0 <= settings.timestep < steps:
            raise ValueError(f"timestep must be in [0, {steps}), got {settings.timestep}")
        t = torch.tensor([settings.timestep], device=self.device)
        if settings.noise:
            generator = torch.Generator(self.device).manual_seed(settings.seed)
            shape = (1, *latents.shape[1:])
            eps = torch.randn(shape, generator=generator, device=self.device).to(latents.dtype)
            latents = self.scheduler.add_noise(latents, eps.expand_as(latents), t)
        # The prompt's embeddings; SDXL: also the time ids of an uncropped image of the input side.
        size = tuple(side * self.vae_scale_factor for side in latents.shape[-2:])
        embeds = self.prompt_conditioning(settings.prompt)
        conditioning = self.conditioning.unet_kwargs(*embeds, latents.shape[0], size)
        numerics = settings.arithmetic
        if self.compiled and not numerics.capture:
            raise ValueError(
                f"numerics={numerics.name!r} runs diffusers' own attention processors, which "
                "compile_unet replaced for good with DiffSeg's capture (compile=true): run DiffCut "
                "without compile=true"
            )
        if self.compiled or not numerics.capture:
            capture = nullcontext(self._capture_store)  # the compiled UNet's store, or None
        else:
            capture = capture_self_attention(self.unet, max_elements=self.capture_max_elements)
        with capture as store, numerics.unet_arithmetic(self.device, self.dtype):
            if store is not None:
                store.reset()
            self.unet(latents, t, **conditioning)
        if store is None:
            return {}
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
        store = install_capture(self.unet, max_elements=self.capture_max_elements).store
        self.unet.compile(**options)
        self._capture_store = store

    def attention_sides(self, resolution: int) -> list[int]:
        """Sides of the self-attention maps of a ``resolution`` input, largest first (SD 1.x at
        512: 64, 32, 16, 8; SDXL at 1024: 64, 32)."""
        latent = resolution // self.vae_scale_factor
        return [latent >> level for level in self.attention_levels]

    def check_resolution(self, resolution: int) -> None:
        """Raise ValueError unless ``resolution`` is an input side this model takes."""
        multiple = self.vae_scale_factor * self.latent_multiple
        if not isinstance(resolution, int) or resolution <= 0 or resolution % multiple:
            raise ValueError(
                f"resolution must be a positive multiple of {multiple} for this model "
                f"(VAE factor {self.vae_scale_factor} x UNet factor {self.latent_multiple}), "
                f"got {resolution!r}"
            )

    def unet_pass(
        self,
        images: torch.Tensor | Sequence[Image.Image],
        settings: PassSettings = DEFAULT_PASS,
        features: bool = True,
    ) -> UNetPass:
        """Preprocess, encode, one UNet pass under ``settings``: the attention
        (`capture_attention`) and, when `features`, DiffCut's UNet features `(B, C, h, w)` of the
        same pass (`diffseg.features.capture_features`: forward hooks that change no computation,
        so the attention is the same as without them).

        The one step that runs the model; `attention`, `aggregate` and `__call__` build on it, so
        a `diffseg.segmenter.PassSource` with its own `unet_pass` (e.g. `eval.models.attention_cache`)
        changes where the passes come from.
        """
        self.check_resolution(settings.resolution)
        numerics = settings.arithmetic
        if not (features or numerics.capture):
            raise ValueError(f"numerics={numerics.name!r} without features captures nothing")
        pixels = self.preprocess(images, settings.resolution, numerics.input_dtype(self.dtype))
        with numerics.vae_arithmetic(self.vae):
            latents = self.encode_images(pixels)
        if not features:
            return UNetPass(self.capture_attention(latents, settings))
        with capture_features(self.unet) as store:
            attention = self.capture_attention(latents, settings)
        return UNetPass(attention, store.features)

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(device={self.device}, dtype={self.dtype}, "
            f"unet_channels={self.unet.config.block_out_channels}, "
            f"self_attention_layers={self.num_self_attention_layers})"
        )
