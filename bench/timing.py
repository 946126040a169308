"""The benchmarks' one timer: wall-clock seconds of a call, CUDA work included."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any, TypeVar

import torch

T = TypeVar("T")


def synchronize(device: torch.device | str) -> None:
    """Wait for the device's queued work (CUDA kernels run asynchronously); no-op on the CPU."""
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def timed(
    device: torch.device | str, fn: Callable[..., T], *args: Any, **kwargs: Any
) -> tuple[float, T]:
    """``(seconds, fn(*args, **kwargs))``, the time from the device idle to the call's work done."""
    synchronize(device)
    start = time.perf_counter()
    out = fn(*args, **kwargs)
    synchronize(device)
    return time.perf_counter() - start, out
