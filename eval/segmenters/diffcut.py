"""``segmenter=diffcut``: DiffCut (Couairon et al., NeurIPS 2024), recursive normalised cut on the
UNet features of the last self-attention layer of the UNet encoder (``diffseg.diffcut``,
``diffseg.features``), captured in the pipeline's UNet pass (``DiffSegPipeline.unet_pass``), the
same pass as the self-attention maps. PAMR is the protocol's (``protocol.pamr``)."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from diffseg.diffcut import diffcut_segment
from diffseg.passes import DIFFCUT, PassSettings
from eval.segmenters.registry import SegmenterSettings, register


@dataclass
class DiffCutSettings(SegmenterSettings):
    """``tau`` (partition threshold) and ``alpha`` (affinity exponent): finite positive numbers;
    the UNet pass: ``timestep``, ``prompt``, ``noise``, ``seed`` (DiffCut's: 50, "", on, 42)."""

    tau: float = 0.5
    alpha: float = 10.0
    timestep: int = 50
    prompt: str = ""
    noise: bool = True
    seed: int | None = 42

    def __post_init__(self) -> None:
        for key in ("tau", "alpha"):
            value = getattr(self, key)
            if not (math.isfinite(value) and value > 0):
                raise ValueError(f"segmenter.{key} must be a finite positive number, got {value!r}")


@register("diffcut", schema=DiffCutSettings, features=True, score_size=True)
def diffcut(
    pipeline: Any,
    images: torch.Tensor,
    items: Sequence[Mapping[str, Any]],
    call: Mapping[str, Any],
) -> torch.Tensor:
    """DiffCut's labels ``(B, S, S)`` (on the CPU) for ``images (B, 3, H, W)``: ``S`` is the
    protocol's scoring side (call key ``score_resolution``) when it has one, else the input side
    ``resolution``. DiffCut's code upsamples its features straight to the scoring size
    (``generate_masks(mask_size=(128, 128))``); labels made at the input side and then
    subsampled take other pixels' assignments."""
    # DiffCut's numerics: its mixed precision and diffusers' attention, no DiffSeg capture.
    settings = PassSettings.of(call, numerics=DIFFCUT.name)
    features = pipeline.unet_pass(images, settings, features=True).features
    with torch.inference_mode():
        size = call.get("score_resolution") or call["resolution"]
        return diffcut_segment(features, size, call["alpha"], call["tau"]).cpu()
