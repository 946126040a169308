"""Where a run computes and how it starts: the device, the seeds, the errors that stop a run."""

from __future__ import annotations

import random
from typing import Any

import numpy as np
import torch
from omegaconf import DictConfig


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


def check_config(cfg: DictConfig) -> None:
    """Values Hydra cannot type-check, checked before any data or model is touched."""

    def positive_int(name: str, value: Any, allow_none: bool = False) -> None:
        if value is None and allow_none:
            return
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            extra = " or null (all)" if allow_none else ""
            raise ValueError(f"{name} must be a positive integer{extra}, got {value!r}")

    positive_int("limit", cfg.limit, allow_none=True)
    positive_int("batch_size", cfg.batch_size)
    if (
        isinstance(cfg.num_workers, bool)
        or not isinstance(cfg.num_workers, int)
        or cfg.num_workers < 0
    ):
        raise ValueError(f"num_workers must be an integer >= 0, got {cfg.num_workers!r}")
    if not isinstance(cfg.n_qualitative, int) or cfg.n_qualitative < 0:
        raise ValueError(f"n_qualitative must be an integer >= 0, got {cfg.n_qualitative!r}")
    if not isinstance(cfg.seed, int):
        raise ValueError(f"seed must be an integer, got {cfg.seed!r}")
