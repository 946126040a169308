"""Running the project's command-line modules from tests, offline."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path


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
