"""What a finished run writes: its results row (the ledger's columns), per-class and per-image
tables, the per-class IoU plot, the logger's final record; the summary it prints; the ledger row."""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch.utils.data import Dataset

from eval.atomic import write_csv_atomic
from eval.jobs import now
from eval.report.tables import to_markdown
from eval.results import ledger as ledger_io
from eval.results import paper, record, visualize
from eval.results.columns import PER_CLASS_COLUMNS, PER_IMAGE_COLUMNS, RESULT_COLUMNS
from eval.runtime import RunError
from eval.scoring import granularity
from eval.scoring.metrics import HungarianIoU, compute_scores


@dataclass
class Outputs:
    """What a finished run wrote: its directory, the results row and whether the ledger got it."""

    run_dir: Path
    results: dict[str, Any]
    ledger: Path
    ledger_added: bool
    n_skipped: int
    n_pictures: int


def print_summary(out: Outputs, save_predictions: bool) -> None:
    """The results table and where everything is."""
    print("\n" + results_table(out.results, out.n_skipped))
    if out.n_skipped:
        ids = json.loads(out.results["skipped_ids"])
        shown = ", ".join(ids[:10]) + (f", ... ({len(ids)} in all)" if len(ids) > 10 else "")
        print(f"Skipped (dataset.on_error=skip): {shown}")
    line = granularity.summary_line(out.results)
    if line:
        print(line)
    deviations = out.results["deviations"]
    if deviations.startswith(paper.NO_CELL):
        print(f"Published cell: none ({deviations})")
    elif deviations:
        print(f"Not comparable with the published cell: {deviations}")
    else:
        print("Comparable with the published cell (no deviation from its setting)")
    print(f"\nRun directory: {out.run_dir}")
    print(
        "  tables:      results.csv, per_class.csv, per_image.csv (per-image log: per_image.jsonl)"
    )
    print(f"  pictures:    per_class_iou.png, qualitative/ ({out.n_pictures} images)")
    print(
        "  rescoring:   contingency/ (python -m eval.analysis.rescore RUN_DIR), granularity.csv/.png"
    )
    if save_predictions:
        print("  predictions: predictions/ (label PNGs: 8-bit palette, 16-bit grey above 255)")
    state = "row added" if out.ledger_added else "row already there, not added again"
    print(f"Ledger: {out.ledger} ({state})")


def _fmt(value: float, scale: float = 1.0, digits: int = 2) -> str:
    return "nan" if value is None or math.isnan(value) else f"{value * scale:.{digits}f}"


def results_table(row: Mapping[str, Any], n_skipped: int) -> str:
    """The results row as a Markdown table (accuracy and mIoU in %)."""
    cells = {
        "dataset": f"{row['dataset']} ({row['split']})",
        "model": row["model"],
        "segmenter": row["segmenter"],
        "kl_threshold": row["kl_threshold"],
        "images": str(row["n_images"]) + (f" (+{n_skipped} skipped)" if n_skipped else ""),
        "pixel acc %": _fmt(row["pixel_accuracy"], 100),
        "mIoU %": _fmt(row["miou"], 100),
        "segments/img": _fmt(row["mean_segments"], 1, 1),
        "img/s": _fmt(row["images_per_s"], 1, 2),
    }
    return to_markdown(pd.DataFrame([cells])).rstrip("\n")


def comparison_table(outputs: Mapping[str, Outputs]) -> str:
    """The segmenters of one run side by side (``outputs`` by config key, ``segmenter``,
    ``segmenters.KEY``), accuracy and mIoU in %. img/s: the run's, every segmenter's time in it."""
    rows = [
        {
            "segmenter": f"{key} ({out.results['segmenter']})",
            "pixel acc %": _fmt(float(out.results["pixel_accuracy"]), 100),
            "mIoU %": _fmt(float(out.results["miou"]), 100),
            "segments/img": _fmt(float(out.results["mean_segments"]), 1, 1),
            "img/s": _fmt(float(out.results["images_per_s"]), 1, 2),
        }
        for key, out in outputs.items()
    ]
    return to_markdown(pd.DataFrame(rows)).rstrip("\n")


