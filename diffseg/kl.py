"""Symmetric KL divergence between attention maps, as the official DiffSeg defines it.

``KL(x, y) = 1/2 * sum((x - y) * (log x - log y))`` over the map's positions. Zeros follow the
mathematical limits: a position where both maps are 0 contributes 0, a position where exactly one
is 0 makes the distance ``+inf`` (never merged). The official code has no zero handling (it gives
nan there, which also never merges); for strictly positive maps the two agree. :func:`kl_float16`
is the official first-iteration arithmetic, nan included (``first_merge_dtype="float16"``).
"""

from __future__ import annotations

import torch


def kl_direct(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Elementwise symmetric KL: ``x (..., S, S)`` and ``y (..., S, S)`` broadcast -> ``(...)``.

    The reference form: materialises the broadcast ``(..., S, S)`` product, so keep inputs small.
    Computed in the inputs' dtype.
    """
    term = x - y
    term *= torch.log(x) - torch.log(y)
    # Only 0 * (log 0 - log 0) is nan; one-sided zeros already give +inf.
    return term.nan_to_num_(nan=0.0, posinf=float("inf")).sum(dim=(-2, -1)) / 2


def _check_all_pairs(anchors: torch.Tensor, maps: torch.Tensor, chunk_size: int) -> None:
    if anchors.ndim != 3 or maps.ndim != 3 or anchors.shape[1:] != maps.shape[1:]:
        raise ValueError(
            f"anchors and maps must be (A, S, S) and (M, S, S) with the same S, got "
            f"{tuple(anchors.shape)} and {tuple(maps.shape)}"
        )
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be a positive int, got {chunk_size}")


def kl_matrix(
    anchors: torch.Tensor,
    maps: torch.Tensor,
    dtype: torch.dtype = torch.float64,
    chunk_size: int = 1024,
) -> torch.Tensor:
    """All-pairs symmetric KL ``(A, M)`` between ``anchors (A, S, S)`` and ``maps (M, S, S)``.

    Expands ``KL = 1/2 (sum x log x + sum y log y - x . log y - y . log x)`` so the cross terms are
    two matrix products, ``x @ log(y).T`` and ``log(x) @ y.T``; ``maps`` are processed ``chunk_size``
    at a time, so besides the inputs only a few ``(chunk_size, S*S)`` tensors and the ``(A, M)``
    result are held (never an ``A x M x S x S`` tensor). ``dtype`` is the computing precision:
    float64 by default, because in float32 the cancellation between the O(10) terms leaves
    errors of ~2e-5, which flipped a threshold decision relative to the exact value on realistic
    64x64 attention (see ``bench/RESULTS.md``); the float64 cost is measured there too.
    """
    _check_all_pairs(anchors, maps, chunk_size)
    tiny = torch.finfo(dtype).tiny
    a = anchors.reshape(anchors.shape[0], -1).to(dtype)
    # Clamping the logs keeps 0 * log 0 = 0 inside the products; zero-support mismatches are then
    # set to +inf explicitly below.
    a_log = a.clamp_min(tiny).log_()
    a_self = (a * a_log).sum(dim=1)
    a_zero = a == 0
    any_zero = bool(a_zero.any())
    out = torch.empty((a.shape[0], maps.shape[0]), dtype=dtype, device=anchors.device)
    for start in range(0, maps.shape[0], chunk_size):
        y = maps[start : start + chunk_size].reshape(-1, a.shape[1]).to(dtype)
        y_log = y.clamp_min(tiny).log_()
        kl = a_self[:, None] + (y * y_log).sum(dim=1)[None, :]
        kl -= a @ y_log.T
        kl -= a_log @ y.T
        kl /= 2
        y_zero = y == 0
        if any_zero or bool(y_zero.any()):
            a_pos, y_pos = (~a_zero).to(dtype), (~y_zero).to(dtype)
            mismatch = a_pos @ y_zero.to(dtype).T + a_zero.to(dtype) @ y_pos.T
            kl.masked_fill_(mismatch > 0, float("inf"))
        out[:, start : start + chunk_size] = kl
    return out


def kl_float16(anchors: torch.Tensor, maps: torch.Tensor, chunk_size: int = 16) -> torch.Tensor:
    """All-pairs symmetric KL ``(A, M)`` float16 as the official iteration 1 evaluates it.

    ``anchors (A, S, S)`` and ``maps (M, S, S)`` are cast to float16, so entries of at most
    ``2**-25`` become 0; then, elementwise in float16, ``q = log x - log y`` and
    ``KL = sum(x * q) / 2 - sum(y * q) / 2`` (each sum accumulated in float32 and rounded to
    float16, as TF's GPU and torch's half-precision reductions do; the order of the float32
    additions may differ from TF's, so a KL within a rounding step of the threshold could still
    decide otherwise than the official run). No zero handling: a 0 in either
    map gives ``0 * -inf = nan``, so that pair's KL is nan, which is below no threshold.
    ``chunk_size`` anchors at a time, each holding two ``(chunk_size, M, S*S)`` float16 tensors
    (512 MiB each for 16 anchors at ``S = 64``), as the official code splits its anchors.
    """
    _check_all_pairs(anchors, maps, chunk_size)
    a = anchors.reshape(anchors.shape[0], -1).to(torch.float16)
    y = maps.reshape(maps.shape[0], -1).to(torch.float16)
    y_log = y.log()
    out = torch.empty((a.shape[0], y.shape[0]), dtype=torch.float16, device=anchors.device)
    for start in range(0, a.shape[0], chunk_size):
        x = a[start : start + chunk_size, None, :]
        q = x.log() - y_log[None]
        term = x * q
        kl_x = term.sum(dim=-1) / 2
        torch.mul(y[None], q, out=term)
        out[start : start + chunk_size] = kl_x - term.sum(dim=-1) / 2
    return out


KL_DTYPES = ("auto", "float64", "float32")
# GPUs with full-rate float64 (P100, V100, A100, H100 and H200): the float64 KL is as fast there.
_FAST_FLOAT64 = {(6, 0), (7, 0), (8, 0), (9, 0)}


def resolve_kl_dtype(kl_dtype: str, device: torch.device) -> str:
    """``kl_dtype`` ("auto", "float64" or "float32") as the arithmetic :func:`kl_below` uses on
    ``device``. "auto": float32 (with its float64 re-check) on GPUs whose float64 is slow (all
    but those of :data:`_FAST_FLOAT64`), float64 elsewhere: on a CPU float64 products cost only
    ~1.6x float32's, less than the float32 path's checks (``bench/bench_merge.py`` times both)."""
    if kl_dtype not in KL_DTYPES:
        raise ValueError(f"kl_dtype must be one of {KL_DTYPES}, got {kl_dtype!r}")
    if kl_dtype != "auto":
        return kl_dtype
    slow = device.type == "cuda" and torch.cuda.get_device_capability(device) not in _FAST_FLOAT64
    return "float32" if slow else "float64"


def kl_below(
    anchors: torch.Tensor,
    maps: torch.Tensor,
    threshold: float,
    kl_dtype: str = "float64",
    chunk_size: int = 1024,
) -> torch.Tensor:
    """``kl_matrix(anchors, maps) < threshold`` (the float64 decisions), bool ``(A, M)``.

    ``kl_dtype`` "float64": exactly that. "float32": the KL in float32, then every pair whose
    float32 value lies within the float32 error bound of ``threshold`` computed again in float64,
    so the decisions are the float64 ones (up to float64's own rounding, ~1e-15 of the terms) at
    float32 speed where float64 is slow (consumer GPUs run it at 1/32-1/64 of float32). The bound
    is worst-case: each KL is ``(a + b - c - e) / 2`` with the four terms dot products of ``n =
    S*S`` entries; with every entry in ``[0, 1]`` (so every log <= 0) each term's value is also
    the sum of its entries' magnitudes ``m``, and recursive float32 summation errs by at most
    ``n * u * m`` (``u = 2**-24``), the inputs' and logs' rounding by a few ``u * (m + 1)``
    more; the margin is ``(n + 16) * u * (|a| + |b| + |c| + |e| + 2 * mass + 4)``. Maps with an entry above 1 or
    a positive one below float32's smallest normal (its log would be off) are done in float64.
    """
    if kl_dtype == "float64":
        return kl_matrix(anchors, maps, chunk_size=chunk_size) < threshold
    if kl_dtype != "float32":
        raise ValueError(f"kl_dtype must be 'float64' or 'float32' here, got {kl_dtype!r}")
    tiny = torch.finfo(torch.float32).tiny
    both = (anchors, maps)
    if any(bool(((x > 1) | ((x > 0) & (x < tiny))).any()) for x in both):
        return kl_matrix(anchors, maps, chunk_size=chunk_size) < threshold
    precision = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("highest")  # TF32 / bf16 products would void the bound
    try:
        kl32 = kl_matrix(anchors, maps, dtype=torch.float32, chunk_size=chunk_size)
    finally:
        torch.set_float32_matmul_precision(precision)
    n = anchors.shape[-1] * anchors.shape[-2]
    a = anchors.reshape(anchors.shape[0], -1).to(torch.float32)
    y = maps.reshape(maps.shape[0], -1).to(torch.float32)
    # The four terms' magnitudes from the KL's own pieces: |c| + |e| = 2 KL + |a| + |b|, all
    # four being <= 0. The maps' sums bound the logs' rounding (u per unit of mass).
    a_self = (a * a.clamp_min(tiny).log()).sum(dim=1).abs()
    y_self = (y * y.clamp_min(tiny).log()).sum(dim=1).abs()
    mass = a.sum(dim=1)[:, None] + y.sum(dim=1)[None, :]
    magnitude = 2 * kl32.abs() + 2 * (a_self[:, None] + y_self[None, :]) + 2 * mass + 4
    margin = (n + 16) * 2.0**-24 * magnitude
    below = kl32 < threshold
    unsure = ((kl32 - threshold).abs() <= margin) & kl32.isfinite()
    rows, cols = unsure.nonzero(as_tuple=True)
    if rows.numel():
        a64 = anchors.reshape(anchors.shape[0], -1)
        y64 = maps.reshape(maps.shape[0], -1)
        exact = torch.empty(rows.numel(), dtype=torch.float64, device=kl32.device)
        for start in range(0, rows.numel(), chunk_size):
            r, c = rows[start : start + chunk_size], cols[start : start + chunk_size]
            exact[start : start + chunk_size] = kl_pairs(a64[r], y64[c])
        below[rows, cols] = exact < threshold
    return below


def kl_pairs(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Row-by-row :func:`kl_matrix` in float64: ``x (P, n)`` and ``y (P, n)`` -> ``(P,)``, the KL
    of each pair of rows, by the same expansion (zero-support mismatches +inf)."""
    x, y = x.to(torch.float64), y.to(torch.float64)
    tiny = torch.finfo(torch.float64).tiny
    x_log, y_log = x.clamp_min(tiny).log(), y.clamp_min(tiny).log()
    kl = (x * x_log).sum(dim=1) + (y * y_log).sum(dim=1)
    kl -= (x * y_log).sum(dim=1)
    kl -= (x_log * y).sum(dim=1)
    kl /= 2
    mismatch = ((x == 0) & (y != 0)) | ((x != 0) & (y == 0))
    return kl.masked_fill_(mismatch.any(dim=1), float("inf"))
