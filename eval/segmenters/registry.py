"""The segmenter registry: each segmenter module registers a segment function with the schema of
its settings (:func:`register`); ``conf/segmenter/NAME.yaml`` holds the settings of segmenter
``name``. The modules of this package are imported (and so register) on the first lookup.

:func:`settings` checks a ``cfg.segmenter`` against its schema and normalises it (what the ledger
records); :func:`segmenter_call` adds what the run decides (input side, seed) and the checks that
need the input side, all before the model loads; :func:`segment_batch` runs the segmenter.
"""

from __future__ import annotations

import importlib
import pkgutil
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from omegaconf import MISSING, OmegaConf

from diffseg.passes import PassSettings
from diffseg.segmenter import PassSource, UNetPass
from eval.schema import given, validate

# (pipeline, images (B, 3, H, W), the batch's dataset items, call settings) -> labels (B, R, R).
Segment = Callable[
    [Any, torch.Tensor, Sequence[Mapping[str, Any]], Mapping[str, Any]], torch.Tensor
]


@dataclass
class SegmenterSettings:
    """Base of the segmenter schemas: the keys of ``conf/segmenter/NAME.yaml``, typed and
    checked; ``__post_init__`` normalises what the call must get in one form."""

    name: str = MISSING

    def check(self, resolution: int, scale_factor: int = 8) -> None:
        """The checks that need the model input side ``resolution`` and the model's input pixels
        per position of its largest attention map ``scale_factor`` (none here)."""


@dataclass
class AttentionSettings(SegmenterSettings):
    """Segmenters over ``DiffSegPipeline``'s aggregated self-attention: the UNet pass's settings
    (``DiffSegPipeline.aggregate``). ``seed``: the run's unless set."""

    timestep: int = 300
    weights: list[float] | None = None
    prompt: str = ""
    noise: bool = False
    seed: int | None = None


@dataclass(frozen=True)
class SegmenterSpec:
    """One segmenter: its ``name`` (``segmenter.name``), settings ``schema`` and ``segment``;
    ``features``: whether it reads DiffCut's UNet features (``DiffSegPipeline.unet_pass``);
    ``score_size``: whether it makes its labels at the protocol's scoring side when there is one
    (call key ``score_resolution``, as DiffCut's code makes its masks), not at the input side."""

    name: str
    schema: type
    segment: Segment
    features: bool = False
    score_size: bool = False


_SPECS: dict[str, SegmenterSpec] = {}


def register(
    *names: str, schema: type, features: bool = False, score_size: bool = False
) -> Callable[[Segment], Segment]:
    """Decorator registering the segment function it wraps under ``names`` with ``schema``;
    ``features``, ``score_size``: see :class:`SegmenterSpec`."""

    def add(segment: Segment) -> Segment:
        for name in names:
            old = _SPECS.get(name)
            if old is not None and old.segment.__qualname__ != segment.__qualname__:
                raise ValueError(f"segmenter {name!r} is registered twice")
            _SPECS[name] = SegmenterSpec(name, schema, segment, features, score_size)
        return segment

    return add


def _discover() -> None:
    """Import every module of this package: each registers its segmenters."""
    package = __name__.rpartition(".")[0]
    for module in pkgutil.iter_modules(importlib.import_module(package).__path__):
        importlib.import_module(f"{package}.{module.name}")


def get(name: Any) -> SegmenterSpec:
    """The spec of segmenter ``name``; ``ValueError`` naming the registered ones if unknown."""
    if name not in _SPECS:
        _discover()
    if name not in _SPECS:
        raise ValueError(f"segmenter.name={name!r} is unknown; choose one of {names()}")
    return _SPECS[name]


def names() -> list[str]:
    """Every registered segmenter, sorted."""
    _discover()
    return sorted(_SPECS)


def _checked(segmenter: Mapping[str, Any]) -> Any:
    name = segmenter.get("name")
    spec = get(name)
    return validate(spec.schema, segmenter, "segmenter", f"segmenter={name} does not take")


def settings(segmenter: Mapping[str, Any]) -> dict[str, Any]:
    """``cfg.segmenter`` (a plain dict) checked and normalised, with the same keys (e.g. DiffSeg's
    scalar ``kl_threshold`` as one value per merge iteration): what the call gets and the ledger
    records."""
    return given(_checked(segmenter), segmenter)


def segmenter_call(
    segmenter: Mapping[str, Any],
    resolution: int,
    seed: int,
    where: str = "segmenter",
    scale_factor: int = 8,
) -> dict[str, Any]:
    """The checked call settings for :func:`segment_batch` from ``cfg.segmenter`` (a plain dict):
    :func:`settings`, checked against the input side ``resolution`` (DiffSeg: the merge settings,
    :func:`diffseg.merge.check_merge_settings`), so a bad value fails before the model loads.
    Once the model is loaded, ``scale_factor`` (its ``attention_scale_factor``: 16 for SDXL) checks
    them again for that model.

    ``seed`` (the run's) is used unless the segmenter config sets its own. ``where``: the config
    key of the segmenter (``segmenters.KEY`` for an added one), named by any error.
    """
    checked = check(segmenter, resolution, where, scale_factor)
    return {"seed": seed, **given(checked, segmenter), "resolution": resolution}


