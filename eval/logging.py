"""Run outputs that survive a kill: atomic CSV writes, an append-only JSONL log, the ledger, and the
run loggers (CSV alone, or CSV plus Weights & Biases).

Every table is written to a temporary file in the same folder and moved into place with
``os.replace`` (atomic on POSIX and Windows), so a killed run leaves either the old file or the new
one, never a truncated one. The ledger is shared by every run (sweeps on a cluster finish in any
order), so appending to it takes a file lock around read, rewrite and replace.
"""

from __future__ import annotations

import contextlib
import csv
import json
import os
import tempfile
from collections.abc import Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import IO, Any

from filelock import FileLock


@contextlib.contextmanager
def atomic_open(path: str | os.PathLike, mode: str = "w", **kwargs: Any) -> Iterator[IO[Any]]:
    """Open a temporary sibling of ``path`` for writing (``mode`` "w" or "wb"); move it over
    ``path`` on success, delete it on failure, so ``path`` is never half written."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.fchmod(fd, 0o644)  # mkstemp makes it private; outputs and ledgers are shared
        with os.fdopen(fd, mode, **kwargs) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def write_csv_atomic(
    path: str | Path, rows: Iterable[Mapping[str, Any]], columns: Sequence[str]
) -> None:
    """Write ``rows`` (dicts keyed by ``columns``; missing keys left empty) as CSV, atomically."""
    with atomic_open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=list(columns), extrasaction="raise")
        writer.writeheader()
        writer.writerows(rows)


def write_text_atomic(path: str | Path, text: str) -> None:
    with atomic_open(path, "w", encoding="utf-8") as f:
        f.write(text)


def write_json_atomic(path: str | Path, obj: Any) -> None:
    with atomic_open(path, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=2, sort_keys=True)


def read_json_or_none(path: str | Path) -> Any:
    """The JSON document at ``path``, or None when there is no such file."""
    path = Path(path)
    if not path.exists():
        return None
    return json.loads(path.read_text(encoding="utf-8"))


def read_csv_rows(path: str | Path) -> list[dict[str, str]]:
    """The rows of a CSV file as dicts of strings (no type guessing: ids stay as written)."""
    with open(path, newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


def read_jsonl(path: str | Path, repair: bool = False) -> list[dict[str, Any]]:
    """The records of an append-only JSONL file; a missing file has none.

    A run killed while appending can leave a last line without its newline (or half written):
    it is dropped, and with ``repair=True`` cut from the file so that later appends start on a
    fresh line. A malformed line anywhere else means the file was edited: ``ValueError``.
    """
    path = Path(path)
    if not path.exists():
        return []
    data = path.read_bytes()
    complete = data[: data.rfind(b"\n") + 1]
    if repair and len(complete) < len(data):
        with open(path, "r+b") as f:
            f.truncate(len(complete))
    records = []
    for number, line in enumerate(complete.decode("utf-8").splitlines(), start=1):
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError as e:
            raise ValueError(
                f"{path}: line {number} is not valid JSON ({e}); the file was modified by hand. "
                "Delete the line (its image is then evaluated again) or start a new run directory."
            ) from e
    return records


class JsonlAppender:
    """Append one JSON record per line, flushed and fsynced so a kill loses at most that line."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self._file = open(self.path, "a", encoding="utf-8")  # noqa: SIM115 (kept open across calls)

    def append(self, records: Iterable[Mapping[str, Any]]) -> None:
        self._file.write("".join(json.dumps(r) + "\n" for r in records))
        self._file.flush()
        os.fsync(self._file.fileno())

    def close(self) -> None:
        self._file.close()


def append_ledger(path: str | Path, row: Mapping[str, Any], key: str = "run_id") -> bool:
    """Append ``row`` to the CSV ledger at ``path`` unless a row with the same ``key`` is there.

    Under a lock (``<ledger>.lock``): read the ledger, rewrite it with the new row to a temporary
    file, replace. Readers never see a half-written row and concurrent runs never lose one. Columns
    are the union of the ledger's and the row's (new columns at the end, old rows left empty there).

    Returns:
        True when the row was added, False when the ledger already had it (a re-run of a finished run).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(path) + ".lock"):
        rows = read_csv_rows(path) if path.exists() else []
        if any(r.get(key) == str(row[key]) for r in rows):
            return False
        columns = list(rows[0].keys()) if rows else []
        columns += [c for c in row if c not in columns]
        write_csv_atomic(path, [*rows, row], columns)
    return True


class CSVLogger:
    """Running metrics to ``metrics.csv`` in the run directory (the tables themselves are written by
    ``eval.run``). The base of the other loggers: ``logger=csv`` on the command line."""

    def __init__(self, run_dir: str | Path, run_config: Mapping[str, Any], run_id: str) -> None:
        self.run_dir = Path(run_dir)
        self._metrics = self.run_dir / "metrics.csv"
        self._columns: list[str] | None = None

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
    ) -> None:
        """Final results (one row), the per-class rows and the qualitative pictures."""

    def finish(self, exit_code: int = 0) -> None:
        """Close the logger; ``exit_code != 0`` marks a failed run."""


_WANDB_DIR_VARS = ("WANDB_CACHE_DIR", "WANDB_DATA_DIR", "WANDB_CONFIG_DIR")
# The user's own settings, read before any run sets them (a multirun starts several runs in
# one process: each must get its own folders, not the first run's).
_USER_WANDB_DIRS = {var: os.environ.get(var) for var in _WANDB_DIR_VARS}


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
        run_dir: str | Path,
        run_config: Mapping[str, Any],
        run_id: str,
        project: str = "diffseg-bench",
        entity: str | None = None,
        group: str | None = None,
        tags: Sequence[str] = (),
        mode: str | None = None,
        name: str | None = None,
    ) -> None:
        super().__init__(run_dir, run_config, run_id)
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
            id=run_id,
            name=name or self.run_dir.name,
            resume="allow",
            config=dict(run_config),
        )

    def log_running(self, step: int, metrics: Mapping[str, float]) -> None:
        super().log_running(step, metrics)
        self.run.log(dict(metrics), step=step)

    def log_final(
        self,
        results: Mapping[str, Any],
        per_class: Sequence[Mapping[str, Any]],
        images: Sequence[Path],
    ) -> None:
        columns = list(per_class[0]) if per_class else []
        table = self._wandb.Table(
            columns=columns, data=[[r[c] for c in columns] for r in per_class]
        )
        pictures = [self._wandb.Image(str(p), caption=p.stem) for p in images]
        self.run.log({"per_class": table, "qualitative": pictures})
        for key, value in results.items():
            self.run.summary[key] = value

    def finish(self, exit_code: int = 0) -> None:
        self.run.finish(exit_code=exit_code)
