"""The run ledger: one CSV row per finished run, shared by every run and read by ``eval.report.tables``.

Each row records the *resolved* run (every setting that can change a number, non-scalars as JSON),
so that a table can tell whether a run is comparable with a published cell (``eval.results.paper``).
Rows are versioned (``ledger_version``); rows of a ledger written before versions existed read as
version 1 and are never taken for comparable runs.

``python -m eval.results.ledger append RUN_DIR [--ledger PATH]`` appends a finished run's ``results.csv``
(the row a run keeps in its folder when the ledger could not be written at the end).
"""

from __future__ import annotations

import argparse
import csv
import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from filelock import FileLock

from eval import description, home
from eval.atomic import write_csv_atomic

LEDGER_VERSION = 2
# Columns whose cells hold JSON (lists, mappings, null): parsed back with json.loads, never regex.
JSON_COLUMNS = (
    "protocol_settings",
    "dataset_settings",
    "segmenter_settings",
    "kl_threshold",
    "weights",
    "skipped_ids",
    "versions",
    "limit",
)


# Columns whose cells are numbers (or empty: not applicable); the tables compute with them.
NUMBER_COLUMNS = (
    "n_images",
    "pixel_accuracy",
    "miou",
    "mean_segments",
    "pixel_accuracy_many_to_one",
    "miou_many_to_one",
    "boundary_iou",
    "miou_things",
    "miou_stuff",
)


class LedgerError(ValueError):
    """A ledger that cannot be read or written, with the file (and line) named."""


def _rows(path: Path) -> list[dict[str, str]]:
    """The rows of the CSV at ``path`` as dicts of strings; a malformed line names itself."""
    try:
        with open(path, newline="", encoding="utf-8") as f:
            reader = csv.reader(f, strict=True)
            header = next(reader, None)
            if header is None:
                return []
            rows = []
            for fields in reader:
                if len(fields) != len(header):
                    raise LedgerError(
                        f"ledger {path}, line {reader.line_num}: {len(fields)} fields where the "
                        f"header has {len(header)}; fix or delete that line (each run's row is "
                        "also in its run folder, results.csv)"
                    )
                row = dict(zip(header, fields, strict=True))
                problem = "a second header" if fields == header else unreadable_number(row)
                if problem:
                    raise LedgerError(
                        f"ledger {path}, line {reader.line_num}: {problem}; fix or delete that "
                        "line (each run's row is also in its run folder, results.csv)"
                    )
                rows.append(row)
            return rows
    except csv.Error as e:
        raise LedgerError(
            f"ledger {path}, line {reader.line_num}: {e} (an unterminated quote?); fix or delete "
            "that line (each run's row is also in its run folder, results.csv)"
        ) from e
    except UnicodeDecodeError as e:
        raise LedgerError(f"ledger {path} is not UTF-8 text ({e}); is it a ledger?") from e
    except OSError as e:
        raise LedgerError(f"cannot read ledger {path}: {e.strerror or e}") from e


def unreadable_number(row: Mapping[str, str]) -> str | None:
    """What in ``row`` cannot be read as a number (None when all can): a cell of
    ``NUMBER_COLUMNS`` that is neither empty (not applicable) nor a float."""
    for column in NUMBER_COLUMNS:
        text = row.get(column, "")
        try:
            if text != "":
                float(text)
        except ValueError:
            return f"{column} is {text!r}, not a number"
    return None


def read_rows(path: str | os.PathLike) -> list[dict[str, str]]:
    """The ledger's rows (strings, in file order); a missing or empty file has none."""
    path = Path(path)
    return _rows(path) if path.is_file() else []


def version(row: Mapping[str, str]) -> int:
    """The row's ``ledger_version`` (1 for rows written before the column existed)."""
    text = str(row.get("ledger_version") or "").strip()
    return int(text) if text.isdigit() else 1


def parse_row(row: Mapping[str, str]) -> dict[str, Any]:
    """A ledger row with its JSON columns decoded (version 2 rows; others are returned as text)."""
    if version(row) < 2:
        return dict(row)
    out: dict[str, Any] = dict(row)
    for column in JSON_COLUMNS:
        text = row.get(column, "")
        if text != "":
            out[column] = json.loads(text)
    return out