def check(
    segmenter: Mapping[str, Any] | SegmenterSettings,
    resolution: int,
    where: str = "segmenter",
    scale_factor: int = 8,
) -> SegmenterSettings:
    """``cfg.segmenter`` (a plain dict) checked against its schema and the input side (the
    checked settings); given checked settings, only the checks for the input side and
    ``scale_factor`` (once the model is loaded). Errors as :func:`segmenter_call`'s."""
    given_checked = isinstance(segmenter, SegmenterSettings)
    name = segmenter.name if given_checked else segmenter.get("name")
    try:
        checked = segmenter if given_checked else _checked(segmenter)
        checked.check(resolution, scale_factor)
    except ValueError as e:
        if where == "segmenter":
            raise
        raise ValueError(f"{where} (segmenter={name}): {e}") from None
    return checked


# Sub-folder of a run holding the folders of its `segmenters:` (one each, named by its key).
EXTRA_DIR = "segmenters"


def extra_segmenters(segmenters: Any) -> dict[str, dict[str, Any]]:
    """``cfg.segmenters`` (key -> a segmenter config, each added with
    ``+segmenter@segmenters.KEY=NAME``) as plain dicts; None or empty: none. The key names the
    segmenter's sub-folder of the run, so it must be a plain file name."""
    out = OmegaConf.to_container(segmenters, resolve=True) if segmenters else {}
    for key, value in out.items():
        if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]*", str(key)) or not isinstance(value, dict):
            raise ValueError(
                f"segmenters.{key}: each entry needs a plain name (letters, digits, _ . -) and a "
                f"segmenter config; add one with +segmenter@segmenters.NAME=SEGMENTER, got {value!r}"
            )
    return out


def segment_batch(
    pipeline: Any,
    images: torch.Tensor,
    items: Sequence[Mapping[str, Any]],
    call: Mapping[str, Any],
) -> torch.Tensor:
    """Labels ``(B, resolution, resolution)`` for ``images (B, 3, H, W)`` with the call settings.

    ``items``: the dataset items of the batch (their ``id``; their ``label`` for segmenters that
    take ground-truth counts). A ``call`` without ``name`` is DiffSeg's.
    """
    return get(call.get("name", "diffseg")).segment(pipeline, images, items, call)


class SharedPass(PassSource):
    """A pipeline whose UNet passes are computed once per images and pass setting and then
    reused, for several segmenters on one batch; every other attribute is the pipeline's.

    ``features``: capture DiffCut's features in every pass (when any of the segmenters reads
    them; off otherwise, so DiffSeg's pass stays hook-free, e.g. for a compiled UNet). The
    setting is one ``diffseg.passes.PassSettings`` (the seed in it only with noise). Segmenting the
    reused pass gives the labels of a pass of one's own: a pass depends on nothing but its
    setting and the images. Keep one per batch: the memo holds its passes.
    """

    def __init__(self, pipeline: Any, features: bool = False) -> None:
        super().__init__(pipeline)
        self.features = features
        self.passes: dict[tuple, UNetPass] = {}
        self.images: list[Any] = []  # held, so that their ids in the keys stay theirs

    def unet_pass(self, images: Any, settings: PassSettings, features: bool = True) -> UNetPass:
        """The pipeline's ``unet_pass``, computed on the first request for these images and
        setting; a request for features the memo's passes lack is an error (set ``features``)."""
        if features and not self.features:
            raise ValueError("SharedPass(features=False) was asked for the UNet features")
        key = (id(images), settings)
        if key not in self.passes:
            self.images.append(images)
            self.passes[key] = self.pipeline.unet_pass(images, settings, self.features)
        return self.passes[key]


def segment_all(
    pipeline: Any,
    images: torch.Tensor,
    items: Sequence[Mapping[str, Any]],
    calls: Sequence[Mapping[str, Any]],
) -> list[torch.Tensor]:
    """Labels ``(B, R, R)`` of each call (:func:`segment_batch`), from one UNet pass per pass
    setting (``diffseg.passes.PassSettings``) shared by the calls that have it
    (:class:`SharedPass`)."""
    if len(calls) == 1:
        return [segment_batch(pipeline, images, items, calls[0])]
    features = any(get(call.get("name", "diffseg")).features for call in calls)
    shared = SharedPass(pipeline, features)
    return [segment_batch(shared, images, items, call) for call in calls]
