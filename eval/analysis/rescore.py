"""Score a finished run again under another rule, from its stored contingency tables: no model,
no images (``eval.scoring.contingency``).

    python -m eval.analysis.rescore RUN_DIR [scoring=all|hungarian|majority|background_merge] [--ledger PATH]

Rules, each applied per image and the counts summed over the dataset as the live run does
(``eval.scoring.metrics``):

* ``hungarian``: the official per-image Hungarian matching (``eval.scoring.matching``), one segment per
  class; under ``protocol.compat`` with a background class in DiffCut's class order, as the run.
* ``majority``: many-to-one; each segment goes to the class it overlaps most (ties: the first
  class), so several segments can share a class. Per image: DiffSeg's segments carry no identity
  across images, so there is no dataset-level cluster to vote for (STEGO/PiCIE's many-to-one).
* ``background_merge``: DiffCut's protocol; clusters left unmatched to a foreground class merge
  into one background cluster (``eval.scoring.protocol.merge_unmatched_into_background`` on the table),
  then ``hungarian``. Needs a background class, and segments not refined with PAMR (DiffCut
  merges before PAMR: a merge after it is refused, not computed in the reverse order).

A run whose protocol merged before scoring (``protocol=diffcut`` on VOC, COCO-Object, Pascal
Context) stored the merged segments: its own rule is ``background_merge`` and ``hungarian``
(without the merge) cannot be recomputed. The run's own rule reproduces its numbers exactly, and
is checked first: tables that no longer give the run's numbers (edited, corrupted) are refused,
exit 1, before anything is written or appended (:func:`check_tables`).

Each rule writes ``RUN_DIR/rescore/<rule>/results.csv`` and ``per_class.csv``; each rule other
than the run's own (whose numbers the run's row holds already) appends a ledger row (``run_id`` ``<run>-rescore-<rule>``, ``rescored_from`` the run, ``scoring`` the rule; a rule
other than the published cell's is a deviation, so such a row never fills a cell). Also
``miou_things``/``miou_stuff`` where the dataset defines the split (``classes.THING_CLASSES``)
and Boundary IoU where the segments are the stored ones.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np

from eval import description
from eval.atomic import blank_nan, read_csv_rows, read_jsonl, write_csv_atomic
from eval.results import ledger as ledger_io
from eval.results import paper
from eval.results.columns import RESULT_COLUMNS
from eval.scoring import contingency
from eval.scoring.rules import (
    PER_CLASS_COLUMNS,
    RESCORE_DIR,
    RULE_COLUMNS,
    RULES,
    RescoreError,
    Rules,
    score,
)

# ----------------------------------------------------------------------------------------------
# A run folder


@dataclass
class Run:
    """A finished run's folder as the rescoring reads it."""

    run_dir: Path
    row: dict[str, str]  # results.csv, as text
    rules: Rules
    records: list[dict[str, Any]]  # the scored images' per_image.jsonl records

    @classmethod
    def open(cls, run_dir: str | Path) -> Run:
        run_dir = Path(run_dir)
        results, per_class = run_dir / "results.csv", run_dir / "per_class.csv"
        for path in (results, per_class, run_dir / "per_image.jsonl"):
            if not path.is_file():
                raise RescoreError(f"{path} not found: {run_dir} is not a finished run's folder")
        rows = read_csv_rows(results)
        if len(rows) != 1:
            raise RescoreError(f"{results} holds {len(rows)} rows; a run's results hold one")
        row = rows[0]
        parsed = ledger_io.parse_row(row)
        if not isinstance(parsed.get("protocol_settings"), dict):
            raise RescoreError(
                f"{results}: no protocol_settings (ledger_version {ledger_io.version(row)}); "
                "the run is older than the rescoring, run it again"
            )
        names = [r["class"] for r in read_csv_rows(per_class)]
        limit = parsed.get("limit") or None  # an empty cell: the whole split
        records = [
            r
            for r in read_jsonl(run_dir / "per_image.jsonl")
            if not r.get("skipped") and (limit is None or r["index"] < limit)
        ]
        if len(records) != int(row["n_images"]):
            raise RescoreError(
                f"{run_dir / 'per_image.jsonl'} holds {len(records)} scored images, "
                f"{results} says {row['n_images']}; is the run finished?"
            )
        return cls(run_dir, row, Rules.from_row(parsed, names), records)

    def tables(self) -> dict[int, np.ndarray]:
        try:
            return contingency.read_tables(self.run_dir, self.records, self.rules.n_class)
        except contingency.ContingencyError as e:
            raise RescoreError(str(e)) from e

    def ledger_default(self) -> Path | None:
        """The ledger the run appended to (its resolved config), if known."""
        config = self.run_dir / "config.yaml"
        if not config.is_file():
            return None
        import yaml

        cfg = yaml.safe_load(config.read_text(encoding="utf-8")) or {}
        path = (cfg.get("paths") or {}).get("ledger")
        return Path(path) if path else None


