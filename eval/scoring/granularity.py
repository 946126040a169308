"""The granularity report every run writes (from ``eval.run``'s end), from its stored contingency
tables (``eval.scoring.contingency``):

* ``granularity.csv``: per image, the predicted segments (``n_segments``: distinct ids in the
  scored prediction) and the ground truth's classes (``n_gt_classes``: classes with a labelled
  pixel); ``granularity.png``: the 2-D histogram of the two (images per cell, the diagonal
  marked).
* Over- and under-segmentation rates: the share of images with more (fewer) segments than
  ground-truth classes.
* The many-to-one scores (``eval.analysis.rescore`` rule ``majority``) beside the run's one-to-one ones:
  the gap is what a finer segmentation gains when segments may share a class.
* Boundary IoU (Cheng et al., CVPR 2021) under the run's own matching: per image and class, the
  ground truth's mask and its matched segment's mask are each cut to their inner band (pixels
  within ``d = max(1, round(0.02 x diagonal))`` pixels, chessboard distance, of the mask's
  contour or the image border: Cheng et al.'s ``mask - erode(mask, 3x3, d times)``), counted on
  the labelled pixels; intersections and unions are summed over the dataset per class (as the
  mIoU sums TP/FP/FN), and the reported value is their ratio averaged over the classes with a
  non-empty union. Computed at scoring time, on the prediction and labels exactly as scored
  (the bands are layers of the stored tables), so it needs neither ``save_predictions`` nor the
  images again.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from eval.atomic import atomic_open, blank_nan, write_csv_atomic
from eval.scoring import contingency
from eval.scoring.rules import Rules, score

COLUMNS = ("id", "n_segments", "n_gt_classes")
FILES = ("granularity.csv", "granularity.png")


def image_counts(table: np.ndarray) -> tuple[int, int]:
    """``(n_segments, n_gt_classes)`` of one image's table: segment ids with a pixel (ignored
    pixels included, as the record's ``segments``) and classes with a labelled pixel."""
    return contingency.n_segments(table), int(table[0, :-1].any(axis=1).sum())


def rates(n_segments: np.ndarray, n_classes: np.ndarray) -> tuple[float, float]:
    """``(oversegmented, undersegmented)``: the share of images with more (fewer) segments than
    ground-truth classes."""
    return float(np.mean(n_segments > n_classes)), float(np.mean(n_segments < n_classes))


def joint_histogram(n_segments: np.ndarray, n_classes: np.ndarray) -> np.ndarray:
    """``(max segments + 1, max classes + 1)`` int64: images per (segments, classes) pair."""
    out = np.zeros((int(n_segments.max()) + 1, int(n_classes.max()) + 1), dtype=np.int64)
    np.add.at(out, (n_segments, n_classes), 1)
    return out


def figure(n_segments: np.ndarray, n_classes: np.ndarray, title: str) -> Any:
    """The joint histogram as a heat map (images per cell written in), ``y = x`` dashed across
    the whole square of counts, integer ticks: a matplotlib ``Figure``."""
    from matplotlib.figure import Figure  # the OO API renders with Agg, no display needed
    from matplotlib.ticker import MaxNLocator

    counts = joint_histogram(n_segments, n_classes)
    fig = Figure(figsize=(6, 5), layout="constrained")
    ax = fig.add_subplot(1, 1, 1)
    shown = np.where(counts > 0, counts, np.nan)
    image = ax.imshow(shown, origin="lower", cmap="viridis", aspect="auto")
    fig.colorbar(image, ax=ax, label="images")
    if counts.size <= 400:
        for (s, c), n in np.ndenumerate(counts):
            if n:
                light = n > counts.max() / 2  # viridis is light at the top of its range
                ax.text(
                    c, s, str(n), ha="center", va="center", fontsize=7, color="k" if light else "w"
                )
    # One square range for both counts, so the diagonal crosses every row and column of data.
    side = max(counts.shape)
    ends = [-0.5, side - 0.5]
    ax.plot(ends, ends, "--", color="grey", linewidth=1, label="segments = classes")
    ax.set_xlim(-0.5, side - 0.5)
    ax.set_ylim(-0.5, side - 0.5)
    for axis in (ax.xaxis, ax.yaxis):
        axis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("ground-truth classes per image")
    ax.set_ylabel("predicted segments per image")
    ax.legend(loc="upper left", fontsize="small")
    ax.set_title(title, fontsize=10)
    return fig


