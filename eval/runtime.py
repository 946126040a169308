"""Where a run computes and how it starts: the device, the seeds, the errors that stop a run."""

from __future__ import annotations

import random

import numpy as np
import torch

from diffseg import devices


class RunError(RuntimeError):
    """A run that cannot go on, with a message that says what to do."""


def resolve_device(device: str) -> torch.device:
    """``auto`` -> CUDA when available, else CPU; an explicit CUDA device must exist
    (:func:`diffseg.devices.resolve_device`; a missing one is a :class:`RunError` here)."""
    try:
        return devices.resolve_device(device)
    except devices.DeviceUnavailableError as e:
        raise RunError(str(e)) from e


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


class RunRefused(RunError):
    """A run refused before it changed anything in its folder (a resume whose inputs differ, a
    folder another process is using): the folder is left as found, no failure recorded there."""
