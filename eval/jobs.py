"""How a run ends when it does not finish, and what a sweep says about its failed jobs.

Each run records its state in ``run.json`` (``status``: running, finished, failed with its
``error``, interrupted); a failed attempt appends its traceback to ``error.log`` in the run
directory. In a sweep (``python -m eval -m ...``) a failed job returns :class:`FailedRun`, so
the other jobs still run, and :class:`SweepSummary` (a Hydra callback, ``conf/config.yaml``) lists
the failed jobs at the end and exits 1.

Imports neither torch nor the model: the parent process of a sweep loads it as a callback.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import shlex
import shutil
import sys
import traceback
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, NoReturn

from hydra.experimental.callback import Callback
from omegaconf import DictConfig

from eval.atomic import read_json_or_none, read_jsonl, write_json_atomic

STATE_FILE = "run.json"
ERROR_LOG = "error.log"
# A sweep's refused jobs (a resume with other settings or inputs), one file each: a refusal
# writes nothing in its run folder, so the sweep folder keeps it for the summary.
REFUSED_DIR = ".refused"
# A failure may only overwrite these states: a refused resume must not mark a finished (or an
# interrupted, resumable) run as failed.
OVERWRITABLE = (None, "running", "failed")


def set_status(run_dir: Path, status: str, **fields: Any) -> None:
    """Set ``status`` (and ``fields``, e.g. ``error``) in ``run_dir/run.json``; a previous
    ``error`` is dropped."""
    path = Path(run_dir) / STATE_FILE
    state = read_json_or_none(path) or {}
    state.pop("error", None)
    write_json_atomic(path, {**state, "status": status, **fields})


def now() -> str:
    """The time now (UTC, to the second) as ISO 8601: the runs' timestamps."""
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def error_text(error: BaseException) -> str:
    return f"{type(error).__name__}: {error}"


def record_failure(run_dir: Path, error: BaseException, overrides: Sequence[str]) -> Path | None:
    """Mark the run failed and append ``error`` with its traceback to ``run_dir/error.log``.

    ``run.json`` is written unless it holds a state this attempt did not start (finished or
    interrupted: e.g. a resume refused for other settings). A run that failed before it started
    (missing data) gets a ``run.json`` without settings, which a later run there replaces.
    On a full disk ``run.json`` is rewritten in place (an atomic write needs a new block) and the
    log may be lost. Returns the log's path (None when it could not be written).
    """
    run_dir = Path(run_dir)
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        state = read_json_or_none(run_dir / STATE_FILE) or {}
    except (OSError, ValueError):  # not JSON (edited by hand; maybe the very error): left as is
        state = None
    if state is not None and state.get("status") in OVERWRITABLE:
        fields = {"error": error_text(error), "overrides": list(overrides)}
        try:
            set_status(run_dir, "failed", **fields)
        except OSError:
            state = {k: v for k, v in state.items() if k != "error"}
            with contextlib.suppress(OSError):
                (run_dir / STATE_FILE).write_text(
                    json.dumps({**state, "status": "failed", **fields}), encoding="utf-8"
                )
    log = run_dir / ERROR_LOG
    stamp = now()
    try:
        with open(log, "a", encoding="utf-8") as f:
            f.write(f"=== {stamp} python -m eval {shlex.join(overrides)}\n")
            f.write("".join(traceback.format_exception(error)))
    except OSError:
        return None
    return log


def resume_command(overrides: Sequence[str], run_dir: Path) -> str:
    """The command line that resumes the run in ``run_dir`` with the same settings."""
    return "python -m eval " + shlex.join([*overrides, f"hydra.run.dir={run_dir}"])


def finished_images(run_dir: Path) -> int:
    """The images recorded in the run's per-image logs (every rank's)."""
    from eval.distributed import RECORDS_FILE, rank_files

    paths = [Path(run_dir) / RECORDS_FILE, *rank_files(Path(run_dir))]
    return len({r["index"] for path in paths for r in read_jsonl(path)})


def record_interrupt(run_dir: Path, overrides: Sequence[str]) -> str:
    """Mark a started run interrupted; the one line to print: what was kept and how to resume."""
    run_dir = Path(run_dir).resolve()
    state = read_json_or_none(run_dir / STATE_FILE) or {}
    if state.get("status") == "running":
        set_status(run_dir, "interrupted")
    return (
        f"Interrupted: {finished_images(run_dir)} finished image(s) kept in "
        f"{run_dir / 'per_image.jsonl'}; resume with: {resume_command(overrides, run_dir)}"
    )


