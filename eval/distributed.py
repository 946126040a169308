"""Data-parallel evaluation under ``torchrun --nproc_per_node=N -m eval ...``.

One process per device. Each rank evaluates its own contiguous share of the images still to do
(no padding, so every image is evaluated exactly once), appends its per-image records to its own
``per_image.rank<R>.jsonl`` (rank 0: ``per_image.jsonl``), and at the end the records are gathered
to rank 0 (``gather_object``), the metric's sum-reduced states are reduced with torchmetrics' own
sync, and rank 0 alone writes the tables, W&B and the ledger row.

The process group is ``cpu:gloo,cuda:nccl`` on a machine with CUDA (NCCL for CUDA tensors; the
harness only exchanges small CPU objects and int64 counts, which go through gloo) and ``gloo``
otherwise. It is started only when ``WORLD_SIZE > 1``; a plain ``python -m eval`` never touches
``torch.distributed``.

Hydra's ``${now:...}`` in ``hydra.run.dir`` is evaluated in each process, so ranks started a
second apart would write to different folders. ``shared_run_time`` fixes that: rank 0 reads the
clock and broadcasts it, and ``conf/config.yaml`` takes the time from the environment variable
``DIFFSEG_RUN_TIME`` when it is set (an explicit ``hydra.run.dir=...`` works as well).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any, TypeVar

import torch
import torch.distributed as dist

from eval.atomic import JsonlAppender, read_jsonl

RUN_TIME_VAR = "DIFFSEG_RUN_TIME"
# Must match the pattern of `${now:...}` in conf/config.yaml.
RUN_TIME_FORMAT = "%Y-%m-%d_%H-%M-%S"
RECORDS_FILE = "per_image.jsonl"

T = TypeVar("T")


@dataclass(frozen=True)
class Rank:
    """Where this process stands: ``rank`` of ``world_size``, ``local_rank`` on its node."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


SINGLE = Rank()  # a plain single-process run


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name)
    if value is None or value == "":
        return default
    try:
        return int(value)
    except ValueError as e:
        raise ValueError(f"environment variable {name}={value!r} must be an integer") from e


def launched_distributed() -> bool:
    """True under torchrun (or any launcher) with ``WORLD_SIZE > 1``."""
    return _env_int("WORLD_SIZE", 1) > 1


def init() -> Rank:
    """Start the process group from torchrun's environment when ``WORLD_SIZE > 1`` (idempotent).

    On CUDA machines each rank is pinned to ``cuda:LOCAL_RANK`` before NCCL starts.
    """
    if not launched_distributed():
        return SINGLE
    if not dist.is_initialized():
        local_rank = _env_int("LOCAL_RANK", 0)
        if torch.cuda.is_available():
            if local_rank >= torch.cuda.device_count():
                raise RuntimeError(
                    f"LOCAL_RANK={local_rank} but only {torch.cuda.device_count()} CUDA device(s) "
                    "are visible: use --nproc_per_node <= the number of GPUs"
                )
            torch.cuda.set_device(local_rank)
            dist.init_process_group("cpu:gloo,cuda:nccl")
        else:
            dist.init_process_group("gloo")
    return current()


def current() -> Rank:
    """This process's rank (``Rank()`` when not distributed)."""
    if not (dist.is_available() and dist.is_initialized()):
        return SINGLE
    return Rank(dist.get_rank(), dist.get_world_size(), _env_int("LOCAL_RANK", 0))


def shutdown() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def shared_run_time() -> str:
    """Rank 0's clock as ``RUN_TIME_FORMAT``, the same string on every rank; also exported as
    ``DIFFSEG_RUN_TIME`` so that Hydra's run directory is the same for all ranks. A value already
    in the environment (e.g. set for a whole SLURM job) is kept."""
    if os.environ.get(RUN_TIME_VAR):
        return os.environ[RUN_TIME_VAR]
    value = [datetime.now().strftime(RUN_TIME_FORMAT)]
    if current().distributed:
        dist.broadcast_object_list(value, src=0)
    os.environ[RUN_TIME_VAR] = value[0]
    return value[0]


def device_for(device: torch.device, rank: Rank) -> torch.device:
    """Under torchrun each rank takes ``cuda:LOCAL_RANK`` (a CUDA device asked for without or with
    an index); CPU stays CPU."""
    if rank.distributed and device.type == "cuda":
        return torch.device("cuda", rank.local_rank)
    return device


def shard(indices: Sequence[int], rank: int, world_size: int) -> list[int]:
    """Rank ``rank``'s contiguous share of ``indices``: the first ``len % world_size`` ranks take
    one more. The shares partition ``indices`` (no padding, no duplicates); a share may be empty."""
    if not 0 <= rank < world_size:
        raise ValueError(f"rank must be in [0, world_size={world_size}), got {rank}")
    base, extra = divmod(len(indices), world_size)
    start = rank * base + min(rank, extra)
    return list(indices[start : start + base + (rank < extra)])


