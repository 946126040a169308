"""``segmenter=kmeans_c`` / ``kmeans_s``: the paper's K-means baselines (Table 1, K-Means-C and
K-Means-S; our reading, see ``diffseg.kmeans``) over the same aggregated attention as DiffSeg
(``DiffSegPipeline.aggregate``).

``n_clusters`` is an int (K-Means-C: 6) or ``gt``: as many clusters as the image's ground truth
has classes (distinct labels other than -1, at least 1; K-Means-S). Each image's k-means++ draw is
seeded with ``seed + crc32(image id)``, so it depends on neither the batch, the order, a resume
nor how the images are split between processes.
"""

from __future__ import annotations

import zlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from diffseg.kmeans import kmeans_segment
from eval.segmenters.registry import AttentionSettings, register

GT = "gt"


@dataclass
class KMeansSettings(AttentionSettings):
    """``n_clusters``: a positive int, or ``gt`` (one cluster per ground-truth class)."""

    n_clusters: Any = 6

    def __post_init__(self) -> None:
        n = self.n_clusters
        if n != GT and (isinstance(n, bool) or not isinstance(n, int) or n < 1):
            raise ValueError(
                f"segmenter.n_clusters must be a positive int or '{GT}' (one cluster per "
                f"ground-truth class of the image), got {n!r}"
            )


def gt_class_counts(labels: Sequence[torch.Tensor]) -> list[int]:
    """Per label map ``(H, W)``: the number of distinct classes other than -1 (ignored), >= 1."""
    return [max(1, int(torch.unique(label[label != -1]).numel())) for label in labels]


def image_seed(seed: int, image_id: str) -> int:
    """The k-means++ seed of one image: ``seed + crc32(image id)``."""
    return seed + zlib.crc32(str(image_id).encode())


@register("kmeans_c", "kmeans_s", schema=KMeansSettings)
def kmeans(
    pipeline: Any,
    images: torch.Tensor,
    items: Sequence[Mapping[str, Any]],
    call: Mapping[str, Any],
) -> torch.Tensor:
    """K-means labels ``(B, R, R)`` of ``images (B, 3, H, W)``'s aggregated attention."""
    kwargs = {k: v for k, v in call.items() if k not in ("name", "n_clusters")}
    n_clusters = call["n_clusters"]
    if n_clusters == GT:
        n_clusters = gt_class_counts([item["label"] for item in items])
    seeds = [image_seed(kwargs["seed"], item["id"]) for item in items]
    aggregated = pipeline.aggregate(images, **kwargs)
    return kmeans_segment(aggregated, n_clusters, seeds, out_size=kwargs["resolution"])