@dataclass(frozen=True)
class FailedRun:
    """What a failed job of a sweep returns instead of its mIoU.

    Not a number on purpose: Optuna's sweeper then marks the trial failed and, with
    ``max_failure_rate`` above 0, asks for the next one (a ``nan`` return makes the plugin itself
    raise and ends the search); the basic sweeper ignores return values.
    """

    error: str
    log: str

    def __float__(self) -> float:
        raise ValueError(str(self))

    def __str__(self) -> str:
        return f"failed run ({self.error}; log: {self.log})"


def record_refusal(
    sweep_dir: Path, run_dir: Path, job_num: int, error: BaseException, overrides: Sequence[str]
) -> None:
    """Keep a sweep job's refusal in ``sweep_dir/.refused/`` (its run folder stays untouched),
    for :func:`failed_jobs`."""
    run_dir, sweep_dir = Path(run_dir).resolve(), Path(sweep_dir).resolve()
    job = str(run_dir.relative_to(sweep_dir) if run_dir.is_relative_to(sweep_dir) else run_dir)
    state = {"status": "refused", "job": job, "error": error_text(error), "overrides": overrides}
    write_json_atomic(Path(sweep_dir) / REFUSED_DIR / f"{job_num}.json", state)


def failed_jobs(sweep_dir: Path) -> tuple[int, list[tuple[str, dict[str, Any]]]]:
    """``(number of jobs, [(job folder relative to the sweep, its state)])`` for the failed and
    refused jobs under ``sweep_dir``, in job order (a refused job's state: its refusal, from
    :func:`record_refusal`)."""
    states = {
        str(path.parent.relative_to(sweep_dir)): read_json_or_none(path) or {}
        for path in Path(sweep_dir).rglob(STATE_FILE)
    }
    refused = [read_json_or_none(p) or {} for p in (Path(sweep_dir) / REFUSED_DIR).glob("*.json")]
    states.update({r["job"]: r for r in refused if "job" in r})

    def order(name: str) -> tuple:
        return tuple(int(p) if p.isdigit() else p for p in Path(name).parts)

    names = sorted(states, key=order)
    bad = ("failed", "refused")
    return len(states), [(n, states[n]) for n in names if states[n].get("status") in bad]


def sweep_summary(sweep_dir: Path) -> str | None:
    """What failed in the sweep, one job a line with its log (None when nothing failed)."""
    total, failed = failed_jobs(sweep_dir)
    if not failed:
        return None
    lines = [f"{len(failed)} of {total} jobs failed in {sweep_dir} (the others' results are kept):"]
    for name, state in failed:
        error = state.get("error", "").splitlines()[0] if state.get("error") else "unknown error"
        lines.append(f"  job {name} ({' '.join(state.get('overrides', []))}): {error}")
        if state.get("status") == "refused":
            lines.append("      refused: nothing in its folder was changed")
        else:
            lines.append(f"      log: {Path(sweep_dir) / name / ERROR_LOG}")
    return "\n".join(lines)


class SweepSummary(Callback):
    """At the end of a multirun: the failed and refused jobs, then exit 1 (exit 0 when none
    failed). The refusals listed are this launch's (an earlier launch's are cleared first)."""

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        shutil.rmtree(Path(config.hydra.sweep.dir) / REFUSED_DIR, ignore_errors=True)

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        summary = sweep_summary(Path(config.hydra.sweep.dir))
        if summary:
            print("\n" + summary, file=sys.stderr)
            sys.exit(1)


def fail(error: BaseException, log: Path | None = None) -> NoReturn:
    """One clear line for an error that stops a run, and where its traceback is (``log``, the
    run's error.log; HYDRA_FULL_ERROR=1 raises it here)."""
    if os.environ.get("HYDRA_FULL_ERROR") == "1":
        raise error
    full = isinstance(error, OSError) and error.errno == errno.ENOSPC
    advice = (
        " (the disk is full: free space, or write elsewhere with DIFFSEG_HOME=PATH or "
        "hydra.run.dir=PATH; finished images are kept for a resume)"
        if full
        else ""
    )
    print(f"\nError: {error_text(error)}{advice}", file=sys.stderr)
    hint = f"full traceback in {log}" if log else "set HYDRA_FULL_ERROR=1 for the full traceback"
    print(f"({hint})", file=sys.stderr)
    sys.exit(1)