def encode_row(row: Mapping[str, Any]) -> dict[str, Any]:
    """A results row ready for CSV: the JSON columns encoded, the version set."""
    out = {"ledger_version": LEDGER_VERSION, **row}
    for column in JSON_COLUMNS:
        if column in out:  # None (not applicable) stays an empty cell
            out[column] = "" if out[column] is None else json.dumps(out[column], sort_keys=True)
    return out


def check_writable(path: str | os.PathLike) -> None:
    """Before a run starts: the ledger is well-formed and can be appended to (or created)."""
    path = Path(path)
    read_rows(path)
    folder = path.parent
    while not folder.exists():  # the ledger's folder is made on the first append
        folder = folder.parent
    if not folder.is_dir():
        raise LedgerError(
            f"ledger {path}: {folder} is not a folder, so the ledger cannot be written there; "
            "pass paths.ledger=WRITABLE_PATH"
        )
    target = path if path.exists() else folder
    if not os.access(target, os.W_OK):
        raise LedgerError(
            f"ledger {path}: {target} is not writable; every run appends its row there at the "
            "end. Make it writable or pass paths.ledger=WRITABLE_PATH"
        )


def append(path: str | os.PathLike, row: Mapping[str, Any], key: str = "run_id") -> bool:
    """Append ``row`` (already encoded) unless a row with the same ``key`` is there.

    Under a lock (``<ledger>.lock``): read the ledger, rewrite it with the new row to a temporary
    file, replace. Readers never see a half-written row and concurrent runs never lose one. Columns
    are the union of the ledger's and the row's (new columns at the end, old rows left empty there).

    Returns:
        True when the row was added, False when the ledger already had it (a re-run of a finished run).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(path) + ".lock"):
        rows = read_rows(path)
        if any(r.get(key) == str(row[key]) for r in rows):
            return False
        columns = list(rows[0].keys()) if rows else []
        columns += [c for c in row if c not in columns]
        write_csv_atomic(path, [*rows, row], columns)
    return True


def append_command(run_dir: str | os.PathLike, ledger: str | os.PathLike) -> str:
    """The command that appends a finished run's row later."""
    return f"python -m eval.results.ledger append {run_dir} --ledger {ledger}"


def append_run(run_dir: str | os.PathLike, ledger: str | os.PathLike) -> bool:
    """Append the row of the finished run in ``run_dir`` (its ``results.csv``) to ``ledger``."""
    results = Path(run_dir) / "results.csv"
    if not results.is_file():
        raise LedgerError(f"{results} not found: {run_dir} is not a finished run's folder")
    rows = _rows(results)
    if len(rows) != 1:
        raise LedgerError(f"{results} holds {len(rows)} rows; a run's results hold one")
    return append(ledger, rows[0])


def by_recency(rows: Sequence[Mapping[str, Any]]) -> list[Mapping[str, Any]]:
    """Ledger rows oldest first: by timestamp, ties (and unparsable times, first) in file
    order."""
    import pandas as pd  # only for the readers of the ledger, not for appending a row

    times = pd.to_datetime(
        pd.Series([r.get("timestamp", "") for r in rows], dtype=object),
        errors="coerce",
        utc=True,
        format="ISO8601",
    )
    order = times.sort_values(kind="stable", na_position="first").index
    return [rows[i] for i in order]


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m eval.results.ledger", description=description(__doc__)
    )
    sub = parser.add_subparsers(dest="command", required=True)
    add = sub.add_parser("append", help="append a finished run's results.csv to the ledger")
    add.add_argument("run_dir", help="the run's folder (holds results.csv)")
    add.add_argument(
        "--ledger", default=str(home() / "outputs" / "ledger.csv"), help="the ledger CSV"
    )
    args = parser.parse_args(argv)
    try:
        added = append_run(args.run_dir, args.ledger)
    except LedgerError as e:
        raise SystemExit(f"Error: {e}") from None
    print(f"{args.ledger}: " + ("row added" if added else "row already there, not added again"))


if __name__ == "__main__":
    main()
