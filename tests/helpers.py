"""Running the project's command-line modules from tests, offline, and reading what W&B wrote."""

from __future__ import annotations

import json
import os
import struct
import subprocess
import sys
from pathlib import Path
from typing import Any


def offline_env(**extra: str) -> dict[str, str]:
    """This environment without W&B settings or a parent run's variables, offline, one thread.

    One torch thread: the test workers share the cores, and oversubscribed threads crawl.
    """
    env = {k: v for k, v in os.environ.items() if not k.startswith(("WANDB_", "DIFFSEG_"))}
    env.update(WANDB_MODE="offline", HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1", **extra)
    return env


def run_module(module: str, cwd: Path, *args: str, **env_extra: str) -> subprocess.CompletedProcess:
    """``python -m MODULE ARGS`` in ``cwd`` with :func:`offline_env`; output captured as text.

    ``DIFFSEG_HOME`` (where default ``data/`` and ``outputs/`` go) is ``cwd`` unless given, so
    that a test never writes into the project."""
    return subprocess.run(
        [sys.executable, "-m", module, *args],
        cwd=cwd,
        env=offline_env(**{"DIFFSEG_HOME": str(cwd), **env_extra}),
        capture_output=True,
        text=True,
        timeout=300,
    )


def wandb_records(path: Path):
    """The protobuf records of a W&B transaction log (`.wandb`): a 7-byte header (":W&B", magic,
    version), then LevelDB-log blocks of 32 KiB whose chunks have a 7-byte header (crc32, length,
    type: 1 full, 2 first, 3 middle, 4 last)."""
    from wandb.proto import wandb_internal_pb2

    data = path.read_bytes()
    assert data[:4] == b":W&B"
    pos, block, pending = 7, 32768, b""
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # block trailer too short for a header: zero padding
            pos += block - pos % block
            continue
        _, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        chunk = data[pos + 7 : pos + 7 + length]
        pos += 7 + length
        if kind == 0 and length == 0:
            break
        pending = chunk if kind in (1, 2) else pending + chunk
        if kind in (1, 4):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            yield record


def wandb_summary(run_dir: Path) -> dict[str, Any]:
    """The summary values of the offline W&B run in ``run_dir``, read from its transaction log
    (offline runs write no summary file)."""
    (log,) = (run_dir / "wandb").glob("offline-run-*/run-*.wandb")
    summary: dict[str, Any] = {}
    for record in wandb_records(log):
        if record.WhichOneof("record_type") == "summary":
            summary.update(
                {item.key: json.loads(item.value_json) for item in record.summary.update}
            )
    return summary
