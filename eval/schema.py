"""Structured-config schemas: what each part of the composed config may hold, checked before any
data or model is touched.

A schema is a dataclass: its fields are the keys a config section accepts, typed (OmegaConf checks
and converts the values, ``OmegaConf.structured``), and its ``__post_init__`` checks what a type
cannot say (a positive int, one of a few names). :func:`validate` applies one to a plain mapping
and turns every failure into one line naming the key and the value. The sections' schemas:

* the run's own scalars (``limit``, ``batch_size``, ...): :class:`RunSettings` here;
* ``protocol``: :class:`eval.scoring.protocol.Protocol`;
* ``dataset``: the dataset's registered schema (``eval.datasets.registry``, base classes below);
* ``segmenter``: the segmenter's registered schema (``eval.segmenters``).

Torch-free: the run checks its config before importing the model's stack.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, TypeVar

from omegaconf import MISSING, DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

T = TypeVar("T")


def validate(
    schema: type[T], values: Mapping[str, Any], section: str, unknown: str | None = None
) -> T:
    """``values`` (a plain mapping) checked against the dataclass ``schema``: the instance.

    ``section`` prefixes the keys in messages (``segmenter`` -> ``segmenter.num_points``; empty
    for top-level keys); ``unknown``: the start of the message for keys the schema lacks (default
    ``unknown SECTION keys``). Raises ``ValueError`` with one line naming the key and the value.
    """
    known = [f.name for f in dataclasses.fields(schema)]
    extra = sorted(set(values) - set(known))
    if extra:
        what = unknown or f"unknown {section or 'config'} keys"
        raise ValueError(f"{what} {extra}; accepted: {known}")
    try:
        return OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(schema), dict(values)))
    except OmegaConfBaseException as e:
        # OmegaConf's message is several lines (key, object type); the first says what is wrong.
        key = f"{section}.{e.full_key}" if section else e.full_key
        raise ValueError(f"{key}: {str(e).splitlines()[0]}") from None


def given(settings: Any, values: Mapping[str, Any]) -> dict[str, Any]:
    """The keys of ``values`` with the checked (converted, normalised) values of ``settings``."""
    return {k: getattr(settings, k) for k in values}


def positive_int(key: str, value: Any, allow_none: bool = False) -> None:
    """``value`` is an int >= 1 (or None when ``allow_none``), else ``ValueError`` naming ``key``."""
    if value is None and allow_none:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        extra = " or null (all)" if allow_none else ""
        raise ValueError(f"{key} must be a positive integer{extra}, got {value!r}")


def non_negative_int(key: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"{key} must be an integer >= 0, got {value!r}")


@dataclass
class RunSettings:
    """The run's own scalars (``conf/config.yaml``) that decide how much is done and how."""

    seed: int = 0
    limit: int | None = None
    batch_size: int = 1
    num_workers: int = 2
    n_qualitative: int = 8

    def __post_init__(self) -> None:
        positive_int("limit", self.limit, allow_none=True)
        positive_int("batch_size", self.batch_size)
        non_negative_int("num_workers", self.num_workers)
        non_negative_int("n_qualitative", self.n_qualitative)


def check_run(cfg: DictConfig | Mapping[str, Any]) -> RunSettings:
    """The run's scalars of the composed config ``cfg`` checked (:class:`RunSettings`)."""
    keys = [f.name for f in dataclasses.fields(RunSettings)]
    values = {k: cfg[k] for k in keys if k in cfg}
    return validate(RunSettings, values, "")


# ----------------------------------------------------------------------------------------------
# Datasets: the keys every dataset config has, and those of the datasets read from files


@dataclass
class DatasetSettings:
    """Keys of every ``conf/dataset/*.yaml``. ``_target_``: the loader (``build`` calls it with the
    loader options); ``title``: the name tables print; ``sources`` and ``manual_steps``: how
    ``eval.tools.prepare`` gets the files. Everything else configures the loader and its cache."""

    name: str = MISSING
    _target_: str | None = None
    title: str | None = None
    root: str | None = None
    split: str | None = "val"
    resolution: int = 512
    on_error: str = "raise"
    cache: bool = False
    cache_dtype: str = "float32"
    cache_dir: str | None = None
    source: str | None = None
    columns: dict[str, str] | None = None
    sources: list[Any] | None = None
    manual_steps: str | None = None

    def __post_init__(self) -> None:
        positive_int("dataset.resolution", self.resolution)


@dataclass
class FileDatasetSettings(DatasetSettings):
    """A dataset read from image and label files (or a table of them): preprocessing options."""

    antialias: bool = False
    keep_size: bool = False
    jpeg_decoder: str = "tf"


# Keys that say what the dataset is called and where its files are or come from, not what is
# computed from them: not loader options, not settings of a run (neither pinned nor recorded).
NOT_SETTINGS = ("_target_", "title", "root", "cache_dir", "sources", "manual_steps")
# Keys that are no option of the loader itself (build() handles them).
NOT_LOADER_OPTIONS = (
    *("name", "_target_", "title", "sources", "manual_steps"),
    *("root", "split", "resolution", "cache", "cache_dtype", "cache_dir", "source", "columns"),
)
