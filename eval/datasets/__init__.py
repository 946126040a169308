"""Benchmark datasets: ``build(cfg.dataset)`` or ``get_dataset(name, root, split, resolution, **options)``.

Every dataset yields dicts ``image`` float ``(3, H, W)`` in [0, 1], ``label`` int64 ``(H, W)``
with classes ``0..C-1`` and -1 ignored, ``id`` str, and has ``class_names``, ``n_class`` and a
``skipped`` counter.  The label conventions are documented in each module; each module registers
its datasets (``eval.datasets.registry``), ``conf/dataset/NAME.yaml`` configures one.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

from torch.utils.data import Dataset

from eval.datasets import registry
from eval.datasets.base import DataFileError, SplitSizeWarning, collate
from eval.schema import NOT_LOADER_OPTIONS, given, validate


def check_options(cfg: Mapping[str, Any]) -> tuple[Any, registry.DatasetSpec, dict[str, Any]]:
    """``cfg.dataset`` (resolved, plain) checked against its dataset's registered schema, before
    any file is read: ``(its _target_ loader or None, the dataset's spec, the checked values)``."""
    loader = None
    if cfg.get("_target_"):
        from hydra.utils import get_method

        loader = get_method(cfg["_target_"])  # importing its module registers the dataset
    spec = registry.get(cfg.get("name"))
    checked = validate(spec.schema, cfg, "dataset", f"{spec.name}: unknown dataset options")
    return loader, spec, given(checked, cfg)


def build(cfg: Mapping[str, Any]) -> Dataset:
    """The dataset a ``cfg.dataset`` mapping (resolved, plain) describes.

    The keys are checked against the dataset's registered schema (unknown keys and bad values are
    one-line errors naming them), then its loader, ``cfg["_target_"]`` (default: the registered
    one; a module outside this package registers its dataset when this imports it), is called
    with ``root``, ``split``, ``resolution`` and the loader options: ``on_error``
    ("raise" or "skip"), ``antialias`` (image resize, default False as the official TF2 resize),
    ``keep_size`` (no crop or resize), ``jpeg_decoder`` ("tf", default: as the official pipeline's
    ``tf.io.decode_jpeg``; "pil": Pillow, as DiffCut), and those of one dataset (the synthetic
    dataset's ``length``, ``seed``, ``n_class``, ...). Keys for ``eval.tools.prepare`` (``sources``,
    ``manual_steps``) and ``title`` are accepted and not used here.

    ``cache=True`` reads the preprocessed Arrow cache under ``cache_dir`` (default
    ``ROOT/.cache``; built first when absent or stale; ``cache_dtype`` "float32" exact or
    "uint8"); ``source="parquet:GLOB"`` or ``"hf:REPO_ID"`` reads the pairs from a table instead
    of the files, ``columns`` mapping its column names, its download cache under
    ``cache_dir/hf`` (see ``eval.datasets.cache`` and ``eval.datasets.sources``).
    """
    loader, spec, values = check_options(cfg)
    name = spec.name
    options = {k: v for k, v in values.items() if k not in NOT_LOADER_OPTIONS}
    root, split, source = values.get("root"), values.get("split", "val"), values.get("source")
    resolution, columns = values.get("resolution", 512), values.get("columns")
    cache_dir = values.get("cache_dir")
    if spec.files and root is None and source is None:
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
        data = (loader or spec.loader)(root=root, resolution=resolution, **kwargs, **options)
    if not values.get("cache"):
        return data
    from eval.datasets.cache import cached

    on_error = options.get("on_error", "raise")
    dtype = values.get("cache_dtype", "float32")
    return cached(
        data, root, name, split, resolution, source, columns, dtype, on_error, cache_dir=cache_dir
    )


def get_dataset(
    name: str,
    root: str | os.PathLike | None = None,
    split: str | None = "val",
    resolution: int = 512,
    **options: Any,
) -> Dataset:
    """Dataset ``name`` from ``root``: :func:`build` of these keys (a whole ``cfg.dataset`` can be
    passed as keywords)."""
    return build({"name": name, "root": root, "split": split, "resolution": resolution, **options})


__all__ = [
    "DataFileError",
    "SplitSizeWarning",
    "build",
    "check_options",
    "collate",
    "get_dataset",
    "registry",
]
