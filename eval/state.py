"""A run's state on disk, for resuming: ``run.json`` (id, the settings that decide the numbers,
status) and ``config.yaml``; the per-image records of the images already finished.

Resumable: each finished image is appended to ``per_image.jsonl`` (flushed and fsynced) with its
integer TP/FP/FN counts; the metric adds those counts (``update(counts=)``), the stored ones of a
resumed run's finished images as the new ones. It only sums integers, so the numbers are exactly
those of a run that never stopped.

Resuming is refused, naming what differs, unless the inputs are the same: every recorded
setting, the weights' fingerprint (``eval.models.digests.weights_fingerprint``: their content), the
dataset's root and identity (``eval.datasets.cache.identity``: its items' ids and files' sizes
and mtimes). A refusal changes nothing in the run folder: Hydra's ``.hydra/`` is written here,
once the run is accepted (``hydra.output_subdir`` is null), not by Hydra at every launch.

One process per run folder (:func:`run_lock`): two runs appending to one folder would each
evaluate the images the other is doing and log them twice. The lock is ``flock`` on
``RUN_DIR/.lock``: the OS drops it when its process ends, a kill included, so a killed run never
leaves it stuck. The file holds the owner (pid, host, start), so a refused run can name it; a
refusal writes nothing.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import socket
import uuid
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from omegaconf import OmegaConf

from eval import distributed
from eval.atomic import read_json_or_none, write_json_atomic, write_text_atomic
from eval.jobs import now, set_status
from eval.models.digests import weights_fingerprint
from eval.results import ledger as ledger_io
from eval.runtime import RunError, RunRefused
from eval.schema import NOT_SETTINGS

if TYPE_CHECKING:
    from eval.plan import RunPlan

# Settings that change the numbers: a resumed run must have the same ones, and the same dataset
# settings except where the files are and where eval.tools.prepare gets them. (Batch size and workers
# do not change the labels.)
PINNED_KEYS = ("protocol", "seed", "limit", "model")
# Pinned values that can be unknown when a run starts: a hub model's snapshot before its download
# (recorded as ""), learnt by the resume.
LEARNT_ON_RESUME = ("weights",)


def check_writable(run_dir: Path, ledger: Path) -> None:
    """Before any data or model is touched: the run folder and the ledger can be written (a run
    that finds out at its end has lost its compute)."""
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        probe = run_dir / f".write-test-{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as e:
        raise RunError(
            f"cannot write the run folder {run_dir} ({e.strerror or e}); make it writable or "
            "choose another with hydra.run.dir=PATH"
        ) from e
    ledger_io.check_writable(ledger)


def pinned(plan: RunPlan, device: torch.device, dataset: Any = None) -> dict[str, Any]:
    """The settings and inputs a resumed run must share with the run it resumes (``dataset``:
    the loaded dataset, for its identity)."""
    out = {k: plan.config[k] for k in PINNED_KEYS}
    # The segmenters' normalised settings (a scalar KL threshold is [k, k, k]), as recorded.
    for segmenter in plan.segmenters:
        if segmenter.own:
            out["segmenter"] = segmenter.settings
        else:  # "segmenters" absent without, as before
            out.setdefault("segmenters", {})[segmenter.name] = segmenter.settings
    out["dataset"] = {k: v for k, v in plan.dataset.items() if k not in NOT_SETTINGS}
    root = plan.dataset.get("root")
    out["dataset_root"] = None if root is None else str(Path(root).expanduser().resolve())
    if dataset is not None:
        from eval.datasets.cache import identity

        out["dataset_identity"] = identity(dataset)
    out["weights"] = weights_fingerprint(plan.model)
    out["device_type"] = device.type
    if plan.cache is not None:
        # Segmenting stored (rounded) attention can change labels; absent when off, as before.
        out["attention_cache"] = plan.cache["dtype"]
    return out


def open_run_state(
    run_dir: Path, pinned: dict[str, Any], config: Mapping[str, Any] | None = None
) -> dict[str, Any]:
    """Create ``run.json`` (run id + pinned settings) and ``config.yaml`` (the composed config,
    resolved) for a new run, or check the settings of the existing run on resume.

    ``config.yaml`` keeps what the run was started with; ``.hydra/`` what it was last accepted
    with. A refusal (:class:`RunRefused`) writes nothing.
    """
    path = run_dir / "run.json"
    state = read_json_or_none(path)
    if state is None or "pinned" not in state:  # none, or a run that failed before it started
        state = {
            "run_id": uuid.uuid4().hex[:12],
            "created": now(),
            "pinned": pinned,
            "status": "running",
        }
        if config is not None:
            write_text_atomic(run_dir / "config.yaml", OmegaConf.to_yaml(config, resolve=True))
        write_json_atomic(path, state)
        write_hydra_files(run_dir, config)
        return state
    old = state["pinned"]
    diffs = resume_differences(old, pinned)
    if diffs:
        raise RunRefused(
            f"{run_dir} holds a run with other settings or inputs, so it cannot be resumed with "
            "these:\n  " + "\n  ".join(diffs) + "\nRun again with the original settings and "
            "inputs, or drop hydra.run.dir to start a new run."
        )
    learnt = {k: pinned[k] for k in LEARNT_ON_RESUME if k in pinned and old.get(k) != pinned[k]}
    state = {**state, "pinned": {**old, **learnt}}
    write_json_atomic(path, state)
    set_status(run_dir, "running")
    write_hydra_files(run_dir, config)
    return state


def resume_differences(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    """``KEY: OLD (run) vs NEW (now)`` for each pinned value that differs, nested settings by
    their dotted key (``segmenter.num_points: 16 (run) vs 8 (now)``); a value of
    ``LEARNT_ON_RESUME`` the run did not know, "", is learnt, not a difference."""
    old, new = flatten(old), flatten(new)
    return [
        f"{k}: {old.get(k)!r} (run) vs {new.get(k)!r} (now)"
        for k in sorted(set(old) | set(new))
        if old.get(k) != new.get(k) and not (k in LEARNT_ON_RESUME and old.get(k) == "")
    ]


def flatten(values: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested mappings as one level of dotted keys (lists and other values kept whole)."""
    out: dict[str, Any] = {}
    for key, value in values.items():
        if isinstance(value, Mapping) and value:
            out.update(flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def write_hydra_files(run_dir: Path, config: Mapping[str, Any] | None) -> None:
    """Hydra's ``.hydra/config.yaml``, ``hydra.yaml`` and ``overrides.yaml`` of this launch (as
    Hydra writes them; nothing outside a Hydra app)."""
    from hydra.core.hydra_config import HydraConfig

    if config is None or not HydraConfig.initialized():
        return
    hydra_cfg = HydraConfig.get()
    folder = run_dir / ".hydra"
    write_text_atomic(folder / "config.yaml", OmegaConf.to_yaml(config))
    write_text_atomic(folder / "hydra.yaml", OmegaConf.to_yaml({"hydra": hydra_cfg}))
    write_text_atomic(folder / "overrides.yaml", OmegaConf.to_yaml(hydra_cfg.overrides.task))


def open_run(
    plan: RunPlan,
    device: torch.device,
    n_total: int,
    rank: distributed.Rank,
    dataset: Any = None,
) -> tuple[str, dict[str, dict[int, dict[str, Any]]], list[int]]:
    """The run's id, per segmenter of the plan (by config key) the records of its finished
    images (rank 0; other ranks: none), and this rank's share of the images some segmenter has
    still to do; ``dataset``: the loaded dataset, whose identity a resume checks.

    Rank 0 reads (and repairs) the per-image logs before any rank appends, so all ranks split the
    same list of images still to do.
    """

    def open_on_main() -> tuple[str, dict[str, dict[int, dict[str, Any]]]]:
        run_id = open_run_state(plan.run_dir, pinned(plan, device, dataset), plan.config)["run_id"]
        return run_id, {s.key: distributed.read_records(s.folder, n_total) for s in plan.segmenters}

    run_id, records = distributed.on_main(open_on_main, rank)
    todo = distributed.shard(
        [i for i in range(n_total) if any(i not in done for done in records.values())],
        rank.rank,
        rank.world_size,
    )
    return run_id, records if rank.is_main else {s.key: {} for s in plan.segmenters}, todo


LOCK_FILE = ".lock"


@contextlib.contextmanager
def run_lock(run_dir: str | os.PathLike) -> Iterator[None]:
    """Hold ``run_dir``'s lock for the block; :class:`RunRefused` at once, naming the folder and
    the other process, when another process holds it."""
    run_dir = Path(run_dir)
    path = run_dir / LOCK_FILE
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as e:
        raise RunError(
            f"cannot write the run folder {run_dir} ({e.strerror or e}); make it writable or "
            "choose another with hydra.run.dir=PATH"
        ) from e
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            owner = os.read(fd, 1024).decode(errors="replace").strip() or "unknown process"
            raise RunRefused(
                f"{run_dir.resolve()} is in use by another run ({owner}); wait for it to end, or "
                "choose another folder with hydra.run.dir=PATH"
            ) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"pid {os.getpid()} on {socket.gethostname()}, since {now()}\n".encode(), 0)
        yield
    finally:
        os.close(fd)  # releases the lock