def rescored_row(run: Run, rule: str, scores: Mapping[str, Any], out_dir: Path) -> dict[str, Any]:
    """The ledger row of a rescoring: the run's row, the rule's numbers, a new id, the rule."""
    row: dict[str, Any] = {k: run.row.get(k, "") for k in RESULT_COLUMNS}
    row.update({k: blank_nan(scores[k]) for k in RULE_COLUMNS})
    row.update(
        run_id=f"{run.row['run_id']}-rescore-{rule}",
        timestamp=datetime.now(timezone.utc).isoformat(timespec="seconds"),
        scoring=rule,
        rescored_from=run.row["run_id"],
        run_dir=str(out_dir.resolve()),
    )
    row["deviations"] = "; ".join(paper.deviations(ledger_io.parse_row(row)))
    return row


def write(run: Run, rule: str, scores: Mapping[str, Any]) -> dict[str, Any]:
    """``rescore/<rule>/results.csv`` and ``per_class.csv``; returns the row."""
    out_dir = run.run_dir / RESCORE_DIR / rule
    row = rescored_row(run, rule, scores, out_dir)
    per_class = [
        {
            "class": name,
            "kind": kind,
            "iou": blank_nan(float(iou)),
            "tp": int(tp),
            "fp": int(fp),
            "fn": int(fn),
            "boundary_iou": blank_nan(float(biou)),
        }
        for name, kind, iou, tp, fp, fn, biou in zip(
            run.rules.class_names,
            run.rules.kinds(),
            scores["per_class_iou"],
            scores["tp"],
            scores["fp"],
            scores["fn"],
            scores["per_class_boundary_iou"],
            strict=True,
        )
    ]
    write_csv_atomic(out_dir / "per_class.csv", per_class, PER_CLASS_COLUMNS)
    write_csv_atomic(out_dir / "results.csv", [row], RESULT_COLUMNS)
    return row


def _pct(value: float) -> str:
    return "n/a" if math.isnan(value) else f"{100 * value:.2f}"


def same_as_run(run: Run, scores: Mapping[str, Any]) -> bool:
    """Whether the numbers equal the run's own (results.csv keeps floats exactly: repr)."""
    return all(float(run.row[k]) == scores[k] for k in ("pixel_accuracy", "miou"))


def check_tables(run: Run, tables: Mapping[int, np.ndarray]) -> None:
    """Raise :class:`RescoreError` when the run's own rule on ``tables`` does not give the run's
    own numbers: the stored tables changed after the run, so no rule can be trusted on them."""
    own = score(tables, run.rules, run.rules.own)
    if not same_as_run(run, own):
        raise RescoreError(
            f"the contingency tables in {run.run_dir / contingency.PART_DIR} no longer give the "
            f"run's own numbers (scoring={run.rules.own}: mIoU {own['miou']!r}, pixel accuracy "
            f"{own['pixel_accuracy']!r}; {run.run_dir / 'results.csv'}: {run.row['miou']}, "
            f"{run.row['pixel_accuracy']}); they were changed after the run, so nothing is "
            "rescored from them. Run the evaluation again in a new folder."
        )


