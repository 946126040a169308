"""The segmenters ``python -m eval`` can run (``segmenter=NAME``, ``conf/segmenter/NAME.yaml``).

- ``diffseg``: DiffSeg's merging; every key but ``name`` goes to ``DiffSegPipeline.__call__``.
- ``kmeans_c`` / ``kmeans_s``: the paper's K-means baselines (Table 1, K-Means-C and K-Means-S;
  our reading, see ``diffseg.kmeans``) over the same aggregated attention
  (``DiffSegPipeline.aggregate``). ``n_clusters`` is an int (K-Means-C: 6) or ``gt``: as many
  clusters as the image's ground truth has classes (distinct labels other than -1, at least 1;
  K-Means-S). Each image's k-means++ draw is seeded with ``seed + crc32(image id)``, so it depends
  on neither the batch, the order, a resume nor how the images are split between processes.
"""

from __future__ import annotations

import zlib
from collections.abc import Mapping, Sequence
from typing import Any

import torch

from diffseg.kmeans import kmeans_segment
from diffseg.merge import check_merge_settings

SEGMENTERS = ("diffseg", "kmeans_c", "kmeans_s")
KMEANS_KEYS = ("timestep", "weights", "prompt", "noise", "n_clusters", "seed")
GT = "gt"


def segmenter_call(segmenter: Mapping[str, Any], resolution: int, seed: int) -> dict[str, Any]:
    """The checked call settings for :func:`segment_batch` from ``cfg.segmenter`` (a plain dict).

    Everything that can be checked without the model is (``diffseg``: the merge settings against
    ``resolution``, :func:`diffseg.merge.check_merge_settings`), so a bad value fails before it loads.

    ``seed`` (the run's) is used unless the segmenter config sets its own.
    """
    name = segmenter.get("name")
    if name not in SEGMENTERS:
        raise ValueError(f"segmenter.name={name!r} is unknown; choose one of {list(SEGMENTERS)}")
    call = {"seed": seed, **segmenter, "resolution": resolution}
    if name == "diffseg":
        # Checked here, before the model loads (SD 1.4: 4 GB), rather than after its first pass.
        merge = {k: call[k] for k in ("num_points", "kl_threshold") if k in call}
        check_merge_settings(resolution, **merge)
        return call
    unknown = sorted(set(segmenter) - {"name", *KMEANS_KEYS})
    if unknown:
        raise ValueError(
            f"segmenter={name} does not take {unknown} (DiffSeg merging settings); it takes "
            f"{list(KMEANS_KEYS)}"
        )
    n = segmenter.get("n_clusters")
    if n != GT and (isinstance(n, bool) or not isinstance(n, int) or n < 1):
        raise ValueError(
            f"segmenter.n_clusters must be a positive int or '{GT}' (one cluster per ground-truth "
            f"class of the image), got {n!r}"
        )
    return call


def gt_class_counts(labels: Sequence[torch.Tensor]) -> list[int]:
    """Per label map ``(H, W)``: the number of distinct classes other than -1 (ignored), >= 1."""
    return [max(1, int(torch.unique(label[label != -1]).numel())) for label in labels]


def image_seed(seed: int, image_id: str) -> int:
    """The k-means++ seed of one image: ``seed + crc32(image id)``."""
    return seed + zlib.crc32(str(image_id).encode())


def segment_batch(
    pipeline: Any,
    images: torch.Tensor,
    items: Sequence[Mapping[str, Any]],
    call: Mapping[str, Any],
) -> torch.Tensor:
    """Labels ``(B, resolution, resolution)`` for ``images (B, 3, H, W)`` with the call settings.

    ``items``: the dataset items of the batch (their ``id``, and their ``label`` for
    ``n_clusters=gt``). A ``call`` without ``name`` is DiffSeg's.
    """
    kwargs = {k: v for k, v in call.items() if k != "name"}
    if call.get("name", "diffseg") == "diffseg":
        return pipeline(images, **kwargs)
    n_clusters = kwargs.pop("n_clusters")
    if n_clusters == GT:
        n_clusters = gt_class_counts([item["label"] for item in items])
    seeds = [image_seed(kwargs["seed"], item["id"]) for item in items]
    aggregated = pipeline.aggregate(images, **kwargs)
    return kmeans_segment(aggregated, n_clusters, seeds, out_size=kwargs["resolution"])
