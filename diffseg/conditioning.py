"""The UNet's text conditioning, one object per model family, chosen once from the UNet's config
(:func:`conditioning_for`).

- :class:`SDConditioning` (SD 1.x, 2.x): the prompt's last hidden state of `text_encoder`, padded
  to the tokenizer's length.
- :class:`SDXLConditioning` (SDXL, SSD-1B: `unet.config.addition_embed_type == "text_time"`): as
  diffusers' SDXL pipelines condition (`StableDiffusionXLPipeline.encode_prompt`: penultimate
  hidden states of both encoders concatenated, the second encoder's pooled projection), plus the
  added conditioning of an uncropped square image of the input side (time ids `(R, R, 0, 0, R,
  R)`, as DiffCut's `tools/ldm.py`); its VAE computes in float32 when its config says
  `force_upcast` (SDXL's VAE overflows in float16).

An object holds what the UNet's config decides (widths) and reads the pipeline's modules when
asked (:meth:`SDConditioning.encode`), so it keeps no copy of them.
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch
from diffusers import AutoencoderKL, StableDiffusionXLPipeline

from diffseg.loading import PROMPT_EMBEDS_FILE, TEXT_PARTS, XL_TEXT_PARTS
from diffseg.models import SDXL_TIME_IDS

Embeds = tuple[torch.Tensor, torch.Tensor | None]


class SDConditioning:
    """SD 1.x-shaped UNets: the prompt's embedding `(1, L, D)` only (no pooled part)."""

    # The pipeline's text encoders and tokenizers, and the embeddings that can stand in for them.
    parts: ClassVar[tuple[str, ...]] = TEXT_PARTS
    embeds: ClassVar[tuple[str, ...]] = ("prompt_embeds",)

    def __init__(self, unet_config: Any) -> None:
        self.dim = unet_config.cross_attention_dim
        # prompt -> its checked embeddings (`embeddings`), each computed once.
        self.cache: dict[str, Embeds] = {}

    def setup(self, pipe: Any, embeds: torch.Tensor | None, pooled: torch.Tensor | None) -> None:
        """Raise ValueError unless ``pipe`` has the text parts, or ``embeds`` (and ``pooled``
        where needed) stand in for them; a given ``embeds`` is the empty prompt's."""
        given = (embeds, pooled)[: len(self.embeds)]
        has_embeds = all(x is not None for x in given)
        if not (has_embeds or all(getattr(pipe, name) is not None for name in self.parts)):
            raise ValueError(
                f"give {', '.join(self.parts)}, or {' and '.join(self.embeds)} (the empty "
                "prompt's embedding)"
            )
        if embeds is not None:
            self.cache[""] = self.check(embeds, pooled)

    def embeddings(self, pipe: Any, prompt: str) -> Embeds:
        """``prompt``'s embedding `(1, L, D)` (padded to the tokenizer's length) and pooled
        embedding `(1, P)` (None here), on ``pipe``'s device and dtype; computed once."""
        if prompt not in self.cache:
            self.cache[prompt] = self.check(*self.encode(pipe, prompt))
        embeds, pooled = self.cache[prompt]
        if embeds.device != pipe.device or embeds.dtype != pipe.dtype:
            # Not registered modules, so the pipeline's `.to()` leaves them behind: follow it.
            embeds, pooled = (
                None if t is None else t.to(pipe.device, pipe.dtype) for t in (embeds, pooled)
            )
            self.cache[prompt] = embeds, pooled
        return embeds, pooled

    def check(self, embeds: torch.Tensor, pooled: torch.Tensor | None) -> Embeds:
        """``embeds`` as `(1, L, D)` (a `(L, D)` gets its batch axis), checked against the
        UNet's width; ValueError naming the shape otherwise."""
        if embeds.ndim == 2:
            embeds = embeds[None]
        if embeds.ndim != 3 or embeds.shape[0] != 1 or embeds.shape[-1] != self.dim:
            raise ValueError(
                f"prompt_embeds must have shape (1, L, {self.dim}) for this UNet, got "
                f"{tuple(embeds.shape)}"
            )
        return embeds, None

    def encode(self, pipe: Any, prompt: str) -> Embeds:
        """``prompt`` run through ``pipe``'s text encoder(s); ValueError when it has none."""
        missing = [name for name in self.parts if getattr(pipe, name) is None]
        if missing:
            raise ValueError(
                f"prompt={prompt!r}: this model was loaded with only the empty-prompt embedding "
                f"({PROMPT_EMBEDS_FILE}); other prompts need "
                f"{', '.join(p + '/' for p in self.parts)}"
            )
        return self._encode(pipe, prompt)

    def _encode(self, pipe: Any, prompt: str) -> Embeds:
        tokens = pipe.tokenizer(
            prompt,
            padding="max_length",
            max_length=pipe.tokenizer.model_max_length,
            truncation=True,
            return_tensors="pt",
        )
        mask = None
        if getattr(pipe.text_encoder.config, "use_attention_mask", False):
            mask = tokens.attention_mask.to(pipe.device)
        return pipe.text_encoder(tokens.input_ids.to(pipe.device), attention_mask=mask)[0], None

    def unet_kwargs(
        self, embeds: torch.Tensor, pooled: torch.Tensor | None, batch: int, size: tuple[int, int]
    ) -> dict[str, Any]:
        """The UNet's keyword arguments besides the sample and timestep, for ``batch`` images of
        ``size`` `(H, W)` input pixels: the prompt's embedding for each image."""
        return {"encoder_hidden_states": embeds.expand(batch, -1, -1)}

    def vae_upcast(self, vae: AutoencoderKL) -> bool:
        """Whether ``vae`` computes in float32 whatever the pipeline's dtype."""
        return False