def plot(n_segments: np.ndarray, n_classes: np.ndarray, path: Path, title: str) -> None:
    """:func:`figure` written to ``path`` (PNG)."""
    fig = figure(n_segments, n_classes, title)
    with atomic_open(path, "wb") as f:
        fig.savefig(f, format="png", dpi=120)


def summarize(
    run_dir: Path,
    records: Sequence[Mapping[str, Any]],
    class_names: Sequence[str],
    row: Mapping[str, Any],
) -> dict[str, Any]:
    """Write ``granularity.csv`` and ``.png`` for the scored ``records`` and return the results
    row's columns: ``scoring`` (the run's rule), ``pixel_accuracy_many_to_one``,
    ``miou_many_to_one``, ``oversegmented``, ``undersegmented``, ``boundary_iou``,
    ``miou_things``, ``miou_stuff`` (empty where not computable or not defined).

    ``row``: the run's results row (``dataset``, ``protocol``, ``protocol_settings`` as a dict,
    ``pixel_accuracy`` and ``miou``, which the stored tables must reproduce).
    """
    rules = Rules.from_row(row, class_names)
    out: dict[str, Any] = {"scoring": rules.own, "rescored_from": ""}
    try:
        tables = contingency.read_tables(run_dir, records, rules.n_class)
    except contingency.ContingencyError as e:  # a run resumed from one made before the tables
        warnings.warn(f"no granularity report: {e}", stacklevel=2)
        return out
    own, many = score(tables, rules, rules.own), score(tables, rules, "majority")
    if (own["pixel_accuracy"], own["miou"]) != (row["pixel_accuracy"], row["miou"]):
        warnings.warn(
            f"{run_dir}: the stored contingency tables score {own['pixel_accuracy']!r} / "
            f"{own['miou']!r}, the run {row['pixel_accuracy']!r} / {row['miou']!r}: rescoring "
            "this run will not reproduce it",
            stacklevel=2,
        )
    pairs = [image_counts(tables[int(r["index"])]) for r in records]
    n_segments = np.array([p[0] for p in pairs])
    n_classes = np.array([p[1] for p in pairs])
    write_csv_atomic(
        run_dir / FILES[0],
        [
            {"id": r["id"], "n_segments": s, "n_gt_classes": c}
            for r, (s, c) in zip(records, pairs, strict=True)
        ],
        COLUMNS,
    )
    over, under = rates(n_segments, n_classes)
    title = (
        f"{row['dataset']}: {len(records)} images, over-segmented {100 * over:.0f}%, "
        f"under-segmented {100 * under:.0f}%"
    )
    plot(n_segments, n_classes, run_dir / FILES[1], title)
    out.update(
        pixel_accuracy_many_to_one=many["pixel_accuracy"],
        miou_many_to_one=many["miou"],
        oversegmented=over,
        undersegmented=under,
        **{k: blank_nan(own[k]) for k in ("boundary_iou", "miou_things", "miou_stuff")},
    )
    return out


def summary_line(row: Mapping[str, Any]) -> str | None:
    """One line for the run's printed summary (None without a report)."""
    if row.get("miou_many_to_one") in ("", None):
        return None
    values = {k: float(row[k] or "nan") for k in ("miou", "miou_many_to_one", "boundary_iou")}
    gap = 100 * (values["miou_many_to_one"] - values["miou"])
    biou = values["boundary_iou"]
    return (
        f"Granularity: over-segmented {100 * float(row['oversegmented']):.1f}% of images, "
        f"under-segmented {100 * float(row['undersegmented']):.1f}%; many-to-one mIoU "
        f"{100 * values['miou_many_to_one']:.2f}% ({gap:+.2f} points against one-to-one); Boundary "
        f"IoU {'n/a' if math.isnan(biou) else f'{100 * biou:.2f}%'}"
    )
