"""Files that survive a kill: atomic writes (CSV, text, JSON) and an append-only JSONL log.

Every file is written to a temporary file in the same folder and moved into place with
``os.replace`` (atomic on POSIX and Windows), so a killed run leaves either the old file or the new
one, never a truncated one.
"""

from __future__ import annotations

import contextlib
import csv
import json
import math
import os
import tempfile
from collections.abc import Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import IO, Any


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


def blank_nan(value: Any) -> Any:
    """nan (not applicable, not computable) as an empty CSV cell."""
    return "" if isinstance(value, float) and math.isnan(value) else value
