"""DiffSeg's steps after the attention: aggregation (`diffseg.aggregate`) and merging
(`diffseg.merge`), on whatever gives the per-resolution self-attention of a batch.

`DiffSegPipeline` runs the model for it; `PassSource` subclasses take the passes from elsewhere
(`eval.attention_cache.CachedAttentionPipeline` reads stored maps). All inherit `aggregate` and `__call__` from `AttentionSegmenter`, so they segment
the same way.
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
    `(B, r*r, r*r)`. features: DiffCut's UNet features `(B, C, h, w)` (`diffseg.features`), None
    when not captured.
    """

    attention: dict[int, torch.Tensor]
    features: torch.Tensor | None = None


class AttentionSegmenter:
    """Segments images from their attention: a subclass provides

    - `attention(images, timestep, resolution, prompt, noise, seed)`: resolution `r` (largest
      first) -> `(B, r*r, r*r)`, validating `resolution` itself;
    - `check_resolution(resolution)`: raises ValueError for an input side the model cannot take;
    - `attention_scale_factor`: input pixels per position of the largest self-attention map (8
      for Stable Diffusion 1.x, 16 for SDXL).

    The keyword settings mirror a diffusers pipeline call (and `conf/segmenter/diffseg.yaml`).
    """

    def aggregate(  # noqa: PLR0913 (diffusers' keyword-call style: conf/segmenter keys)
        self,
        images: Any,
        timestep: int = 300,
        weights: Sequence[float] | None = None,
        resolution: int = 512,
        prompt: str = "",
        noise: bool = False,
        seed: int = 0,
    ) -> torch.Tensor:
        """The aggregated self-attention `(B, S, S, S, S)` of a batch (`S = resolution /
        attention_scale_factor`: 8 for SD 1.x, 16 for SDXL).

        Everything `__call__` does before merging (same arguments, same meaning), for segmenters
        other than DiffSeg's merging (e.g. `diffseg.kmeans`). Stays on the attention's device.
        """
        attention = self.attention(images, timestep, resolution, prompt, noise, seed)
        with torch.inference_mode():
            return aggregate_attention(list(attention.values()), weights)

    def __call__(  # noqa: PLR0913 (diffusers' keyword-call style: conf/segmenter keys)
        self,
        images: Any,
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
        `noise`: add scheduler noise at `timestep` (one map seeded `seed`, the same for every image); off in
        the official method. `first_merge_dtype`: "float64" (exact KL) or "float16" (the official
        code's arithmetic for merge iteration 1; see `diffseg.merge.merge_attention`). Labels are
        returned on the CPU; intermediates stay on the device.
        """
        # Before the UNet pass: a bad merge setting would otherwise fail only after it.
        self.check_resolution(resolution)
        check_merge_settings(resolution, num_points, kl_threshold, self.attention_scale_factor)
        attention = self.attention(images, timestep, resolution, prompt, noise, seed)
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
    a subclass gives `unet_pass(images, timestep, resolution, prompt, noise, seed, features)`
    (`DiffSegPipeline.unet_pass`'s signature); `attention` is its attention, and every other
    attribute is the wrapped `pipeline`'s."""

    def __init__(self, pipeline: Any) -> None:
        self.pipeline = pipeline

    def __getattr__(self, name: str) -> Any:
        return getattr(self.pipeline, name)

    def attention(
        self,
        images: Any,
        timestep: int = 300,
        resolution: int = 512,
        prompt: str = "",
        noise: bool = False,
        seed: int = 0,
    ) -> dict[int, torch.Tensor]:
        """The attention of the subclass's `unet_pass`, without features (what `aggregate` and
        `__call__` read)."""
        return self.unet_pass(images, timestep, resolution, prompt, noise, seed, False).attention