def records_file(run_dir: Path, rank: int) -> Path:
    """The per-image log a rank appends to: ``per_image.jsonl`` for rank 0 (the single-process
    name), ``per_image.rank<R>.jsonl`` for the others."""
    return run_dir / (RECORDS_FILE if rank == 0 else f"per_image.rank{rank}.jsonl")


def rank_files(run_dir: Path) -> list[Path]:
    """The other ranks' per-image logs left in ``run_dir`` (by a run killed before it merged)."""
    return sorted(run_dir.glob("per_image.rank*.jsonl"))


def read_records(run_dir: Path, n_total: int) -> dict[int, dict[str, Any]]:
    """The finished images' records by index, from ``per_image.jsonl`` and any rank files (a
    resumed run may use another number of processes), each repaired after a torn last line.
    Indices ``>= n_total`` (a larger earlier ``limit``) are left out."""
    records: dict[int, dict[str, Any]] = {}
    for path in [run_dir / RECORDS_FILE, *rank_files(run_dir)]:
        for r in read_jsonl(path, repair=True):
            if r["index"] < n_total:
                records[r["index"]] = r
    return records


def merge_rank_files(run_dir: Path, records: Sequence[Mapping[str, Any]]) -> None:
    """Append ``records`` (all of the run's: rank files may hold records of an earlier session)
    that ``per_image.jsonl`` lacks, then delete the rank files: the run directory ends as a
    single-process run leaves it. A kill in between leaves records in both files, which
    ``read_records`` reads as one."""
    path = run_dir / RECORDS_FILE
    have = {r["index"] for r in read_jsonl(path, repair=True)}
    appender = JsonlAppender(path)
    try:
        appender.append(sorted((r for r in records if r["index"] not in have), key=_index))
    finally:
        appender.close()
    for extra in rank_files(run_dir):
        extra.unlink()


def _index(record: Mapping[str, Any]) -> int:
    return record["index"]


def on_main(fn: Callable[[], T], rank: Rank) -> T:
    """``fn()`` on rank 0, its result broadcast to every rank. An exception on rank 0 is raised on
    every rank (as a RuntimeError with its message on the others), so none waits forever."""
    if not rank.distributed:
        return fn()
    box: list[Any] = [None]
    if rank.is_main:
        try:
            box[0] = ("ok", fn())
        except Exception as e:
            dist.broadcast_object_list([("error", f"{type(e).__name__}: {e}")], src=0)
            raise
    dist.broadcast_object_list(box, src=0)
    status, value = box[0]
    if status == "error":
        raise RuntimeError(f"rank 0 failed: {value}")
    return value


def gather_records(
    records: Sequence[Mapping[str, Any]], rank: Rank
) -> list[Mapping[str, Any]] | None:
    """Every rank's ``records`` on rank 0 (a flat list, rank order); None on the other ranks."""
    if not rank.distributed:
        return list(records)
    out: list[Any] | None = [None] * rank.world_size if rank.is_main else None
    dist.gather_object(list(records), out, dst=0)
    if out is None:
        return None
    return [r for part in out for r in part]


def sync_metric(metric: Any, rank: Rank) -> None:
    """Reduce a torchmetrics metric's states over all ranks in place (torchmetrics' ``sync``:
    ``dist_reduce_fx`` of each state); a no-op in a single process. Collective: every rank calls it.

    The metric must have been built with ``sync_on_compute=False`` (so running values during the
    loop stay local and never block); after this, ``compute()`` gives the dataset's numbers.
    """
    if not rank.distributed:
        return
    # compute() must not have run before (it caches): the loop reads running scores from the
    # states (eval.scoring.metrics.running_scores).
    metric.sync(should_sync=True, distributed_available=lambda: True)


class NullLogger:
    """The run logger of ranks other than 0: they log nothing."""

    def log_running(self, step: int, metrics: Mapping[str, float]) -> None:
        pass

    def log_final(self, results: Any, per_class: Any, images: Any, prefix: str = "") -> None:
        pass

    def finish(self, exit_code: int = 0) -> None:
        pass


def gather_on_main(
    records: dict[int, dict[str, Any]], metric: Any, run_dir: Path, rank: Rank
) -> bool:
    """After the loop under torchrun: rank 0 gathers the other ranks' records (into ``records``
    and its run files) and every rank's metric states. True on rank 0, which goes on to write the
    outputs; False on the others."""
    others = gather_records([] if rank.is_main else records.values(), rank)
    sync_metric(metric, rank)
    if not rank.is_main:
        return False
    records.update({r["index"]: r for r in others})
    merge_rank_files(run_dir, list(records.values()))
    return True
