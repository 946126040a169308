"""DiffSeg end to end: images in, segment labels out.

As the official implementation (Stable Diffusion 1.4, keras-cv): centre-crop to a square, resize to
`resolution` (bilinear, half-pixel centres, no antialiasing), scale to [-1, 1]; the latent is the VAE
posterior **mean** times the VAE scaling factor; one UNet pass at timestep 300 conditioned on the
empty prompt `""` padded to 77 tokens; the self-attention probabilities of every transformer block,
averaged over heads and over the blocks of each resolution, are aggregated
(`diffseg.aggregate.aggregate_attention`) and merged (`diffseg.merge`).

Model directories use the diffusers layout: `unet/`, `vae/`, `scheduler/`, and either `text_encoder/`
+ `tokenizer/` or a file `prompt_embeds.safetensors` holding the empty-prompt embedding (tensor
`prompt_embeds`, shape `(1, 77, D)`), for copies made without the text encoder
(`DiffSegPipeline.save_pretrained(path, prompt_embeds_only=True)` writes one).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
from PIL import Image
from safetensors.torch import load_file, save_file
from transformers import CLIPTextModel, CLIPTokenizer

from diffseg.aggregate import aggregate_attention
from diffseg.attention import (
    AttentionStore,
    SelfAttentionCaptureProcessor,
    capture_self_attention,
    self_attention_layers,
)
from diffseg.merge import (
    check_merge_settings,
    merge_attention,
    proposals_to_labels,
    segment_attention,
)
from diffseg.models import build_tiny

PROMPT_EMBEDS_FILE = "prompt_embeds.safetensors"
_DTYPES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "float16": torch.float16,
    "fp16": torch.float16,
    "half": torch.float16,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
}
_FIX = "point the config at a local copy with the Hydra override `model.model=/path/to/local/copy`"


@dataclass
class DiffSegOutput:
    """Labels and the intermediate results of one batch.

    labels: `(B, resolution, resolution)` long, on the CPU. attention: resolution `r` -> block- and
    head-averaged self-attention `(B, r*r, r*r)` float32. aggregated: `(B, S, S, S, S)`.
    proposals: per image, the merged attention maps `(K_b, S, S)` whose argmax gives the labels.
    """

    labels: torch.Tensor
    attention: dict[int, torch.Tensor]
    aggregated: torch.Tensor
    proposals: list[torch.Tensor]


def _resolve_device(device: str | torch.device | None) -> torch.device:
    if device is None or str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device={device} was asked for but CUDA is not available; use device=cpu")
    return device


def resolve_dtype(dtype: str | torch.dtype | None, device: torch.device) -> torch.dtype:
    """fp32 on CPU, fp16 on CUDA unless `dtype` says otherwise ("float16", "bf16", torch.float32...)."""
    if dtype is None:
        return torch.float16 if device.type == "cuda" else torch.float32
    if isinstance(dtype, torch.dtype):
        resolved = dtype
    else:
        name = str(dtype).removeprefix("torch.")
        if name not in _DTYPES:
            raise ValueError(f"dtype={dtype!r} is not supported; use one of {sorted(_DTYPES)}")
        resolved = _DTYPES[name]
    if resolved not in (torch.float32, torch.float16, torch.bfloat16):
        raise ValueError(f"dtype={dtype!r} is not supported; use float32, float16 or bfloat16")
    return resolved


def _prepare(module: torch.nn.Module, device: torch.device, dtype: torch.dtype) -> torch.nn.Module:
    """Move to device; cast only when the dtype differs (diffusers warns on every `.to(dtype)`)."""
    module = module.to(device)
    if next(module.parameters()).dtype != dtype:
        module = module.to(dtype)
    return module.eval().requires_grad_(False)


def _looks_local(model: str) -> bool:
    """Hub ids are `name` or `org/name`; anything else (absolute, ./, ~, deeper) is a path."""
    return (
        os.path.isabs(model)
        or model.startswith((".", "~"))
        or model.count("/") > 1
        or "\\" in model
    )


def _to_tensor(image: Image.Image) -> torch.Tensor:
    """PIL image -> float `(3, H, W)` in [0, 1]."""
    array = np.asarray(image.convert("RGB"), dtype=np.float32) / 255.0
    return torch.from_numpy(array).permute(2, 0, 1)


def center_crop_resize(images: torch.Tensor, resolution: int) -> torch.Tensor:
    """`(B, 3, H, W)` -> `(B, 3, resolution, resolution)`: the central square, resized.

    Crop offsets `(H - c) // 2`, `(W - c) // 2` with `c = min(H, W)`; bilinear resize with
    half-pixel centres and no antialiasing (TF2's default `resize`).
    """
    h, w = images.shape[-2:]
    c = min(h, w)
    top, left = (h - c) // 2, (w - c) // 2
    images = images[..., top : top + c, left : left + c]
    if c != resolution:
        images = F.interpolate(
            images, size=(resolution, resolution), mode="bilinear", align_corners=False
        )
    return images


class DiffSegPipeline:
    """Stable Diffusion components plus DiffSeg's capture, aggregation and merging.

    Build with `from_pretrained` (hub id or local diffusers directory) or `from_tiny`. Text
    embeddings are computed once per prompt and cached.
    """

    def __init__(
        self,
        unet: UNet2DConditionModel,
        vae: AutoencoderKL,
        scheduler: DDPMScheduler,
        text_encoder: CLIPTextModel | None = None,
        tokenizer: CLIPTokenizer | None = None,
        prompt_embeds: torch.Tensor | None = None,
        device: str | torch.device | None = None,
        dtype: str | torch.dtype | None = None,
        capture_max_elements: int | None = None,
    ) -> None:
        if prompt_embeds is None and (text_encoder is None or tokenizer is None):
            raise ValueError(
                "give text_encoder and tokenizer, or prompt_embeds (the empty-prompt embedding)"
            )
        self.device = _resolve_device(device)
        self.dtype = resolve_dtype(dtype, self.device)
        self.unet = _prepare(unet, self.device, self.dtype)
        self.vae = _prepare(vae, self.device, self.dtype)
        self.text_encoder = None
        if text_encoder is not None:
            self.text_encoder = _prepare(text_encoder, self.device, self.dtype)
        self.tokenizer = tokenizer
        self.scheduler = scheduler
        self.capture_max_elements = capture_max_elements
        self._prompt_embeds: dict[str, torch.Tensor] = {}
        # Set by compile_unet: the capture processors then stay installed, feeding this store.
        self._capture_store: AttentionStore | None = None
        if prompt_embeds is not None:
            self._prompt_embeds[""] = self._check_embeds(prompt_embeds)
        self.num_self_attention_layers = len(self_attention_layers(self.unet))
        self.vae_scale_factor = 2 ** (len(self.vae.config.block_out_channels) - 1)
        self.latent_multiple = 2 ** (len(self.unet.config.down_block_types) - 1)

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
        return cls(**build_tiny(seed), device=device, dtype=dtype)

    @classmethod
    def from_pretrained(
        cls,
        model: str | os.PathLike,
        revision: str | None = None,
        dtype: str | torch.dtype | None = None,
        device: str | torch.device | None = None,
    ) -> DiffSegPipeline:
        """Load a Stable Diffusion model from a hub id or a local directory in diffusers layout.

        Raises FileNotFoundError for a missing local directory or subfolder and OSError when a hub
        model cannot be fetched; both say how to point the config at a local copy.
        """
        model = str(model)
        device_ = _resolve_device(device)
        dtype_ = resolve_dtype(dtype, device_)
        path = Path(model).expanduser()
        if path.is_dir():
            return cls._from_local_dir(path, dtype_, device_)
        if path.exists() or _looks_local(model):
            raise FileNotFoundError(
                f"model={model!r}: no such directory. Expected a Stable Diffusion model in diffusers "
                f"layout (unet/, vae/, scheduler/, text_encoder/, tokenizer/); {_FIX}"
            )
        loaders = {
            "unet": lambda: UNet2DConditionModel.from_pretrained(
                model, subfolder="unet", revision=revision, torch_dtype=dtype_
            ),
            "vae": lambda: AutoencoderKL.from_pretrained(
                model, subfolder="vae", revision=revision, torch_dtype=dtype_
            ),
            "scheduler": lambda: DDPMScheduler.from_pretrained(
                model, subfolder="scheduler", revision=revision
            ),
            "text_encoder": lambda: CLIPTextModel.from_pretrained(
                model, subfolder="text_encoder", revision=revision, torch_dtype=dtype_
            ),
            "tokenizer": lambda: CLIPTokenizer.from_pretrained(
                model, subfolder="tokenizer", revision=revision
            ),
        }
        parts = {}
        for name, load in loaders.items():
            try:
                parts[name] = load()
            except Exception as err:
                raise OSError(
                    f"could not load {name}/ of model={model!r} (revision={revision!r}) from the "
                    f"Hugging Face hub or its local cache ({type(err).__name__}: {err}). Without "
                    f"network, download it elsewhere (e.g. `hf download {model} --local-dir DIR`), "
                    f"copy DIR here and {_FIX}"
                ) from err
        return cls(**parts, device=device_, dtype=dtype_)

    @classmethod
    def _from_local_dir(
        cls, path: Path, dtype: torch.dtype, device: torch.device
    ) -> DiffSegPipeline:
        embeds_file = path / PROMPT_EMBEDS_FILE
        required = ["unet", "vae", "scheduler"]
        if not embeds_file.is_file():
            required += ["text_encoder", "tokenizer"]
        missing = [name for name in required if not (path / name).is_dir()]
        if missing:
            raise FileNotFoundError(
                f"model directory {str(path)!r} lacks the subfolder(s) {missing}. A diffusers "
                f"layout needs unet/, vae/, scheduler/ and text_encoder/ + tokenizer/ (or a "
                f"{PROMPT_EMBEDS_FILE} with the empty-prompt embedding); {_FIX}"
            )
        unet = UNet2DConditionModel.from_pretrained(path, subfolder="unet", torch_dtype=dtype)
        vae = AutoencoderKL.from_pretrained(path, subfolder="vae", torch_dtype=dtype)
        scheduler = DDPMScheduler.from_pretrained(path, subfolder="scheduler")
        text_encoder = tokenizer = prompt_embeds = None
        if (path / "text_encoder").is_dir() and (path / "tokenizer").is_dir():
            text_encoder = CLIPTextModel.from_pretrained(
                path, subfolder="text_encoder", torch_dtype=dtype
            )
            tokenizer = CLIPTokenizer.from_pretrained(path, subfolder="tokenizer")
        if embeds_file.is_file():
            tensors = load_file(embeds_file)
            if "prompt_embeds" not in tensors:
                raise ValueError(
                    f"{embeds_file} must hold a tensor named 'prompt_embeds' (1, 77, D), "
                    f"found {sorted(tensors)}"
                )
            prompt_embeds = tensors["prompt_embeds"]
        return cls(
            unet, vae, scheduler, text_encoder, tokenizer, prompt_embeds, device=device, dtype=dtype
        )

    def save_pretrained(self, path: str | os.PathLike, prompt_embeds_only: bool = False) -> None:
        """Write the model in the layout `from_pretrained` reads.

        With `prompt_embeds_only`, the text encoder and tokenizer are replaced by
        `prompt_embeds.safetensors` (the empty prompt's embedding), so only `prompt=""` works.
        """
        path = Path(path)
        self.unet.save_pretrained(path / "unet")
        self.vae.save_pretrained(path / "vae")
        self.scheduler.save_pretrained(path / "scheduler")
        if prompt_embeds_only:
            embeds = self.encode_prompt("").float().cpu().contiguous()
            save_file({"prompt_embeds": embeds}, path / PROMPT_EMBEDS_FILE)
        elif self.text_encoder is not None and self.tokenizer is not None:
            self.text_encoder.save_pretrained(path / "text_encoder")
            self.tokenizer.save_pretrained(path / "tokenizer")
        else:
            raise ValueError("this pipeline has no text encoder: use prompt_embeds_only=True")

    # ------------------------------------------------------------------ steps
    def _check_embeds(self, embeds: torch.Tensor) -> torch.Tensor:
        if embeds.ndim == 2:
            embeds = embeds[None]
        dim = self.unet.config.cross_attention_dim
        if embeds.ndim != 3 or embeds.shape[0] != 1 or embeds.shape[-1] != dim:
            raise ValueError(
                f"prompt_embeds must have shape (1, L, {dim}) for this UNet, got {tuple(embeds.shape)}"
            )
        return embeds.to(self.device, self.dtype)

    @torch.inference_mode()
    def encode_prompt(self, prompt: str = "") -> torch.Tensor:
        """Text embedding `(1, 77, D)` of `prompt`, padded to the tokenizer's length; cached."""
        if prompt in self._prompt_embeds:
            return self._prompt_embeds[prompt]
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
        embeds = self.text_encoder(tokens.input_ids.to(self.device), attention_mask=mask)[0]
        self._prompt_embeds[prompt] = self._check_embeds(embeds)
        return self._prompt_embeds[prompt]

    def preprocess(
        self, images: torch.Tensor | Sequence[Image.Image], resolution: int
    ) -> torch.Tensor:
        """Images -> `(B, 3, resolution, resolution)` in [-1, 1] on the pipeline's device/dtype."""
        if isinstance(images, Image.Image):
            images = [images]
        if isinstance(images, torch.Tensor):
            if images.ndim != 4 or images.shape[1] != 3 or not images.is_floating_point():
                raise ValueError(
                    f"images must be a float tensor (B, 3, H, W) in [0, 1], got "
                    f"{images.dtype} {tuple(images.shape)} (divide uint8 images by 255)"
                )
            lo, hi = torch.aminmax(images) if images.numel() else (0.0, 1.0)
            if lo < 0 or hi > 1:
                raise ValueError(f"images must be in [0, 1], got values in [{lo:.3g}, {hi:.3g}]")
            # non_blocking: a pinned batch (the harness' loader) is copied while the host goes on.
            images = images.to(self.device, torch.float32, non_blocking=True)
            batch = center_crop_resize(images, resolution)
        elif (
            isinstance(images, Sequence)
            and images
            and all(isinstance(i, Image.Image) for i in images)
        ):
            batch = torch.cat(
                [
                    center_crop_resize(_to_tensor(i)[None].to(self.device), resolution)
                    for i in images
                ]
            )
        else:
            raise ValueError(
                "images must be a float tensor (B, 3, H, W) in [0, 1] or a non-empty list of PIL "
                f"images, got {type(images).__name__}"
            )
        return (batch * 2 - 1).to(self.dtype)

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

    def _check_resolution(self, resolution: int) -> None:
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

        The one step that runs the model; `aggregate` and `__call__` build on it, so a wrapper that
        overrides it (e.g. `eval.attention_cache`) changes where the attention comes from.
        """
        self._check_resolution(resolution)
        latents = self.encode_images(self.preprocess(images, resolution))
        return self.capture_attention(latents, timestep, prompt, noise, seed)

    def _attend(
        self,
        images: torch.Tensor | Sequence[Image.Image],
        timestep: int,
        weights: Sequence[float] | None,
        resolution: int,
        prompt: str,
        noise: bool,
        seed: int,
    ) -> tuple[dict[int, torch.Tensor], torch.Tensor]:
        """(per-resolution attention, aggregated attention) of a batch."""
        attention = self.attention(images, timestep, resolution, prompt, noise, seed)
        with torch.inference_mode():
            aggregated = aggregate_attention(list(attention.values()), weights)
        return attention, aggregated

    def aggregate(
        self,
        images: torch.Tensor | Sequence[Image.Image],
        timestep: int = 300,
        weights: Sequence[float] | None = None,
        resolution: int = 512,
        prompt: str = "",
        noise: bool = False,
        seed: int = 0,
    ) -> torch.Tensor:
        """The aggregated self-attention `(B, S, S, S, S)` of a batch (`S = resolution / 8` for SD).

        Everything `__call__` does before merging (same arguments, same meaning), for segmenters
        other than DiffSeg's merging (e.g. `diffseg.kmeans`). Stays on the pipeline's device.
        """
        return self._attend(images, timestep, weights, resolution, prompt, noise, seed)[1]

    def __call__(
        self,
        images: torch.Tensor | Sequence[Image.Image],
        timestep: int = 300,
        kl_threshold: Sequence[float] = (1.1, 1.1, 1.1),
        num_points: int = 16,
        refine: bool = False,
        weights: Sequence[float] | None = None,
        resolution: int = 512,
        prompt: str = "",
        noise: bool = False,
        seed: int = 0,
        return_intermediates: bool = False,
        first_merge_dtype: str = "float64",
    ) -> torch.Tensor | DiffSegOutput:
        """Segment a batch: `(B, 3, H, W)` in [0, 1] or PIL images -> labels `(B, res, res)`.

        `weights`: aggregation weight per resolution, largest resolution first (default r/sum(r)).
        `noise`: add scheduler noise at `timestep` (drawn for the whole batch from `seed`); off in
        the official method. `first_merge_dtype`: "float64" (exact KL) or "float16" (the official
        code's arithmetic for merge iteration 1; see `diffseg.merge.merge_attention`). Labels are
        returned on the CPU; intermediates stay on the device.
        """
        # Before the UNet pass: a bad merge setting would otherwise fail only after it.
        self._check_resolution(resolution)
        check_merge_settings(resolution, num_points, kl_threshold, self.vae_scale_factor)
        attention, aggregated = self._attend(
            images, timestep, weights, resolution, prompt, noise, seed
        )
        with torch.inference_mode():
            if not return_intermediates:
                return segment_attention(
                    aggregated,
                    kl_threshold,
                    num_points,
                    refine,
                    out_size=resolution,
                    first_merge_dtype=first_merge_dtype,
                ).cpu()
            proposals = merge_attention(
                aggregated, kl_threshold, num_points, refine, first_merge_dtype
            )
            labels = torch.stack([proposals_to_labels(p, resolution) for p in proposals])
        return DiffSegOutput(labels.cpu(), attention, aggregated, proposals)

    def __repr__(self) -> str:
        config: dict[str, Any] = dict(self.unet.config)
        return (
            f"{type(self).__name__}(device={self.device}, dtype={self.dtype}, "
            f"unet_channels={config['block_out_channels']}, "
            f"self_attention_layers={self.num_self_attention_layers})"
        )
