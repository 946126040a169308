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


@register("diffcut", schema=DiffCutSettings, features=True)
def diffcut(
    pipeline: Any,
    images: torch.Tensor,
    items: Sequence[Mapping[str, Any]],
    call: Mapping[str, Any],
) -> torch.Tensor:
    """DiffCut's labels ``(B, R, R)`` (on the CPU) for ``images (B, 3, H, W)``."""
    # DiffCut's numerics: its mixed precision and diffusers' attention, no DiffSeg capture.
    settings = PassSettings.of(call, numerics=DIFFCUT.name)
    features = pipeline.unet_pass(images, settings, features=True).features
    with torch.inference_mode():
        return diffcut_segment(features, call["resolution"], call["alpha"], call["tau"]).cpu()
