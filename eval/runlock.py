"""One process per run folder: an exclusive OS lock on ``RUN_DIR/.lock``, held while the run is.

Two runs appending to one folder would each evaluate the images the other is doing and log them
twice. The lock is ``flock`` on an open file: the OS drops it when its process ends, a kill
included, so a killed run never leaves it stuck. The file holds the owner (pid, host, start), so a
refused run can name it; a refusal writes nothing.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import socket
from collections.abc import Iterator
from datetime import datetime, timezone
from pathlib import Path

from eval.runtime import RunError, RunRefused

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
        stamp = datetime.now(timezone.utc).isoformat(timespec="seconds")
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"pid {os.getpid()} on {socket.gethostname()}, since {stamp}\n".encode(), 0)
        yield
    finally:
        os.close(fd)  # releases the lock