def results_row(
    scored: Sequence[Mapping[str, Any]],
    skipped_ids: list[str],
    final: Mapping[str, torch.Tensor],
    run: Mapping[str, Any],
) -> dict[str, Any]:
    """The results row: ``run`` (run_id, run_dir, device and the settings of
    :func:`eval.results.record.settings`), the scores, the images (``scored``: their records) and
    provenance."""
    seconds = float(sum(r["seconds"] for r in scored))
    row = {
        "run_id": run["run_id"],
        "timestamp": now(),
        **run,
        "n_images": len(scored),
        "n_skipped": len(skipped_ids),
        "skipped_ids": skipped_ids,
        "pixel_accuracy": float(final["pixel_accuracy"]),
        "miou": float(final["miou"]),
        "mean_segments": float(np.mean([r["segments"] for r in scored])),
        "seconds": round(seconds, 3),
        "images_per_s": round(len(scored) / seconds, 4) if seconds > 0 else float("nan"),
        "versions": record.versions(),
        "git_commit": record.git_commit(),
    }
    return row


def finish(
    ledger: Path,
    dataset: Dataset,
    records: dict[int, dict[str, Any]],
    metric: HungarianIoU,
    logger: Any,
    run: Mapping[str, Any],
) -> Outputs:
    """Write the run's tables and pictures (in ``run["run_dir"]``) and the logger's final
    record; ``run`` as for :func:`results_row`; ``ledger``: the ledger the row is for."""
    run_dir = Path(run["run_dir"])
    ordered = [records[i] for i in sorted(records)]
    scored = [r for r in ordered if not r.get("skipped")]
    skipped_ids = [
        *getattr(dataset, "skipped_ids", []),
        *(r["id"] for r in ordered if r.get("skipped")),
    ]
    if not scored:
        raise RunError(
            f"every one of the {len(skipped_ids)} images was skipped (dataset.on_error=skip)"
        )
    final = compute_scores(metric)
    row = results_row(scored, skipped_ids, final, run)
    row.update(granularity.summarize(run_dir, scored, dataset.class_names, row))
    row["deviations"] = "; ".join(paper.deviations({**row, "ledger_version": 2}))
    per_class = [
        {"class": name, "iou": float(iou), "tp": int(tp), "fp": int(fp), "fn": int(fn)}
        for name, iou, tp, fp, fn in zip(
            dataset.class_names,
            final["per_class_iou"],
            final["tp"],
            final["fp"],
            final["fn"],
            strict=True,
        )
    ]
    per_image = [{k: r[k] for k in PER_IMAGE_COLUMNS} for r in scored]
    write_csv_atomic(run_dir / "per_image.csv", per_image, PER_IMAGE_COLUMNS)
    write_csv_atomic(run_dir / "per_class.csv", per_class, PER_CLASS_COLUMNS)
    title = (
        f"{row['dataset']} / {row['model']} / {row['segmenter']}: mIoU {_fmt(row['miou'], 100)}%"
    )
    visualize.plot_class_iou(
        dataset.class_names, final["per_class_iou"].tolist(), run_dir / "per_class_iou.png", title
    )
    encoded = ledger_io.encode_row(row)
    write_csv_atomic(run_dir / "results.csv", [encoded], RESULT_COLUMNS)
    pictures = sorted((run_dir / "qualitative").glob("*.png"))
    logger.log_final(row, per_class, pictures)
    return Outputs(run_dir, encoded, ledger, False, len(skipped_ids), len(pictures))


def append_to_ledger(outputs: Outputs) -> None:
    """Append the run's row; when that fails the row stays in the run folder's results.csv and
    the error says the one command that appends it later."""
    try:
        outputs.ledger_added = ledger_io.append(outputs.ledger, outputs.results)
    except (OSError, ledger_io.LedgerError) as e:
        raise RunError(
            f"the run finished, but its row could not be appended to the ledger {outputs.ledger} "
            f"({e}). Its results are kept in {outputs.run_dir / 'results.csv'}; once the ledger "
            f"is fixed, append them with: {ledger_io.append_command(outputs.run_dir, outputs.ledger)}"
        ) from e
