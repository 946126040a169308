"""The dataset registry: each dataset module registers its loader with everything else that is
known about the dataset, in one place (:func:`register`, a decorator on the loader).

A :class:`DatasetSpec` holds the loader, the schema of its config (the keys
``conf/dataset/NAME.yaml`` may hold: :class:`eval.schema.FileDatasetSettings` or a subclass),
the label map of the original label encoding with the class names (for tables of the same
labels, ``eval.datasets.sources``), the published split sizes and whether it reads files.
``conf/dataset/NAME.yaml`` names the loader in ``_target_`` and the dataset in ``name``; the
modules of this package are imported (and so register) on the first lookup of a name.
"""

from __future__ import annotations

import importlib
import pkgutil
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, fields
from typing import Any

import numpy as np

from eval.schema import NOT_LOADER_OPTIONS, FileDatasetSettings

# Label lookup table of the original encoding (``(256,)`` int64, -1 ignored, -2 undefined) and
# the class names, from the label options (``DatasetSpec.label_options``).
Labels = Callable[..., tuple[np.ndarray, Sequence[str]]]


@dataclass(frozen=True)
class DatasetSpec:
    """One dataset. ``loader(root=, split=, resolution=, **options)`` returns the dataset;
    ``schema``: the dataclass of its config keys; ``labels(**label_options)``: label lookup
    table and class names (None: no label files, so no table source either);
    ``label_options``: the options that change them; ``split_sizes``: published split -> images;
    ``files``: whether it reads files (else it needs no ``root`` and nothing to prepare)."""

    name: str
    loader: Callable[..., Any]
    schema: type = FileDatasetSettings
    labels: Labels | None = None
    label_options: tuple[str, ...] = ()
    split_sizes: Mapping[str, int] = field(default_factory=dict)
    files: bool = True

    @property
    def loader_options(self) -> tuple[str, ...]:
        """The keys of the schema the loader itself takes (beyond root, split, resolution)."""
        return tuple(f.name for f in fields(self.schema) if f.name not in NOT_LOADER_OPTIONS)


_SPECS: dict[str, DatasetSpec] = {}


def register(
    name: str,
    schema: type = FileDatasetSettings,
    labels: Labels | None = None,
    label_options: Sequence[str] = (),
    split_sizes: Mapping[str, int] | None = None,
    files: bool = True,
) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Decorator registering the loader it wraps as dataset ``name`` (see :class:`DatasetSpec`)."""

    def add(loader: Callable[..., Any]) -> Callable[..., Any]:
        spec = DatasetSpec(
            name, loader, schema, labels, tuple(label_options), dict(split_sizes or {}), files
        )
        old = _SPECS.get(name)
        where = (loader.__module__, loader.__qualname__)
        if old is not None and (old.loader.__module__, old.loader.__qualname__) != where:
            raise ValueError(f"dataset {name!r} is registered twice: {old.loader} and {loader}")
        _SPECS[name] = spec
        return loader

    return add


def _discover() -> None:
    """Import every module of this package: each registers its datasets."""
    package = __name__.rpartition(".")[0]
    for module in pkgutil.iter_modules(importlib.import_module(package).__path__):
        importlib.import_module(f"{package}.{module.name}")


def get(name: str) -> DatasetSpec:
    """The spec of dataset ``name``; ``ValueError`` naming the registered ones if unknown."""
    if name not in _SPECS:
        _discover()
    if name not in _SPECS:
        raise ValueError(f"unknown dataset {name!r}; choose one of {names()}")
    return _SPECS[name]


def names() -> list[str]:
    """Every registered dataset, sorted."""
    _discover()
    return sorted(_SPECS)
