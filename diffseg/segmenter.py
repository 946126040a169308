"""DiffSeg's steps after the attention: aggregation (`diffseg.aggregate`) and merging
(`diffseg.merge`), on whatever gives the per-resolution self-attention of a batch.

`DiffSegPipeline` runs the model for it; `PassSource` subclasses take the passes from elsewhere
(`eval.models.attention_cache.CachedAttentionPipeline` reads stored maps). All inherit `attention`,
`aggregate` and `__call__` from `AttentionSegmenter`, so they segment the same way; a pass's
settings are one `diffseg.passes.PassSettings`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from diffseg.aggregate import aggregate_attention
from diffseg.merge import (
    check_merge_settings,
    merge_attention,
    proposals_to_labels,
    segment_attention,
)
from diffseg.passes import DEFAULT_PASS, PLAIN, PassSettings


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


@dataclass
class UNetPass:
    """What one UNet pass of a batch gives the segmenters.

    attention: resolution `r` (largest first) -> block- and head-averaged self-attention
    `(B, r*r, r*r)`; empty for a pass that captures none (`diffseg.passes.Numerics`). features:
    DiffCut's UNet features `(B, C, h, w)` (`diffseg.features`), None when not captured.
    """

    attention: dict[int, torch.Tensor]
    features: torch.Tensor | None = None


class AttentionSegmenter:
    """Segments images from their attention: a subclass provides

    - `unet_pass(images, settings, features)`: the `UNetPass` of a batch under `PassSettings`
      (`DiffSegPipeline.unet_pass`), validating `settings.resolution` itself;
    - `check_resolution(resolution)`: raises ValueError for an input side the model cannot take;
    - `attention_scale_factor`: input pixels per position of the largest self-attention map (8
      for Stable Diffusion 1.x, 16 for SDXL).

    `aggregate` and `__call__` take the pass settings as keywords (`PassSettings`' fields: the
    keys of `conf/segmenter/diffseg.yaml`), as a diffusers pipeline call does.
    """

    def attention(
        self, images: Any, settings: PassSettings = DEFAULT_PASS
    ) -> dict[int, torch.Tensor]:
        """Resolution `r` (largest first) -> self-attention `(B, r*r, r*r)`: the subclass's
        `unet_pass` without features."""
        if not settings.arithmetic.capture:
            raise ValueError(
                f"numerics={settings.numerics!r} runs diffusers' own attention and captures none; "
                f"DiffSeg's attention needs numerics={PLAIN.name!r}"
            )
        return self.unet_pass(images, settings, features=False).attention

    def aggregate(
        self, images: Any, *, weights: Sequence[float] | None = None, **pass_settings: Any
    ) -> torch.Tensor:
        """The aggregated self-attention `(B, S, S, S, S)` of a batch (`S = resolution /
        attention_scale_factor`: 8 for SD 1.x, 16 for SDXL).

        Everything `__call__` does before merging (same arguments, same meaning), for segmenters
        other than DiffSeg's merging (e.g. `diffseg.kmeans`). Stays on the attention's device.
        """
        attention = self.attention(images, PassSettings(**pass_settings))
        with torch.inference_mode():
            return aggregate_attention(list(attention.values()), weights)

    def __call__(  # noqa: PLR0913 (diffusers' keyword-call style: conf/segmenter keys)
        self,
        images: Any,
        *,
        kl_threshold: Sequence[float] = (1.1, 1.1, 1.1),
        num_points: int = 16,
        refine: bool = False,
        weights: Sequence[float] | None = None,
        return_intermediates: bool = False,
        first_merge_dtype: str = "float64",
        **pass_settings: Any,
    ) -> torch.Tensor | DiffSegOutput:
        """Segment a batch: `(B, 3, H, W)` in [0, 1] or PIL images -> labels `(B, res, res)`.

        `pass_settings`: `PassSettings`' fields (`timestep=300, resolution=512, prompt="",
        noise=False, seed=0`: `noise` adds one scheduler noise map seeded `seed`, the same for
        every image, off in the official method). `weights`: aggregation weight per resolution,
        largest resolution first (default r/sum(r)). `first_merge_dtype`: "float64" (exact KL) or
        "float16" (the official code's arithmetic for merge iteration 1; see
        `diffseg.merge.merge_attention`). Labels are returned on the CPU; intermediates stay on
        the device.
        """
        settings = PassSettings(**pass_settings)
        resolution = settings.resolution
        # Before the UNet pass: a bad merge setting would otherwise fail only after it.
        self.check_resolution(resolution)
        check_merge_settings(resolution, num_points, kl_threshold, self.attention_scale_factor)
        attention = self.attention(images, settings)
        with torch.inference_mode():
            aggregated = aggregate_attention(list(attention.values()), weights)
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


class PassSource(AttentionSegmenter):
    """A pipeline whose UNet passes come from elsewhere (a cache, a memo of the batch's passes):
    a subclass gives `unet_pass(images, settings, features)` (`DiffSegPipeline.unet_pass`'s
    signature); every other attribute is the wrapped `pipeline`'s."""

    def __init__(self, pipeline: Any) -> None:
        self.pipeline = pipeline

    def __getattr__(self, name: str) -> Any:
        return getattr(self.pipeline, name)
