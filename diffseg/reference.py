"""A direct, unoptimised transcription of the official DiffSeg merging, for tests and benchmarks.

Not used by the method itself: :mod:`diffseg.merge` is the implementation. This module evaluates
the symmetric KL elementwise exactly as the official code does (iteration 1 on chunks of
``sqrt(#anchors)`` anchors against all maps, broadcasting a ``(chunk, S*S, S, S)`` tensor; later
iterations as the official Python loop), builds the grid with ``numpy.linspace``/``meshgrid`` as
the official code does, and computes in ``dtype`` (float64 by default: the exact decisions; the
official code uses float16 for iteration 1; ``dtype=torch.float16`` is that arithmetic, with the
official formula's nan for zeros, see :func:`official_kl`). It also provides
:func:`realistic_attention`, peaked synthetic self-attention for tests and benchmarks.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from diffseg.kl import kl_direct
from diffseg.merge import proposals_to_labels


def reference_grid(num_points: int, size: int) -> np.ndarray:
    """The official grid, ``(num_points**2, 2)`` int, built with numpy as the official code."""
    segment_len = (size - 1) // (num_points - 1)
    total = segment_len * (num_points - 1)
    start = (size - 1 - total) // 2
    x = np.linspace(start, start + total, num_points)
    xx, yy = np.meshgrid(x, x, indexing="ij")
    return np.concatenate([xx.reshape(-1, 1), yy.reshape(-1, 1)], axis=-1).astype(int)


def official_kl(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """The official ``KL(x, Y)`` as written, broadcast over ``(..., S, S)``, in the inputs' dtype:
    ``sum(x * q) / 2 - sum(Y * q) / 2`` with ``q = log x - log Y`` and no zero handling (a zero in
    either map makes the result nan)."""
    quotient = torch.log(x) - torch.log(y)
    return (x * quotient).sum(dim=(-2, -1)) / 2 - (y * quotient).sum(dim=(-2, -1)) / 2


def reference_merge(
    attns: torch.Tensor,
    kl_threshold: Sequence[float],
    num_points: int = 16,
    dtype: torch.dtype = torch.float64,
) -> torch.Tensor:
    """Official iterative merging of one image's ``attns (S, S, S, S)`` -> proposals ``(K, S, S)``.

    ``dtype=torch.float16``: iteration 1 as the official code computes it (inputs, KL and the
    threshold in float16, :func:`official_kl`), later iterations in float64 with the official
    formula; a proposal that matches nothing, not even itself (nan), is dropped. Other dtypes: the
    KL with the mathematical limits for zeros (:func:`diffseg.kl.kl_direct`).
    """
    kl = official_kl if dtype == torch.float16 else kl_direct
    s = attns.shape[-1]
    # As officially, only the iteration-1 KL is in ``dtype``; the means are of the float64 maps.
    maps = attns.reshape(s * s, s * s).to(torch.float64)
    attns = attns.to(dtype)
    grid = reference_grid(num_points, s)
    anchors = attns[grid[:, 0], grid[:, 1]][:, None]  # (P, 1, S, S)
    flat = attns.reshape(1, s * s, s, s)
    split = int(np.sqrt(grid.shape[0]))
    bins = []
    for i in range(split):
        bins.append(kl(anchors[i * split : (i + 1) * split], flat) < kl_threshold[0])
    kl_bin = torch.cat(bins).to(torch.float64)
    proposals = ((kl_bin @ maps) / kl_bin.sum(1, keepdim=True)).reshape(-1, s, s)
    for threshold in kl_threshold[1:]:
        matched: set[int] = set()
        merged = []
        for i, anchor in enumerate(proposals):
            if i in matched:
                continue
            matched.add(i)
            close = kl(anchor, proposals) < threshold
            if close.any():
                matched.update(torch.nonzero(close).flatten().tolist())
                merged.append(proposals[close].mean(0))
        proposals = torch.stack(merged)
    return proposals


def reference_segment(
    attns: torch.Tensor,
    kl_threshold: Sequence[float] = (1.1, 1.1, 1.1),
    num_points: int = 16,
    out_size: int | None = None,
    dtype: torch.dtype = torch.float64,
) -> torch.Tensor:
    """Official segmentation of one image's ``attns (S, S, S, S)`` -> labels ``(H, W)``."""
    proposals = reference_merge(attns, kl_threshold, num_points, dtype)
    return proposals_to_labels(proposals, out_size or 8 * attns.shape[-1])


def realistic_attention(  # noqa: PLR0913 (test data: each keyword a knob of the generator)
    batch: int = 1,
    size: int = 64,
    resolutions: Sequence[int] | None = None,
    heads: int = 2,
    rank: int = 8,
    regions: int = 4,
    temperature: float = 6.0,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
) -> list[torch.Tensor]:
    """Peaked synthetic self-attention ``[(B, heads, r*r, r*r) for r in resolutions]``, float32.

    A smooth random ``rank``-channel feature field (a ``regions x regions`` noise grid upsampled to
    ``size``, so neighbouring positions look alike, as in an image) is average-pooled to each
    resolution (default ``size, size/2, size/4, size/8``); per head, random projections give
    low-rank ``Q`` and ``K`` and the attention is ``softmax(Q K^T * temperature / sqrt(rank))``.
    ``dtype``: the precision of ``Q``, ``K`` and the scores, as a half-precision UNet has them; the
    softmax is float32 either way, as in the capture processor.
    """
    gen = torch.Generator().manual_seed(seed)
    if resolutions is None:
        resolutions = [size, size // 2, size // 4, size // 8]
    field = torch.randn(batch, rank, regions, regions, generator=gen)
    field = F.interpolate(field, size=(size, size), mode="bicubic", align_corners=False)
    out = []
    for r in resolutions:
        feat = F.adaptive_avg_pool2d(field, r).flatten(2).transpose(1, 2)  # (B, r*r, rank)
        feat = feat / feat.std()
        wq = torch.randn(heads, rank, rank, generator=gen) / rank**0.5
        wk = wq + 0.3 * torch.randn(heads, rank, rank, generator=gen) / rank**0.5
        q = torch.einsum("bnc,hcd->bhnd", feat, wq)
        k = torch.einsum("bnc,hcd->bhnd", feat, wk)
        logits = q.to(dtype) @ k.to(dtype).transpose(-1, -2) * (temperature / rank**0.5)
        out.append(logits.softmax(dim=-1, dtype=torch.float32))
    return out