class SDXLConditioning(SDConditioning):
    """SDXL-shaped UNets: the embedding `(1, L, D)` and the pooled embedding `(1, P)`, and the
    time ids of an uncropped image of the input side."""

    parts: ClassVar[tuple[str, ...]] = TEXT_PARTS + XL_TEXT_PARTS
    embeds: ClassVar[tuple[str, ...]] = ("prompt_embeds", "pooled_prompt_embeds")

    def __init__(self, unet_config: Any) -> None:
        super().__init__(unet_config)
        width = unet_config.projection_class_embeddings_input_dim
        self.pooled_width = width - SDXL_TIME_IDS * unet_config.addition_time_embed_dim

    def check(self, embeds: torch.Tensor, pooled: torch.Tensor | None) -> Embeds:
        embeds, _ = super().check(embeds, pooled)
        if pooled is None or pooled.reshape(-1).shape[0] != self.pooled_width:
            got = None if pooled is None else tuple(pooled.shape)
            raise ValueError(
                f"pooled_prompt_embeds must have shape (1, {self.pooled_width}) for this "
                f"SDXL-shaped UNet, got {got}"
            )
        return embeds, pooled.reshape(1, self.pooled_width)

    def _encode(self, pipe: Any, prompt: str) -> Embeds:
        # diffusers' own SDXL text conditioning, on the pipeline's modules (no copies).
        sdxl = StableDiffusionXLPipeline(
            pipe.vae,
            pipe.text_encoder,
            pipe.text_encoder_2,
            pipe.tokenizer,
            pipe.tokenizer_2,
            pipe.unet,
            pipe.scheduler,
            add_watermarker=False,
        )
        embeds, _, pooled, _ = sdxl.encode_prompt(
            prompt, device=pipe.device, do_classifier_free_guidance=False
        )
        return embeds, pooled

    def unet_kwargs(
        self, embeds: torch.Tensor, pooled: torch.Tensor | None, batch: int, size: tuple[int, int]
    ) -> dict[str, Any]:
        """As :class:`SDConditioning`'s, plus the pooled embedding and the time ids."""
        kwargs = super().unet_kwargs(embeds, pooled, batch, size)
        h, w = size
        time_ids = torch.tensor([[h, w, 0, 0, h, w]], device=embeds.device, dtype=embeds.dtype)
        kwargs["added_cond_kwargs"] = {
            "text_embeds": pooled.expand(batch, -1),
            "time_ids": time_ids.expand(batch, -1),
        }
        return kwargs

    def vae_upcast(self, vae: AutoencoderKL) -> bool:
        return bool(vae.config.get("force_upcast", False))


def conditioning_for(unet: Any) -> SDConditioning:
    """The conditioning of ``unet``'s family: SDXL's when its config takes the pooled text
    embedding and time ids (`addition_embed_type == "text_time"`), else SD 1.x's."""
    xl = unet.config.get("addition_embed_type") == "text_time"
    return (SDXLConditioning if xl else SDConditioning)(unet.config)
