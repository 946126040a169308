"""Benchmark datasets: ``get_dataset(name, root, split, resolution, **options)``.

Every dataset yields dicts ``image`` float ``(3, H, W)`` in [0, 1], ``label`` int64 ``(H, W)``
with classes ``0..C-1`` and -1 ignored, ``id`` str, and has ``class_names``, ``n_class`` and a
``skipped`` counter.  The label conventions are documented in each module.
"""

from __future__ import annotations

import os
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
# Keys of conf/dataset/*.yaml that are not loader options: eval.prepare's.
CONFIG_ONLY_KEYS = ("name", "sources", "manual_steps")
FILE_OPTIONS = ("on_error", "antialias", "keep_size", "jpeg_decoder")
# Options of one dataset only.
DATASET_OPTIONS = {"pascal_context59": ("background",)}
SYNTHETIC_OPTIONS = ("length", "seed", "n_class", "regions", "noise", "texture", "on_error")
# Keys every dataset accepts: the preprocessed cache (eval/datasets/cache.py) and Parquet/hub
# sources (eval/datasets/sources.py).
CACHE_OPTIONS = ("cache", "cache_dtype", "cache_dir", "source", "columns")


def get_dataset(
    name: str,
    root: str | os.PathLike | None = None,
    split: str | None = "val",
    resolution: int = 512,
    cache: bool = False,
    source: str | None = None,
    **options,
) -> Dataset:
    """Build dataset ``name`` from ``root``.

    ``options``: ``on_error`` ("raise" or "skip"), ``antialias`` (image resize, default False as
    the official TF2 resize), ``keep_size`` (no crop or resize), ``jpeg_decoder`` ("tf", default:
    as the official pipeline's ``tf.io.decode_jpeg``; "pil": Pillow, as DiffCut); the synthetic
    dataset takes ``length``, ``seed``, ``n_class``, ``regions``, ``noise``, ``texture`` instead
    (and ignores ``jpeg_decoder`` and ``keep_size``, which ``protocol=diffcut`` sets for every dataset).  Config keys
    that are not loader options (``sources``, ``manual_steps``) are accepted
    and ignored, so a whole ``cfg.dataset`` can be passed.

    ``cache=True`` reads the preprocessed Arrow cache under ``cache_dir`` (default
    ``ROOT/.cache``; built first when absent or stale; ``cache_dtype`` "float32" exact or
    "uint8"); ``source="parquet:GLOB"`` or ``"hf:REPO_ID"`` reads the pairs from a table instead
    of the files, ``columns`` mapping its column names, its download cache under
    ``cache_dir/hf`` (see ``eval.datasets.cache`` and ``eval.datasets.sources``).
    """
    if name not in DATASETS:
        raise ValueError(f"unknown dataset {name!r}; choose one of {sorted(DATASETS)}")
    options = {k: v for k, v in options.items() if k not in CONFIG_ONLY_KEYS}
    if name == "synthetic":
        # Generated square at `resolution`, never encoded: the loader never crops or decodes.
        options.pop("jpeg_decoder", None)
        options.pop("keep_size", None)
    cache_dtype = options.pop("cache_dtype", "float32")
    cache_dir = options.pop("cache_dir", None)
    columns = options.pop("columns", None)
    allowed = SYNTHETIC_OPTIONS if name == "synthetic" else FILE_OPTIONS
    allowed = (*allowed, *DATASET_OPTIONS.get(name, ()))
    unknown = sorted(set(options) - set(allowed))
    if unknown:
        allowed = [*allowed, *CACHE_OPTIONS]
        raise ValueError(f"{name}: unknown dataset options {unknown}; accepted: {allowed}")
    if name != "synthetic" and root is None and source is None:
        raise ValueError(f"{name}: root is required (set dataset.root=PATH)")
    if source is not None:
        from eval.datasets.cache import cache_root, check_writable
        from eval.datasets.sources import from_source

        # The table's download and Arrow cache goes with the dataset caches (neither set: the
        # hub's own default).
        hf_cache = None
        if root is not None or cache_dir is not None:
            hf_cache = cache_root(name, root, cache_dir) / "hf"
            check_writable(hf_cache, name)
        data = from_source(name, source, split, resolution, columns, hf_cache, **options)
    else:
        kwargs = {} if split is None else {"split": split}
        data = DATASETS[name](root=root, resolution=resolution, **kwargs, **options)
    if not cache:
        return data
    from eval.datasets.cache import cached

    on_error = options.get("on_error", "raise")
    return cached(
        data, root, name, split, resolution, source, columns, cache_dtype, on_error,
        cache_dir=cache_dir,
    )  # fmt: skip


__all__ = ["DATASETS", "DataFileError", "SplitSizeWarning", "collate", "get_dataset"]
