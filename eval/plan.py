"""A run's plan: the composed config checked once, at the top of the run, before any data or
model is touched; what every step below the recipe (``eval.run``) gets instead of the config.

:class:`RunPlan` holds the run's scalars (``eval.schema.RunSettings``), the protocol, the model
input side, the resolved dataset, model, cache and logger settings, and one
:class:`SegmenterPlan` per segmenter: the run's own (``segmenter``) and those of ``segmenters:``
(each found by its config key, not its place).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from eval.schema import check_run, given
from eval.scoring.protocol import Protocol, check_resolution_pair
from eval.segmenters import EXTRA_DIR, extra_segmenters
from eval.segmenters import get as get_spec
from eval.segmenters.registry import SegmenterSettings, check

OWN = "segmenter"  # the config key of the run's own segmenter


@dataclass(frozen=True)
class SegmenterPlan:
    """One segmenter of a run, checked: ``key``, its config key (``segmenter``, the run's own,
    or ``segmenters.NAME``); ``settings``, its normalised settings (what a resume must share and
    the ledger records, ``eval.segmenters.settings``); ``call``, the call settings
    (``eval.segmenters.segmenter_call``); ``folder``, where it writes (the run folder, or
    ``segmenters/NAME/`` in it)."""

    key: str
    checked: SegmenterSettings
    settings: dict[str, Any]
    call: dict[str, Any]
    folder: Path

    @property
    def own(self) -> bool:
        """Whether this is the run's own segmenter (``segmenter``, not one of ``segmenters:``)."""
        return self.key == OWN

    @property
    def name(self) -> str:
        """Its key under ``segmenters:`` (empty for the run's own): its folder, the suffix of its
        run id and the prefix of its logged metrics."""
        return "" if self.own else self.key.removeprefix("segmenters.")

    def check_model(self, scale_factor: int) -> None:
        """Check the settings again for the loaded model's attention grid (``scale_factor``
        input pixels per position of its largest map: 16 for SDXL)."""
        check(self.checked, self.call["resolution"], self.key, scale_factor)


def plan_segmenter(
    key: str,
    segmenter: Mapping[str, Any],
    folder: Path,
    resolution: int,
    seed: int,
    score_resolution: int | None = None,
) -> SegmenterPlan:
    """The segmenter config ``segmenter`` (a plain dict) under config key ``key``, checked for a
    model with SD 1.x's attention grid (the loaded model's is known only once it is loaded). A
    segmenter that makes its labels at the scoring side (``SegmenterSpec.score_size``: DiffCut)
    gets the protocol's ``score_resolution`` when it has one."""
    checked = check(segmenter, resolution, key)
    settings = given(checked, segmenter)
    call = {"seed": seed, **settings, "resolution": resolution}
    if score_resolution is not None and get_spec(checked.name).score_size:
        call["score_resolution"] = score_resolution
    return SegmenterPlan(key, checked, settings, call, folder)


@dataclass(frozen=True)
class RunPlan:
    """The run's checked settings. ``config``: the composed config, resolved (what
    ``config.yaml`` keeps; the pinned settings of a resume are read from it); ``resolved``: the
    same with the experiment's name (what the ledger and the logger get); ``model_choice``: the
    model's config name (``custom`` without one); ``cache``: the attention cache's settings, None
    when it is off."""

    config: dict[str, Any]
    resolved: dict[str, Any]
    run_dir: Path
    ledger: Path
    device: str
    seed: int
    limit: int | None
    batch_size: int
    num_workers: int
    n_qualitative: int
    save_predictions: bool
    protocol: Protocol
    resolution: int
    dataset: dict[str, Any]
    model: dict[str, Any]
    model_choice: str
    compile: bool
    cache: dict[str, Any] | None
    logger: dict[str, Any]
    segmenters: tuple[SegmenterPlan, ...]

    @property
    def dataset_name(self) -> str:
        return self.dataset["name"]


def plan_run(cfg: DictConfig, choices: Mapping[str, Any]) -> RunPlan:
    """Check the composed config ``cfg`` (``conf/config.yaml``) once; ``choices``: Hydra's
    config-group choices (``HydraConfig.get().runtime.choices``: the model's and the
    experiment's names). Raises ``ValueError`` naming the key and the value."""
    scalars = check_run(cfg)
    protocol = Protocol.from_config(OmegaConf.to_container(cfg.protocol, resolve=True))
    resolution = protocol.input_resolution or cfg.dataset.get("resolution") or 512
    check_resolution_pair(protocol, resolution)
    run_dir = Path(cfg.paths.output_dir)
    segmenters = {OWN: OmegaConf.to_container(cfg.segmenter, resolve=True)}
    extras = extra_segmenters(cfg.get("segmenters"))
    segmenters.update({f"segmenters.{key}": value for key, value in extras.items()})
    folders = {OWN: run_dir, **{f"segmenters.{k}": run_dir / EXTRA_DIR / k for k in extras}}
    planned = tuple(
        plan_segmenter(
            key, value, folders[key], resolution, scalars.seed, protocol.score_resolution
        )
        for key, value in segmenters.items()
    )
    # Resolved last: the checks above answer before anything else is resolved.
    config = OmegaConf.to_container(cfg, resolve=True)
    cache = config.get("cache") or {}
    return RunPlan(
        config=config,
        resolved={**config, "experiment": cfg.experiment or choices.get("experiment") or ""},
        run_dir=run_dir,
        ledger=Path(config["paths"]["ledger"]),
        device=config["device"],
        seed=scalars.seed,
        limit=scalars.limit,
        batch_size=scalars.batch_size,
        num_workers=scalars.num_workers,
        n_qualitative=scalars.n_qualitative,
        save_predictions=bool(config["save_predictions"]),
        protocol=protocol,
        resolution=resolution,
        dataset=config["dataset"],
        model=config["model"],
        model_choice=choices.get("model") or "custom",
        compile=bool(config.get("compile")),
        cache=cache if cache.get("attention") else None,
        logger=config["logger"],
        segmenters=planned,
    )
