"""Multi-resolution self-attention aggregation (DiffSeg step 1)."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F


def proportional_weights(resolutions: Sequence[int]) -> list[float]:
    """The official default aggregation weights: ``r / sum(r)`` for each resolution ``r``."""
    resolutions = [int(r) for r in resolutions]
    if not resolutions or min(resolutions) <= 0:
        raise ValueError(
            f"resolutions must be a non-empty sequence of positive ints, got {resolutions!r}"
        )
    total = sum(resolutions)
    return [r / total for r in resolutions]


def check_probabilities(name: str, t: torch.Tensor) -> None:
    """Raise ``ValueError`` naming ``name`` unless every value of ``t`` is finite and >= 0."""
    if t.numel() == 0:
        raise ValueError(f"{name} is empty (shape {tuple(t.shape)}); expected attention maps")
    # One pass: nan propagates through aminmax and fails both comparisons.
    lo, hi = torch.aminmax(t)
    if not (torch.isfinite(lo) and torch.isfinite(hi)):
        raise ValueError(
            f"{name} contains non-finite values (min {lo.item()}, max {hi.item()}); expected "
            "finite attention probabilities"
        )
    if lo < 0:
        raise ValueError(
            f"{name} contains negative values (min {lo.item()}); expected attention "
            "probabilities (>= 0)"
        )


def _compute_dtype(t: torch.Tensor) -> torch.dtype:
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def _as_head_mean(i: int, m: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Validate one resolution's attention and average its heads: ``(B, N, N)`` and ``r``."""
    if not isinstance(m, torch.Tensor):
        raise ValueError(f"maps[{i}] must be a torch.Tensor, got {type(m).__name__}")
    if m.ndim not in (3, 4) or m.shape[-1] != m.shape[-2]:
        raise ValueError(
            f"maps[{i}] must have shape (B, heads, N, N) or (B, N, N) with N = r*r, "
            f"got {tuple(m.shape)}"
        )
    n = m.shape[-1]
    r = math.isqrt(n)
    if r * r != n or n == 0:
        raise ValueError(
            f"maps[{i}] has N = {n} queries/keys, which is not a square r*r; expected the "
            "flattened r x r latent positions"
        )
    if not m.is_floating_point():
        raise ValueError(f"maps[{i}] must be a floating-point tensor, got dtype {m.dtype}")
    check_probabilities(f"maps[{i}]", m)
    m = m.to(_compute_dtype(m))
    if m.ndim == 4:
        m = m.mean(dim=1)
    return m, r


def _check_weights(weights: Sequence[float] | None, resolutions: list[int]) -> list[float]:
    """One finite non-negative weight per resolution; None: :func:`proportional_weights`."""
    if weights is None:
        return proportional_weights(resolutions)
    weights = [float(w) for w in weights]
    if len(weights) != len(resolutions):
        raise ValueError(
            f"weights has {len(weights)} entries but maps has {len(resolutions)}; give one weight "
            "per resolution (or None for r / sum(r))"
        )
    if not all(math.isfinite(w) and w >= 0 for w in weights):
        raise ValueError(f"weights must be finite and non-negative, got {weights}")
    return weights


def aggregate_attention(
    maps: Sequence[torch.Tensor],
    weights: Sequence[float] | None = None,
    size: int | None = None,
) -> torch.Tensor:
    """Aggregate per-resolution self-attention into one ``(B, S, S, S, S)`` tensor.

    As the official implementation: for each resolution ``r`` the heads are averaged, each query's
    ``r x r`` key map is upsampled bilinearly to ``S x S`` (half-pixel centres, no antialiasing:
    TF2 ``resize`` / Keras ``UpSampling2D``, i.e. torch ``align_corners=False``), renormalised to sum
    to 1, and the query grid is tiled to ``S x S`` by repetition (query ``(i, j)`` of the output uses
    query ``(i // f, j // f)`` with ``f = S / r``); the resolutions are summed with ``weights``
    (default :func:`proportional_weights`, ``r / sum(r)``; given weights are used as they are).

    Args:
        maps: one tensor per resolution, ``(B, heads, N, N)`` or head-averaged ``(B, N, N)``,
            ``N = r*r`` (queries, then keys, both flattened row-major).
        weights: one non-negative weight per entry of ``maps``.
        size: output side ``S``; defaults to the largest ``r``. Every ``r`` must divide ``S``.

    Returns:
        ``(B, S, S, S, S)``: ``out[b, qi, qj]`` is the ``S x S`` attention map of query ``(qi, qj)``;
        float64 when every input is float64, float32 otherwise.
    """
    if isinstance(maps, torch.Tensor) or not isinstance(maps, Sequence) or len(maps) == 0:
        raise ValueError(
            "maps must be a non-empty sequence of per-resolution attention tensors "
            f"(B, heads, N, N) or (B, N, N), got {type(maps).__name__}"
        )
    means = [_as_head_mean(i, m) for i, m in enumerate(maps)]
    batch = {m.shape[0] for m, _ in means}
    if len(batch) != 1:
        raise ValueError(f"maps have different batch sizes {sorted(batch)}; expected one B")
    resolutions = [r for _, r in means]
    weights = _check_weights(weights, resolutions)
    s = max(resolutions) if size is None else int(size)
    bad = [r for r in resolutions if s <= 0 or s % r]
    if bad:
        raise ValueError(
            f"size={s} must be a positive multiple of every resolution, but {bad} do not divide "
            f"it (resolutions {resolutions})"
        )

    b = batch.pop()
    dtype = torch.float64 if all(m.dtype == torch.float64 for m, _ in means) else torch.float32
    out = torch.zeros((b, s, s, s, s), dtype=dtype, device=means[0][0].device)
    for (m, r), w in zip(means, weights, strict=True):
        f = s // r
        keys = m.to(dtype).reshape(b, r * r, r, r)  # queries as channels, keys as the image
        if f > 1:
            keys = F.interpolate(keys, size=(s, s), mode="bilinear", align_corners=False)
        keys = keys / keys.sum(dim=(-2, -1), keepdim=True)
        # Tiling the queries is a broadcast into a (r, f, r, f) view of the output, so the
        # repeated (B, S, S, S, S) copy of every resolution is never materialised.
        view = out.view(b, r, f, r, f, s, s)
        view += w * keys.reshape(b, r, 1, r, 1, s, s)
    return out
