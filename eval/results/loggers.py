"""Run loggers: CSV files in the run directory alone, or CSV plus Weights & Biases."""

from __future__ import annotations

import csv
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any


@dataclass(frozen=True)
class RunInfo:
    """What a logger knows of its run: the folder, the id (W&B's too) and the resolved config."""

    run_dir: Path
    run_id: str
    config: Mapping[str, Any]


class CSVLogger:
    """Running metrics to ``metrics.csv`` in the run directory (the tables themselves are written by
    ``eval.run``). The base of the other loggers: ``logger=csv`` on the command line."""

    def __init__(self, run: RunInfo) -> None:
        self.run_dir = Path(run.run_dir)
        self._metrics = self.run_dir / "metrics.csv"

    def log_running(self, step: int, metrics: Mapping[str, float]) -> None:
        """Metrics over the first ``step`` images, appended as one CSV line."""
        row = {"n_images": step, **metrics}
        new = not self._metrics.exists()
        with open(self._metrics, "a", newline="", encoding="utf-8") as f:
            writer = csv.DictWriter(f, fieldnames=list(row))
            if new:
                writer.writeheader()
            writer.writerow(row)

    def log_final(
        self,
        results: Mapping[str, Any],
        per_class: Sequence[Mapping[str, Any]],
        images: Sequence[Path],
        prefix: str = "",
    ) -> None:
        """Final results (one row), the per-class rows and the qualitative pictures, their keys
        prefixed with ``prefix`` (``KEY/`` for a segmenter of ``segmenters:``)."""

    def finish(self, exit_code: int = 0) -> None:
        """Close the logger; ``exit_code != 0`` marks a failed run."""


_WANDB_DIR_VARS = ("WANDB_CACHE_DIR", "WANDB_DATA_DIR", "WANDB_CONFIG_DIR")
# The user's own settings, read before any run sets them (a multirun starts several runs in
# one process: each must get its own folders, not the first run's).
_USER_WANDB_DIRS = {var: os.environ.get(var) for var in _WANDB_DIR_VARS}


@dataclass(frozen=True)
class SegmenterLogger:
    """The run's logger as a segmenter of ``segmenters:`` sees it when its run finishes: its final
    records go to the run's logger (the same W&B run) under ``KEY/``."""

    logger: Any
    key: str

    def log_final(
        self,
        results: Mapping[str, Any],
        per_class: Sequence[Mapping[str, Any]],
        images: Sequence[Path],
    ) -> None:
        self.logger.log_final(results, per_class, images, prefix=f"{self.key}/")


def wandb_mode(mode: str | None) -> str | None:
    """The W&B mode to ask for: ``mode`` when given; else None (W&B reads ``WANDB_MODE``) when that
    variable is set; else online when ``WANDB_API_KEY`` is set, offline otherwise, so a machine
    without credentials or network never fails a run."""
    if mode is not None:
        if mode not in ("online", "offline", "disabled", "shared"):
            raise ValueError(
                f"logger.mode must be online, offline, disabled or null (auto), got {mode!r}"
            )
        return mode
    if os.environ.get("WANDB_MODE"):
        return None
    return "online" if os.environ.get("WANDB_API_KEY") else "offline"


class WandbLogger(CSVLogger):
    """CSV logging plus a W&B run: the composed config, running metrics, the per-class table
    (``wandb.Table``), the qualitative pictures and the final metrics in ``wandb.summary``.

    Everything W&B writes locally (run files, cache, artifacts staging, settings) goes under
    ``<run dir>/wandb`` unless the corresponding ``WANDB_*_DIR`` variable is already set. The W&B
    run id is the harness' run id, so resuming a run continues the same W&B run.
    """

    def __init__(
        self,
        run: RunInfo,
        project: str = "diffseg-bench",
        entity: str | None = None,
        group: str | None = None,
        tags: Sequence[str] = (),
        mode: str | None = None,
    ) -> None:
        super().__init__(run)
        import wandb

        root = self.run_dir / "wandb"
        for var in _WANDB_DIR_VARS:
            if _USER_WANDB_DIRS[var] is None:
                os.environ[var] = str(root / var.removeprefix("WANDB_").lower())
        root.mkdir(parents=True, exist_ok=True)
        self._wandb = wandb
        self.run = wandb.init(
            project=project,
            entity=entity,
            group=group,
            tags=list(tags),
            mode=wandb_mode(mode),
            dir=str(self.run_dir),
            id=run.run_id,
            name=self.run_dir.name,
            resume="allow",
            config=dict(run.config),
        )

    def log_running(self, step: int, metrics: Mapping[str, float]) -> None:
        super().log_running(step, metrics)
        self.run.log(dict(metrics), step=step)

    def log_final(
        self,
        results: Mapping[str, Any],
        per_class: Sequence[Mapping[str, Any]],
        images: Sequence[Path],
        prefix: str = "",
    ) -> None:
        columns = list(per_class[0]) if per_class else []
        table = self._wandb.Table(
            columns=columns, data=[[r[c] for c in columns] for r in per_class]
        )
        pictures = [self._wandb.Image(str(p), caption=p.stem) for p in images]
        self.run.log({f"{prefix}per_class": table, f"{prefix}qualitative": pictures})
        for key, value in results.items():
            self.run.summary[f"{prefix}{key}"] = value

    def finish(self, exit_code: int = 0) -> None:
        self.run.finish(exit_code=exit_code)
