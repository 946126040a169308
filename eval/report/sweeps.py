"""Sweep plots from the run ledger: ``python -m eval.report.tables --sweep kl_threshold`` plots mIoU and
pixel accuracy against the swept parameter, one figure per ledger ``experiment`` that varies it,
one curve per dataset."""

from __future__ import annotations

import json
import os
import re
import sys
from collections.abc import Sequence
from pathlib import Path

import pandas as pd

from eval.atomic import atomic_open, write_text_atomic
from eval.results import ledger as ledger_io
from eval.results.columns import METRICS, SETTING_COLUMNS
from eval.results.ledger import by_recency


def _sweep_axis(values: pd.Series) -> pd.Series | None:
    """Numeric x for each JSON cell (a list of equal numbers counts as that number), else None."""
    numbers = []
    for text in values:
        value = json.loads(text) if text else None
        value = value if isinstance(value, list) else [value]
        if not value or len(set(value)) != 1 or not isinstance(value[0], int | float):
            return None
        numbers.append(float(value[0]))
    return pd.Series(numbers, index=values.index)


def _sweep_frame(ledger_path: str | os.PathLike) -> pd.DataFrame:
    """The ledger as text, version 2 rows only, oldest first (older rows are named, then left out:
    their lists were written in another format)."""
    raw = ledger_io.read_rows(ledger_path)
    old = [r.get("run_id", "?") for r in raw if ledger_io.version(r) < 2]
    if old:
        print(
            f"{ledger_path}: {len(old)} ledger_version 1 row(s) left out of the sweep "
            f"({', '.join(old[:5])}{', ...' if len(old) > 5 else ''})",
            file=sys.stderr,
        )
    rows = by_recency([r for r in raw if ledger_io.version(r) >= 2])
    return pd.DataFrame(rows, dtype=str)


# The ledger's mean segments per image (eval.results.columns).
SEGMENTS = "mean_segments"


def sweep_title(experiment: str, column: str) -> str:
    """The sweep plot's title; runs without an experiment name are called so."""
    return f"{experiment or 'runs without an experiment name'}: sweep of {column}"


def plot_sweep(
    ledger_path: str | os.PathLike,
    param: str,
    out_dir: str | os.PathLike,
    experiments: Sequence[str] | None = None,
) -> list[Path]:
    """Plot mIoU and pixel accuracy (percent) against ``param`` for each experiment varying it.

    One PNG per experiment (plus a CSV of the plotted points), one curve per dataset (and per
    value of any other setting that varies within the experiment). Repeated points keep the most
    recent run. Returns the written paths.
    """
    from matplotlib.figure import Figure  # the OO API renders with Agg, no display needed

    ledger = _sweep_frame(ledger_path)
    column = param.split(".")[-1]  # accept Hydra names such as segmenter.kl_threshold
    if column not in ledger.columns:
        raise ValueError(
            f"--sweep {param!r}: the ledger has no column {column!r}; sweepable columns are "
            f"{[c for c in SETTING_COLUMNS if c in ledger.columns]}"
        )
    if experiments:
        ledger = ledger[ledger["experiment"].isin(list(experiments))]
    out_dir = Path(out_dir)
    written: list[Path] = []
    for name, runs in ledger.groupby("experiment", sort=True):
        if runs[column].nunique() < 2:
            continue
        others = [c for c in SETTING_COLUMNS if c in runs.columns and c != column]
        varying = [c for c in others if runs[c].nunique() > 1]
        keys = ["dataset", *varying]
        points = runs.drop_duplicates([*keys, column], keep="last").copy()
        x = _sweep_axis(points[column])
        points["x"] = x if x is not None else points[column]
        for metric in METRICS:
            points[metric] = 100.0 * pd.to_numeric(points[metric])
        # Segments per image: what a merging setting moves, and what explains the scores' curve.
        points[SEGMENTS] = pd.to_numeric(points.get(SEGMENTS, pd.Series(dtype=str)))
        panels = {**{m: f"{label} (%)" for m, label in METRICS.items()}, SEGMENTS: "segments/img"}
        fig = Figure(figsize=(14, 4), layout="constrained")
        axes = fig.subplots(1, len(panels))
        for key, curve in points.groupby(keys, sort=True):
            curve = curve.sort_values("x")
            label = ", ".join(str(k) for k in (key if isinstance(key, tuple) else (key,)))
            for ax, metric in zip(axes, panels, strict=True):
                ax.plot(curve["x"], curve[metric], "o-", label=label)
        for ax, ylabel in zip(axes, panels.values(), strict=True):
            ax.set_xlabel(column)
            ax.set_ylabel(ylabel)
            ax.grid(alpha=0.3)
        axes[0].legend(fontsize="small")
        fig.suptitle(sweep_title(name, column))
        stem = re.sub(r"[^A-Za-z0-9_.-]+", "_", f"sweep_{name}_{column}")
        png, csv = out_dir / f"{stem}.png", out_dir / f"{stem}.csv"
        with atomic_open(png, "wb") as f:
            fig.savefig(f, format="png", dpi=120)
        columns = ["experiment", *keys, column, *METRICS, SEGMENTS, "n_images", "run_id"]
        columns.append("timestamp")
        write_text_atomic(
            csv, points[[c for c in columns if c in points.columns]].to_csv(index=False)
        )
        written += [png, csv]
    if not written:
        where = f"experiments {list(experiments)}" if experiments else "any experiment"
        raise ValueError(
            f"no ledger rows of {where} in {str(ledger_path)!r} vary {column!r} (need at least two "
            f"values); run a sweep first, e.g. `python -m eval -m +experiment=ablation_kl`"
        )
    return written
