"""Benchmark datasets: ``get_dataset(name, root, split, resolution, **options)``.

Every dataset yields dicts ``image`` float ``(3, H, W)`` in [0, 1], ``label`` int64 ``(H, W)``
with classes ``0..C-1`` and -1 ignored, ``id`` str, and has ``class_names``, ``n_class`` and a
``skipped`` counter.  The label conventions are documented in each module.
"""

from __future__ import annotations

from collections.abc import Callable

from torch.utils.data import Dataset

from eval.datasets.ade20k import ade20k
from eval.datasets.base import DataFileError, SplitSizeWarning, collate
from eval.datasets.cityscapes import cityscapes
from eval.datasets.coco import coco_object, coco_stuff27
from eval.datasets.synthetic import synthetic
from eval.datasets.voc import pascal_context59, voc

DATASETS: dict[str, Callable[..., Dataset]] = {
    "coco_stuff27": coco_stuff27,
    "cityscapes": cityscapes,
    "ade20k": ade20k,
    "voc": voc,
    "pascal_context59": pascal_context59,
    "coco_object": coco_object,
    "synthetic": synthetic,
}
# Keys of conf/dataset/*.yaml that only eval.prepare reads.
PREPARE_KEYS = ("name", "sources", "manual_steps")
FILE_OPTIONS = ("on_error", "antialias", "keep_size")
SYNTHETIC_OPTIONS = ("length", "seed", "n_class", "regions", "noise", "texture", "on_error")


def get_dataset(
    name: str, root=None, split: str | None = "val", resolution: int = 512, **options
) -> Dataset:
    """Build dataset ``name`` from ``root``.

    ``options``: ``on_error`` ("raise" or "skip"), ``antialias`` (image resize, default False as
    the official TF2 resize), ``keep_size`` (no crop or resize); the synthetic dataset takes
    ``length``, ``seed``, ``n_class``, ``regions``, ``noise``, ``texture`` instead.  Keys only
    ``eval.prepare`` uses (``sources``, ``manual_steps``) are accepted and ignored, so a whole
    ``cfg.dataset`` minus ``kl_threshold`` can be passed.
    """
    if name not in DATASETS:
        raise ValueError(f"unknown dataset {name!r}; choose one of {sorted(DATASETS)}")
    options = {k: v for k, v in options.items() if k not in PREPARE_KEYS}
    allowed = SYNTHETIC_OPTIONS if name == "synthetic" else FILE_OPTIONS
    unknown = sorted(set(options) - set(allowed))
    if unknown:
        raise ValueError(f"{name}: unknown dataset options {unknown}; accepted: {list(allowed)}")
    if name != "synthetic" and root is None:
        raise ValueError(f"{name}: root is required (set dataset.root=PATH)")
    kwargs = {} if split is None else {"split": split}
    return DATASETS[name](root=root, resolution=resolution, **kwargs, **options)


__all__ = ["DATASETS", "DataFileError", "SplitSizeWarning", "collate", "get_dataset"]
