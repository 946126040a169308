"""The segmenters ``python -m eval`` can run (``segmenter=NAME``, ``conf/segmenter/NAME.yaml``),
one module each, registered in ``eval.segmenters.registry``:

- ``diffseg`` (``eval.segmenters.diffseg``): DiffSeg's merging.
- ``kmeans_c`` / ``kmeans_s`` (``eval.segmenters.kmeans``): the paper's K-means baselines.
"""

from __future__ import annotations

from eval.segmenters.kmeans import GT, gt_class_counts, image_seed
from eval.segmenters.registry import (
    SegmenterSettings,
    get,
    names,
    register,
    segment_batch,
    segmenter_call,
    settings,
)

__all__ = [
    "GT",
    "SegmenterSettings",
    "get",
    "gt_class_counts",
    "image_seed",
    "names",
    "register",
    "segment_batch",
    "segmenter_call",
    "settings",
]
