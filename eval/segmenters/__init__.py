"""The segmenters ``python -m eval`` can run (``segmenter=NAME``, ``conf/segmenter/NAME.yaml``),
one module each, registered in ``eval.segmenters.registry``:

- ``diffseg`` (``eval.segmenters.diffseg``): DiffSeg's merging.
- ``kmeans_c`` / ``kmeans_s`` (``eval.segmenters.kmeans``): the paper's K-means baselines.
- ``diffcut`` (``eval.segmenters.diffcut``): DiffCut's recursive normalised cut.
"""

from __future__ import annotations

from eval.segmenters.kmeans import GT, gt_class_counts, image_seed
from eval.segmenters.registry import (
    EXTRA_DIR,
    SegmenterSettings,
    SharedPass,
    extra_segmenters,
    get,
    names,
    register,
    segment_all,
    segment_batch,
    segmenter_call,
    settings,
)

__all__ = [
    "EXTRA_DIR",
    "GT",
    "SegmenterSettings",
    "SharedPass",
    "extra_segmenters",
    "get",
    "gt_class_counts",
    "image_seed",
    "names",
    "register",
    "segment_all",
    "segment_batch",
    "segmenter_call",
    "settings",
]
