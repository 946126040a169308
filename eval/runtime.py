"""Where a run computes and how it starts: the device, the seeds, the errors that stop a run."""

from __future__ import annotations

import random

import numpy as np
import torch


class RunError(RuntimeError):
    """A run that cannot go on, with a message that says what to do."""


def resolve_device(device: str) -> torch.device:
    """``auto`` -> CUDA when available, else CPU; an explicit CUDA device must exist."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except RuntimeError as e:
        raise ValueError(
            f"device={device!r} is not a torch device; use auto, cpu or cuda[:N]"
        ) from e
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise RunError(
                f"device={device} but CUDA is not available (torch {torch.__version__}, "
                f"built for CUDA: {torch.version.cuda or 'no'}); use device=cpu or device=auto"
            )
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise RunError(
                f"device={device} but only {torch.cuda.device_count()} CUDA device(s) are visible"
            )
    return dev


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