def comparison(run: Run, results: Mapping[str, Mapping[str, Any] | str]) -> str:
    """A Markdown table: one line per rule (scores in %, or why the rule is not available)."""
    head = ["rule", "pixel acc %", "mIoU %", "mIoU things %", "mIoU stuff %", "Boundary IoU %"]
    lines = ["| " + " | ".join(head) + " | note |", "|" + "---|" * (len(head) + 1)]
    for rule, res in results.items():
        name = rule + (" (the run's rule)" if rule == run.rules.own else "")
        if isinstance(res, str):
            lines.append(f"| {name} |" + " n/a |" * (len(head) - 1) + f" {res} |")
            continue
        keys = ("pixel_accuracy", "miou", "miou_things", "miou_stuff", "boundary_iou")
        note = ""
        if rule == run.rules.own:
            note = "= the run's numbers"  # checked before any rule was scored (check_tables)
        lines.append(f"| {name} | " + " | ".join(_pct(res[k]) for k in keys) + f" | {note} |")
    return "\n".join(lines)


def _parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m eval.analysis.rescore", description=description(__doc__)
    )
    parser.add_argument("run_dir", help="a finished run's folder")
    parser.add_argument(
        "scoring",
        nargs="?",
        default="scoring=all",
        help=f"scoring=RULE, RULE one of all, {', '.join(RULES)} (default all)",
    )
    parser.add_argument("--ledger", help="ledger CSV (default: the one the run appended to)")
    parser.add_argument("--no-ledger", action="store_true", help="append no ledger rows")
    args = parser.parse_args(argv)
    rule = args.scoring.removeprefix("scoring=")
    if rule != "all" and rule not in RULES:
        parser.error(f"scoring={rule}: rules are all, {', '.join(RULES)}")
    args.rules = list(RULES) if rule == "all" else [rule]
    return args


def main(argv: Sequence[str] | None = None) -> None:
    args = _parse_args(argv)
    try:
        run = Run.open(args.run_dir)
        ledger = Path(args.ledger) if args.ledger else run.ledger_default()
        if ledger is None and not args.no_ledger:
            raise RescoreError(f"{run.run_dir} has no config.yaml naming its ledger; pass --ledger")
        tables = run.tables()
        check_tables(run, tables)
        results: dict[str, Mapping[str, Any] | str] = {}
        rows = []
        for rule in args.rules:
            reason = run.rules.unavailable(rule)
            if reason:
                if len(args.rules) == 1:
                    raise RescoreError(f"scoring={rule} is not available: {reason}")
                results[rule] = reason
                continue
            results[rule] = score(tables, run.rules, rule)
            rows.append(write(run, rule, results[rule]))
        if not args.no_ledger:
            # The run's own row already holds its own rule's numbers.
            for row in [r for r in rows if r["scoring"] != run.rules.own]:
                added = ledger_io.append(ledger, row)  # JSON columns as results.csv has them
                state = "row added" if added else "row already there, not added again"
                print(f"Ledger: {ledger} ({row['run_id']}: {state})")
    except (RescoreError, ledger_io.LedgerError, OSError, json.JSONDecodeError) as e:
        raise SystemExit(f"Error: {e}") from None
    print(f"\n{run.row['dataset']} ({run.row['n_images']} images), run {run.row['run_id']}:")
    print(comparison(run, results))
    print(f"\nWritten under {run.run_dir / RESCORE_DIR}/<rule>/ (results.csv, per_class.csv)")
    if (
        "hungarian" in results
        and "majority" in results
        and not isinstance(results["majority"], str)
    ):
        one, many = results["hungarian"], results["majority"]
        if not isinstance(one, str):
            gap = 100 * (many["miou"] - one["miou"])
            print(f"Many-to-one minus one-to-one mIoU: {gap:+.2f} points")


if __name__ == "__main__":
    sys.exit(main())
