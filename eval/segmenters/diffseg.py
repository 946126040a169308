"""``segmenter=diffseg``: DiffSeg's merging (``DiffSegPipeline.__call__``, every setting but
``name`` passed to it)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from diffseg.merge import FIRST_MERGE_DTYPES, check_merge_settings
from eval.segmenters.registry import AttentionSettings, register

# The official code merges in three iterations, each with its own KL threshold.
MERGE_ITERATIONS = 3


@dataclass
class DiffSegSettings(AttentionSettings):
    """``kl_threshold``: one positive value per merge iteration, or one value for all
    :data:`MERGE_ITERATIONS` (normalised to the list). The others: ``DiffSegPipeline.__call__``."""

    kl_threshold: Any = field(default_factory=lambda: [1.1] * MERGE_ITERATIONS)
    num_points: int = 16
    refine: bool = False
    first_merge_dtype: str = "float64"

    def __post_init__(self) -> None:
        k = self.kl_threshold
        if isinstance(k, int | float) and not isinstance(k, bool):
            self.kl_threshold = [k] * MERGE_ITERATIONS
        elif isinstance(k, Sequence) and not isinstance(k, str):
            self.kl_threshold = list(k)
        else:
            raise ValueError(
                "segmenter.kl_threshold must be a number (one threshold for the "
                f"{MERGE_ITERATIONS} merge iterations) or a list of one per iteration, got {k!r}"
            )
        if self.first_merge_dtype not in FIRST_MERGE_DTYPES:
            raise ValueError(
                f"segmenter.first_merge_dtype must be one of {list(FIRST_MERGE_DTYPES)}, got "
                f"{self.first_merge_dtype!r}"
            )

    def check(self, resolution: int, scale_factor: int = 8) -> None:
        check_merge_settings(resolution, self.num_points, self.kl_threshold, scale_factor)


@register("diffseg", schema=DiffSegSettings)
def diffseg(
    pipeline: Any,
    images: torch.Tensor,
    items: Sequence[Mapping[str, Any]],
    call: Mapping[str, Any],
) -> torch.Tensor:
    """DiffSeg's labels ``(B, R, R)`` for ``images (B, 3, H, W)``."""
    return pipeline(images, **{k: v for k, v in call.items() if k != "name"})
