"""DiffCut (Couairon et al., NeurIPS 2024): recursive normalised cut on diffusion UNet features.

Pure functions, tensors in, labels out. The features are the output of the last self-attention
layer of the UNet encoder (:mod:`diffseg.features` captures them); DiffSeg's attention maps are not
used. Read from the authors' code, PaulCouairon/DiffCut at commit ``aa16df4``, file
``diffcut/recursive_normalized_cut.py`` (class ``DiffCut``; "DiffCut's code" below):

1. :func:`affinity` (``recursive_ncut``, level 0): cosine similarity of the L2-normalised node
   features, min-max normalised over the whole matrix to [0, 1], raised to the power ``alpha``.
2. :func:`recursive_ncut` (``recursive_ncut``, ``get_masked_affinity_matrix``,
   ``get_affinity_matrix``): split the graph in two with :func:`ncut_bipartition`; when the cut's
   Ncut value is below ``tau``, split each side again (restricted to its own nodes), else the
   nodes form one segment. So a larger ``tau`` gives more segments. No minimal segment size: a
   (sub)graph of one node is never split.
3. :func:`ncut_bipartition` (``second_smallest_eigenvector``, ``deterministic_vector_sign_flip``,
   ``get_bipartition``): Shi and Malik's relaxation: the eigenvector ``u`` of the second smallest
   eigenvalue of ``D^-1/2 (D - W) D^-1/2`` (``torch.linalg.eigh``), ``y = D^-1/2 u`` (a solution
   of ``(D - W) y = lambda D y``), its sign fixed so that its largest entry in absolute value is
   positive; the split is ``y > t`` for the ``t`` among 100 evenly spaced values from
   ``0.99 min(y)`` to ``0.99 max(y)`` with the smallest Ncut value (the first on ties).
4. :func:`assign_high_res` (``generate_masks`` steps 2 and 3): each segment's concept is the mean
   of its normalised features (not renormalised); the normalised features are upsampled
   bilinearly (half-pixel centres) to the output size and each pixel takes the concept with the
   largest dot product.

Kept from DiffCut's code although they read as side effects, because they change labels:

- Below the first level, ``get_affinity_matrix`` leaves out of the subgraph every node whose row
  of the (masked) affinity holds an exact zero. The masking zeroes only pairs of already
  explored nodes, so besides those (the intended effect) this drops the unexplored nodes whose
  row of the original affinity has a zero: after the min-max normalisation at least the least
  similar pair, and any power that underflows. Such a node is never on the ``y > t`` side and
  goes with the other side at every later split. Here: ``(W == 0).any(dim=1)`` on the input.
- The sign rule for ``y`` and the 100 thresholds, which decide the side called ``y > t``.
  (A subgraph of two nodes of equal degree has ``|y|`` equal on both: which node is the
  ``y > t`` side is then decided by rounding, in DiffCut's code as here.)
- :func:`assemble_clusters`: segment ids numbered by DiffCut's float32 codes (the accepted
  splits in the order of its recursion, pre-order with the ``y > t`` side explored first).
  The ids decide which absent class takes a leftover cluster's pixels on ties of the
  Hungarian matching, so they are part of the scores; past 2**24 the float32 codes round and
  merge segments (more than ~24 splits along the way), as in its code.

Differences from DiffCut's code (rounding, label names or degenerate inputs only, except that
float64 changes which affinities underflow to 0):

- float64 throughout (DiffCut: float32 features and eigenproblem on CUDA). With float64 the
  ``alpha`` power underflows to 0 only for normalised similarities below ~1e-32 instead of
  ~3e-5, so fewer nodes are left out below the first level (see above).
- The affinity is symmetrised, ``(W + W.T) / 2`` (a matrix product need not be exactly
  symmetric), and a matrix whose entries are all equal (one node, or all features parallel)
  becomes all ones where DiffCut's min-max normalisation divides by zero.
- The Ncut value of a split is computed as ``cut / vol(S) + cut / vol(V \\ S)``; DiffCut's
  ``get_bipartition`` evaluates the same value as the Rayleigh quotient ``z^T (D - W) z /
  z^T D z`` with ``z = (1 + x) - b (1 - x)``, ``b = vol(S) / vol(V \\ S)``.
- The concept scores are computed at the features' resolution and the ``(K, h, w)`` score maps
  are upsampled, instead of upsampling the ``(C, h, w)`` features and scoring every pixel:
  bilinear interpolation is linear, so the scores are the same up to rounding, with K instead
  of C values per output pixel in memory (C = 1280 for SD 1.x and SDXL).
- The recursion is a loop, not Python recursion (no depth limit).
- DiffCut's ``second_smallest_eigenvector`` catches a failed ``eigh`` and then fails on
  ``None``; here the ``torch.linalg`` error propagates.

DiffCut's defaults (``eval_diffcut.py``, ``diffcut.ipynb``): ``tau=0.5``, ``alpha=10``, features of
a 1024x1024 input (32x32 nodes) at timestep 50, labels produced directly at 128x128 for scoring
(``out_size``; ``eval.segmenters.diffcut`` passes the protocol's scoring side).
Not here: the feature extraction (:mod:`diffseg.features`), PAMR (:mod:`diffseg.pamr`, applied by
``eval.scoring.protocol``) and ``diffcut/autosc.py`` (``DiffCut_AutoSC``, used by no script of the
repository): its eigengap search keeps the number of clusters of the best ``alpha`` but slices the
eigenvectors of the last ``alpha`` tried (15), and leaves the count undefined when no gap is
positive, so it is left out.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F

from diffseg.merge import check_out_size

# get_bipartition: 100 candidate thresholds spanning 0.99 * [min(y), max(y)].
NUM_THRESHOLDS = 100
THRESHOLD_SPAN = 0.99


def _check_positive(name: str, value: float) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"{name} must be a positive number, got {value!r}")
    if not (math.isfinite(value) and value > 0):
        raise ValueError(f"{name} must be a finite positive number, got {value!r}")
    return float(value)


def affinity(features: torch.Tensor, alpha: float = 10.0) -> torch.Tensor:
    """DiffCut's affinity ``(N, N)`` float64 of node features ``(N, C)``.

    Cosine similarity of the rows, min-max normalised over the matrix to [0, 1], to the power
    ``alpha``. Symmetric; the diagonal is 1 up to rounding (a feature's similarity to itself is
    the largest) and the least similar pair gets exactly 0.
    """
    alpha = _check_positive("alpha", alpha)
    if features.ndim != 2 or features.shape[0] == 0 or not features.is_floating_point():
        raise ValueError(
            f"features must be a non-empty float (N, C) tensor, got {features.dtype} "
            f"{tuple(features.shape)}"
        )
    x = F.normalize(features.to(torch.float64), dim=1)
    cos = x @ x.T
    cos = (cos + cos.T) / 2
    low, high = torch.aminmax(cos)
    if high == low:
        return torch.ones_like(cos)
    return ((cos - low) / (high - low)) ** alpha


def _check_affinity(w: torch.Tensor) -> None:
    if w.ndim != 2 or w.shape[0] != w.shape[1] or w.shape[0] == 0 or not w.is_floating_point():
        raise ValueError(f"W must be a non-empty float (N, N) matrix, got {tuple(w.shape)}")
    if not torch.isfinite(w).all() or (w < 0).any():
        raise ValueError("W must hold finite non-negative affinities")
    if not torch.allclose(w, w.T):
        raise ValueError("W must be symmetric")
    if (w.sum(dim=1) <= 0).any():
        raise ValueError("every node of W needs a positive degree (a non-zero row)")


def ncut_bipartition(w: torch.Tensor) -> tuple[torch.Tensor, float]:
    """The normalised cut of DiffCut's ``get_bipartition`` on ``w (n, n)``, ``n >= 2``.

    ``w`` must be symmetric, non-negative, with positive degrees (checked by
    :func:`recursive_ncut`). Returns the side ``y > t`` as a boolean ``(n,)`` mask (both sides
    non-empty) and the split's Ncut value ``cut(S, V \\ S) (1 / vol(S) + 1 / vol(V \\ S))``.
    """
    w = w.to(torch.float64)
    degree = w.sum(dim=1)
    inv_sqrt = degree.rsqrt()
    laplacian = inv_sqrt[:, None] * (torch.diag(degree) - w) * inv_sqrt[None, :]
    _, vectors = torch.linalg.eigh(laplacian)
    y = inv_sqrt * vectors[:, 1]
    y = y * torch.sign(y[y.abs().argmax()])
    thresholds = torch.linspace(
        THRESHOLD_SPAN * y.min().item(),
        THRESHOLD_SPAN * y.max().item(),
        NUM_THRESHOLDS,
        dtype=torch.float64,
        device=w.device,
    )
    sides = y[None, :] > thresholds[:, None]
    s = sides.to(torch.float64)
    vol = s @ degree
    cut = vol - ((s @ w) * s).sum(dim=1)
    total = degree.sum()
    ncut = cut / vol + cut / (total - vol)
    # y takes both signs (it is D-orthogonal to the constants), so every side is non-empty up to
    # rounding; a side left empty by rounding must not win with a 0/0.
    ncut = ncut.masked_fill((vol <= 0) | (vol >= total), math.inf)
    best = int(ncut.argmin())
    return sides[best], float(ncut[best])


def recursive_ncut(w: torch.Tensor, tau: float = 0.5) -> torch.Tensor:
    """DiffCut's recursive two-way normalised cut of the graph ``w (N, N)`` -> segment ids ``(N,)``.

    A (sub)graph is split by :func:`ncut_bipartition` while the split's Ncut value is below
    ``tau``; each side is then split on its own nodes. Ids are ``0..K-1`` (long, on ``w``'s
    device), numbered as DiffCut's ``assemble_clusters`` numbers them. Below the first level,
    nodes whose row of ``w`` holds an exact zero are left out of the subgraphs, as in DiffCut's
    ``get_affinity_matrix`` (both: module docstring).
    """
    tau = _check_positive("tau", tau)
    _check_affinity(w)
    w = w.to(torch.float64)
    n = w.shape[0]
    has_zero = (w == 0).any(dim=1)
    splits = []  # the y > t side of each split made, in the order of DiffCut's recursion
    stack = [(torch.ones(n, dtype=torch.bool, device=w.device), 0)]  # (nodes, level)
    while stack:
        nodes, level = stack.pop()
        index = (nodes if level == 0 else nodes & ~has_zero).nonzero().squeeze(1)
        if len(index) > 1:
            side, value = ncut_bipartition(w[index][:, index])
            if value < tau:
                inside = torch.zeros_like(nodes)
                inside[index[side]] = True
                splits.append(inside)
                # Popped first: DiffCut recurses into the y > t side first.
                stack.append((nodes & ~inside, level + 1))
                stack.append((inside, level + 1))
    return assemble_clusters(splits, n, w.device)


def assemble_clusters(splits: Sequence[torch.Tensor], n: int, device: torch.device) -> torch.Tensor:
    """Segment ids ``(n,)`` long in ``0..K-1`` from the ``y > t`` sides ``splits`` (boolean
    ``(n,)`` each, in the order of the recursion), as DiffCut's ``assemble_clusters``: each side
    adds to its nodes' float32 code a weight one above the largest code so far, and a node's id
    is the rank of its code. The float32 sums are DiffCut's: once codes pass 2**24 they round,
    and segments whose codes round together merge as in its code."""
    codes = torch.zeros(n, dtype=torch.float32, device=device)
    top = torch.ones((), dtype=torch.float32, device=device)
    for inside in splits:
        codes += top * inside
        top = codes.max() + 1
    return torch.unique(codes, return_inverse=True)[1]


def _check_features(features: torch.Tensor, ndim: int, shape: str) -> None:
    if (
        features.ndim != ndim
        or 0 in features.shape
        or not features.is_floating_point()
        or not torch.isfinite(features).all()
    ):
        raise ValueError(
            f"features must be a non-empty finite float {shape} tensor, got {features.dtype} "
            f"{tuple(features.shape)}"
        )


def assign_high_res(
    features: torch.Tensor, segments: torch.Tensor, out_size: int | Sequence[int]
) -> torch.Tensor:
    """DiffCut's high-resolution concept assignment -> labels ``(H, W)`` long in ``[0, K)``.

    ``features (C, h, w)`` (L2-normalised here along C), ``segments (h, w)`` integer ids (K
    distinct values; label ``k`` is the ``k``-th smallest id). Concept ``k`` is the mean of the
    normalised features of segment ``k``; every output pixel takes the concept with the largest
    dot product with the bilinearly upsampled (half-pixel centres) normalised features, computed
    as the upsampled ``(K, h, w)`` score maps (equal by linearity). Ties go to the lowest label.
    """
    _check_features(features, 3, "(C, h, w)")
    if segments.shape != features.shape[1:] or segments.is_floating_point():
        raise ValueError(
            f"segments must be integer ids of shape {tuple(features.shape[1:])} (the features' "
            f"h, w), got {segments.dtype} {tuple(segments.shape)}"
        )
    size = check_out_size(out_size)
    c = features.shape[0]
    x = F.normalize(features.to(torch.float64), dim=0).reshape(c, -1)
    _, ids = torch.unique(segments.reshape(-1), return_inverse=True)
    member = F.one_hot(ids).to(torch.float64)  # (h*w, K)
    concepts = (x @ member) / member.sum(dim=0)  # (C, K)
    scores = (concepts.T @ x).reshape(1, -1, *features.shape[1:])
    up = F.interpolate(scores, size=size, mode="bilinear", align_corners=False)
    return up[0].argmax(dim=0)


def diffcut_segment(
    features: torch.Tensor,
    out_size: int | Sequence[int],
    alpha: float = 10.0,
    tau: float = 0.5,
) -> torch.Tensor:
    """DiffCut segmentation of UNet features ``(B, C, h, w)`` -> labels ``(B, H, W)`` long.

    Per image: :func:`affinity` of the ``h*w`` feature vectors, :func:`recursive_ncut` into
    low-resolution segments, then :func:`assign_high_res` at ``out_size`` (an int or ``(H,
    W)``). Defaults ``alpha=10``, ``tau=0.5``: DiffCut's (``eval_diffcut.py``). Labels stay on the
    features' device.
    """
    _check_features(features, 4, "(B, C, h, w)")
    size = check_out_size(out_size)
    c, h, w = features.shape[1:]
    labels = []
    for image in features:
        # Nodes as contiguous rows (N, C), as DiffCut's hook output is, whatever the input's
        # memory layout: the matrix products' rounding, hence close cuts, depend on it.
        nodes = image.reshape(c, -1).T.contiguous()
        segments = recursive_ncut(affinity(nodes, alpha), tau)
        labels.append(assign_high_res(image, segments.reshape(h, w), size))
    return torch.stack(labels)
