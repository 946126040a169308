"""Device and dtype from what a user or a config says (``"auto"``, ``"cuda:1"``, ``"fp16"``...)."""

from __future__ import annotations

import torch

DTYPES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "float16": torch.float16,
    "fp16": torch.float16,
    "half": torch.float16,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
}


class DeviceUnavailableError(RuntimeError):
    """A valid device that this machine does not have (CUDA absent, or fewer GPUs)."""


def resolve_device(device: str | torch.device | None = None) -> torch.device:
    """``None`` or ``"auto"``: CUDA when available, else the CPU; anything else must name a
    torch device this machine has.

    Raises:
        ValueError: ``device`` is not a torch device name.
        DeviceUnavailableError: a CUDA device that is not available or not visible.
    """
    if device is None or str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        resolved = torch.device(device)
    except RuntimeError as e:
        raise ValueError(
            f"device={device!r} is not a torch device; use auto, cpu or cuda[:N]"
        ) from e
    if resolved.type == "cuda":
        if not torch.cuda.is_available():
            raise DeviceUnavailableError(
                f"device={device} but CUDA is not available (torch {torch.__version__}, "
                f"built for CUDA: {torch.version.cuda or 'no'}); use device=cpu or device=auto"
            )
        if resolved.index is not None and resolved.index >= torch.cuda.device_count():
            raise DeviceUnavailableError(
                f"device={device} but only {torch.cuda.device_count()} CUDA device(s) are visible"
            )
    return resolved


def resolve_dtype(dtype: str | torch.dtype | None, device: torch.device) -> torch.dtype:
    """fp32 on CPU, fp16 on CUDA unless `dtype` says otherwise ("float16", "bf16", torch.float32...)."""
    if dtype is None:
        return torch.float16 if device.type == "cuda" else torch.float32
    if isinstance(dtype, torch.dtype):
        resolved = dtype
    else:
        name = str(dtype).removeprefix("torch.")
        if name not in DTYPES:
            raise ValueError(f"dtype={dtype!r} is not supported; use one of {sorted(DTYPES)}")
        resolved = DTYPES[name]
    if resolved not in (torch.float32, torch.float16, torch.bfloat16):
        raise ValueError(f"dtype={dtype!r} is not supported; use float32, float16 or bfloat16")
    return resolved
