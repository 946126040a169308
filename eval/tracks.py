"""The segmenters of a run, one :class:`Track` each, and :class:`Tracks`, the one place that fans
out over them: their call settings for the shared UNet pass, their running metrics, the gathering
of their records under torchrun and their outputs.

A run scores its own segmenter (``segmenter``) and those of ``segmenters:`` on the same UNet
passes; each has its folder, records, metric, ledger row and run id (``RUN_ID-NAME`` for an
added one), and its view of the run's logger.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from torch.utils.data import Dataset

from eval import distributed
from eval.outputs import Outputs, finish
from eval.plan import SegmenterPlan
from eval.results.loggers import SegmenterLogger
from eval.scoring.metrics import HungarianIoU, running_scores


@dataclass
class Track:
    """One segmenter of a run: its ``plan`` (checked settings, call settings, folder),
    ``run_id`` and ``ledger_settings`` (the setting columns of its row, ``eval.results.record.settings``),
    its ``metric``, the ``records`` of its finished images (index -> record) and ``logger``, its
    view of the run's logger."""

    plan: SegmenterPlan
    run_id: str
    ledger_settings: dict[str, Any]
    metric: HungarianIoU
    records: dict[int, dict[str, Any]] = field(default_factory=dict)
    logger: Any = None

    @property
    def call(self) -> dict[str, Any]:
        return self.plan.call

    @property
    def run_dir(self) -> Path:
        """Its folder: per-image log, predictions, contingency tables, pictures, tables."""
        return self.plan.folder


def make_track(
    plan: SegmenterPlan,
    run_id: str,
    ledger_settings: dict[str, Any],
    records: dict[int, dict[str, Any]],
    n_class: int,
    logger: Any,
) -> Track:
    """The track of ``plan``, its metric holding the counts of its finished ``records``
    (running values stay per process; the states are reduced once, after the loop). ``run_id``
    and ``logger``: the run's (an added segmenter's are derived from them)."""
    metric = HungarianIoU(n_class, sync_on_compute=False)
    for rec in records.values():
        if not rec.get("skipped"):
            metric.update(counts=rec)
    if not plan.own:
        run_id, logger = f"{run_id}-{plan.name}", SegmenterLogger(logger, plan.name)
    return Track(plan, run_id, ledger_settings, metric, records, logger)


@dataclass
class Tracks:
    """The run's tracks, the run's own among them (:attr:`own`)."""

    tracks: Sequence[Track]

    def __iter__(self) -> Iterator[Track]:
        return iter(self.tracks)

    def __len__(self) -> int:
        return len(self.tracks)

    @property
    def own(self) -> Track:
        """The run's own segmenter's track (``segmenter``)."""
        return next(t for t in self.tracks if t.plan.own)

    @property
    def calls(self) -> list[dict[str, Any]]:
        return [t.call for t in self.tracks]

    def running(self) -> dict[str, float]:
        """This process's running scores of every track: the run's own segmenter's by their
        names, an added one's under ``NAME/``."""
        return {
            f"{t.plan.name}/{name}" if t.plan.name else name: value
            for t in self.tracks
            for name, value in running_scores(t.metric).items()
        }

    def gather(self, rank: distributed.Rank) -> bool:
        """Under torchrun: every track's records and metric states on rank 0
        (:func:`eval.distributed.gather_on_main`); True on rank 0."""
        return all(
            [distributed.gather_on_main(t.records, t.metric, t.run_dir, rank) for t in self.tracks]
        )

    def finish(self, dataset: Dataset, ledger: Path, device_name: str) -> dict[str, Outputs]:
        """Each track's tables, pictures and logger record (:func:`eval.outputs.finish`), by its
        config key."""
        return {
            t.plan.key: finish(
                ledger,
                dataset,
                t.records,
                t.metric,
                t.logger,
                {
                    "run_id": t.run_id,
                    **t.ledger_settings,
                    "device": device_name,
                    "run_dir": str(t.run_dir.resolve()),
                },
            )
            for t in self.tracks
        }


def make_tracks(
    plans: Sequence[SegmenterPlan],
    run_id: str,
    ledger_settings: Mapping[str, dict[str, Any]],
    records: Mapping[str, dict[int, dict[str, Any]]],
    n_class: int,
    logger: Any,
) -> Tracks:
    """The tracks of ``plans``; ``ledger_settings`` and ``records`` by config key."""
    return Tracks(
        [
            make_track(p, run_id, ledger_settings[p.key], records[p.key], n_class, logger)
            for p in plans
        ]
    )
