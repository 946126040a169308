"""Iterative attention merging, optional K-means refinement and label maps (DiffSeg steps 2-3)."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F

from diffseg.aggregate import check_probabilities
from diffseg.kl import kl_below, kl_float16, resolve_kl_dtype

FIRST_MERGE_DTYPES = {"float64": torch.float64, "float16": torch.float16}


def sampling_grid(num_points: int, size: int) -> torch.Tensor:
    """The official anchor grid: ``(num_points**2, 2)`` long ``(row, col)`` positions.

    ``num_points`` evenly spaced coordinates ``start + k * segment_len`` with
    ``segment_len = (size - 1) // (num_points - 1)``, centred by
    ``start = (size - 1 - segment_len * (num_points - 1)) // 2``; all pairs in row-major
    (``meshgrid(indexing="ij")``) order. For ``size=64, num_points=16``: 1, 5, ..., 61.
    """
    if not isinstance(size, int) or size < 2:
        raise ValueError(f"size must be an int >= 2, got {size!r}")
    _check_num_points(num_points, size)
    segment_len = (size - 1) // (num_points - 1)
    start = (size - 1 - segment_len * (num_points - 1)) // 2
    coords = start + segment_len * torch.arange(num_points)
    rows, cols = torch.meshgrid(coords, coords, indexing="ij")
    return torch.stack([rows.reshape(-1), cols.reshape(-1)], dim=1)


def _check_num_points(num_points: int, size: int, where: str = "") -> None:
    # The grid spacing (size - 1) // (num_points - 1) needs two anchors per side at least, and
    # more anchors than maps per side would repeat positions.
    if isinstance(num_points, int) and not isinstance(num_points, bool) and 2 <= num_points <= size:
        return
    raise ValueError(
        f"num_points must be an int in [2, S={size}] (anchors per side of the S x S attention "
        f"maps{where}), got {num_points!r}; the official value is 16"
    )


def check_merge_settings(
    resolution: int,
    num_points: int = 16,
    kl_threshold: Sequence[float] = (1.1, 1.1, 1.1),
    scale_factor: int = 8,
) -> int:
    """Check the merging settings against the input ``resolution`` before any model runs.

    The merge runs on the aggregated attention, whose side ``S`` is that of the largest
    self-attention map, ``resolution / scale_factor``: input pixels per position of that map, 8
    for Stable Diffusion 1.x (the latent: ``S = 64`` at 512), 16 for SDXL (its first level has no
    attention: ``S = 64`` at 1024). ``num_points`` anchors per side must fit on it (:func:`sampling_grid`)
    and ``kl_threshold`` needs one finite positive value per iteration. Raises ``ValueError``
    naming the setting; returns ``S``.
    """
    if (
        isinstance(resolution, bool)
        or not isinstance(resolution, int)
        or resolution <= 0
        or resolution % scale_factor
    ):
        raise ValueError(
            f"resolution must be a positive multiple of {scale_factor} (input pixels per position "
            f"of the largest attention map), got {resolution!r}"
        )
    size = resolution // scale_factor
    _check_num_points(
        num_points,
        size,
        f": the largest attention map of a {resolution}px image, {scale_factor} px per position",
    )
    _check_thresholds(kl_threshold)
    return size


def _check_thresholds(kl_threshold: Sequence[float]) -> list[float]:
    if isinstance(kl_threshold, (str, bytes)) or not isinstance(kl_threshold, Sequence):
        raise ValueError(
            "kl_threshold must be a sequence with one positive threshold per merging iteration, "
            f"e.g. (1.1, 1.1, 1.1); got {kl_threshold!r}"
        )
    values = [float(t) for t in kl_threshold]
    bad = list(dict.fromkeys(t for t in values if not (math.isfinite(t) and t > 0)))
    if not values or bad:
        which = " and ".join(map(str, bad)) + (" is not" if len(bad) == 1 else " are not")
        raise ValueError(
            "kl_threshold must hold one or more values, every one finite and positive (one per "
            f"merging iteration, e.g. [1.1, 1.1, 1.1]); got {list(kl_threshold)}"
            + (f", where {which}" if bad else "")
        )
    return values


def check_aggregated(aggregated: torch.Tensor) -> int:
    """Raise ValueError unless ``aggregated`` is a ``(B, S, S, S, S)`` tensor of finite
    non-negative floats (:func:`diffseg.aggregate.aggregate_attention`'s output); returns ``S``."""
    if (
        not isinstance(aggregated, torch.Tensor)
        or aggregated.ndim != 5
        or len(set(aggregated.shape[1:])) != 1
    ):
        shape = tuple(aggregated.shape) if isinstance(aggregated, torch.Tensor) else aggregated
        raise ValueError(
            f"aggregated must be a (B, S, S, S, S) tensor from aggregate_attention, got {shape}"
        )
    if not aggregated.is_floating_point():
        raise ValueError(f"aggregated must be floating point, got dtype {aggregated.dtype}")
    check_probabilities("aggregated", aggregated)
    return aggregated.shape[-1]


def _check_first_merge_dtype(first_merge_dtype: str | torch.dtype) -> torch.dtype:
    name = str(first_merge_dtype).removeprefix("torch.")
    if name not in FIRST_MERGE_DTYPES:
        raise ValueError(
            "first_merge_dtype must be 'float64' (exact KL, the default) or 'float16' (the "
            f"official code's arithmetic), got {first_merge_dtype!r}"
        )
    return FIRST_MERGE_DTYPES[name]


def first_merge(
    maps: torch.Tensor,
    grid: torch.Tensor,
    threshold: float,
    dtype: torch.dtype = torch.float64,
    kl_dtype: str = "float64",
) -> torch.Tensor:
    """Iteration 1: per anchor, the mean of all ``maps (S*S, S*S)`` within ``threshold``.

    ``dtype`` float64: the exact KL's decisions (``kl_dtype``: their arithmetic, see
    :func:`diffseg.kl.kl_below`). float16: the official arithmetic (:func:`kl_float16`, the
    threshold rounded to float16 too, 1.1 -> 1.0996); a nan KL merges nothing, so an anchor whose
    own map has an entry float16 rounds to 0 gets no member and a nan proposal.
    """
    s = math.isqrt(maps.shape[0])
    maps = maps.to(torch.float64)
    index = grid[:, 0] * s + grid[:, 1]
    anchors, all_maps = maps[index].reshape(-1, s, s), maps.reshape(-1, s, s)
    if dtype == torch.float16:
        close = kl_float16(anchors, all_maps) < float(torch.tensor(threshold).half())
    else:
        close = kl_below(anchors, all_maps, threshold, kl_dtype)
        # Every anchor is one of the maps and KL(x, x) = 0 < threshold, exactly as in the direct
        # form; pinning it keeps every mean well defined whatever the matrix form's rounding.
        close[torch.arange(len(index)), index] = True
    close = close.to(torch.float64)
    return (close @ maps) / close.sum(dim=1, keepdim=True)


def _drop_nan(proposals: torch.Tensor) -> torch.Tensor:
    """The float16 first merge's nan proposals ``(K, S*S)`` left out, as the official second
    iteration leaves them (their KL to anything is nan, so they neither anchor nor join a group)."""
    kept = proposals[~proposals.isnan().any(dim=1)]
    if len(kept) == 0:
        raise ValueError(
            "first_merge_dtype=float16: the attention map of every anchor has an entry that "
            "float16 rounds to 0 (<= 2**-25), so every KL is nan and no proposal is left (the "
            "official code fails here too); use first_merge_dtype=float64"
        )
    return kept


def greedy_groups(close: torch.Tensor) -> torch.Tensor:
    """The greedy walk of a later iteration on a boolean ``close (K, K)`` (diagonal set).

    In order, a proposal not yet matched becomes an anchor; its group is every proposal close to
    it (matched earlier or not), and those become matched. Returns the groups as a boolean
    ``(G, K)`` on the CPU. ``K <= num_points**2`` (256 by default), so the walk is cheap on the CPU
    and needs a single device-to-host copy of ``close``.
    """
    close = close.cpu()
    matched = torch.zeros(close.shape[0], dtype=torch.bool)
    groups = []
    for i in range(close.shape[0]):
        if not matched[i]:
            matched |= close[i]
            groups.append(close[i])
    return torch.stack(groups)


def later_merge(
    proposals: torch.Tensor, threshold: float, kl_dtype: str = "float64"
) -> torch.Tensor:
    """A later iteration: walk the proposals ``(K, S*S)`` in order, merging unmatched anchors.

    An unmatched proposal's new proposal is the mean of all proposals (matched earlier or not)
    within ``threshold``, itself included; those become matched. The KL matrix is computed once,
    the walk (:func:`greedy_groups`) runs on the CPU, and the means are one matrix product on the
    proposals' device: no host round trip per proposal.
    """
    s = math.isqrt(proposals.shape[1])
    as_maps = proposals.reshape(-1, s, s)
    close = kl_below(as_maps, as_maps, threshold, kl_dtype)
    close.fill_diagonal_(True)
    groups = greedy_groups(close).to(proposals.device, proposals.dtype)
    return (groups @ proposals) / groups.sum(dim=1, keepdim=True)


def kmeans_refine(
    maps: torch.Tensor,
    init: torch.Tensor,
    max_iter: int = 300,
    tol: float = 1e-4,
) -> tuple[torch.Tensor, torch.Tensor, float]:
    """Lloyd's K-means over ``maps (N, D)`` from ``init (K, D)``, in float64.

    Mirrors scikit-learn's ``KMeans(init=..., n_init=1)`` as the official code calls it: at most
    ``max_iter`` iterations; stops when the assignment no longer changes or when the summed squared
    centre shift is at most ``tol * mean(per-feature variance of maps)`` (scikit-learn's relative
    tolerance). Ties go to the lowest cluster index. Deterministic empty-cluster rule (scikit-learn
    instead relocates empty centres to far points): an empty cluster keeps its previous centre,
    and clusters still empty at the end are dropped. The returned centres are the members' means of
    the final assignment (the official code replaces each cluster by that mean).

    Returns:
        ``(centres (K', D), labels (N,) in [0, K'), inertia)`` with ``K' <= K``; ``inertia`` is the
        summed squared distance of each map to its returned centre.
    """
    x = maps.to(torch.float64)
    centres = init.to(torch.float64).clone()
    tol_abs = tol * x.var(dim=0, unbiased=False).mean().item()
    x_sq = (x * x).sum(dim=1, keepdim=True)

    def assign(c: torch.Tensor) -> torch.Tensor:
        return (x_sq - 2 * x @ c.T + (c * c).sum(dim=1)[None, :]).argmin(dim=1)

    def means(labels: torch.Tensor, fallback: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        counts = torch.bincount(labels, minlength=len(fallback)).to(x.dtype)
        sums = torch.zeros_like(fallback).index_add_(0, labels, x)
        filled = counts > 0
        return torch.where(filled[:, None], sums / counts.clamp_min(1)[:, None], fallback), filled

    labels = None
    for _ in range(max_iter):
        new_labels = assign(centres)
        new_centres, _ = means(new_labels, centres)
        shift = ((new_centres - centres) ** 2).sum().item()
        centres = new_centres
        if labels is not None and torch.equal(new_labels, labels):
            break
        labels = new_labels
        if shift <= tol_abs:
            break
    labels = assign(centres)
    centres, filled = means(labels, centres)
    remap = torch.cumsum(filled.to(torch.long), dim=0) - 1
    centres, labels = centres[filled], remap[labels]
    inertia = ((x - centres[labels]) ** 2).sum().item()
    return centres, labels, inertia


def merge_attention(
    aggregated: torch.Tensor,
    kl_threshold: Sequence[float] = (1.1, 1.1, 1.1),
    num_points: int = 16,
    refine: bool = False,
    first_merge_dtype: str | torch.dtype = "float64",
    kl_dtype: str = "auto",
) -> list[torch.Tensor]:
    """The official iterative attention merging: one float64 ``(K_b, S, S)`` proposal set per image.

    ``aggregated (B, S, S, S, S)`` as from :func:`diffseg.aggregate.aggregate_attention`.
    Iteration 1 uses ``num_points**2`` anchors on :func:`sampling_grid`; each anchor's proposal is
    the mean of all ``S*S`` maps whose symmetric KL to it is below ``kl_threshold[0]``. Each later
    iteration ``i`` walks the proposals in order: one not yet matched is an anchor, its new
    proposal is the mean of all proposals (matched earlier or not) below ``kl_threshold[i]``, and
    those are marked matched. With ``refine``, :func:`kmeans_refine` over all ``S*S`` maps from the
    proposals replaces them by the cluster means.

    Precision: with ``first_merge_dtype="float64"`` (default) every KL and mean is computed in
    float64 (matrix-product KL, :func:`diffseg.kl.kl_matrix`), so the decisions are those of the
    exact formula on the given maps. ``"float16"`` evaluates iteration 1 with the official code's
    arithmetic (:func:`diffseg.kl.kl_float16`, threshold in float16): anchors whose map has an
    entry float16 rounds to 0 give nan proposals, which are dropped before iteration 2 (the
    official iteration 2 drops them; with a single iteration the official code would keep them).
    ``kl_dtype``: how the float64 decisions are reached (:func:`diffseg.kl.kl_below`): "float64",
    or "float32" with a float64 re-check of the pairs near the threshold (the same decisions);
    "auto" (default) takes float32 on GPUs whose float64 is slow, float64 elsewhere.
    """
    s = check_aggregated(aggregated)
    kl_dtype = resolve_kl_dtype(kl_dtype, aggregated.device)
    thresholds = _check_thresholds(kl_threshold)
    dtype = _check_first_merge_dtype(first_merge_dtype)
    grid = sampling_grid(num_points, s).to(aggregated.device)
    results = []
    for image in aggregated:
        maps = image.reshape(s * s, s * s)
        proposals = first_merge(maps, grid, thresholds[0], dtype, kl_dtype)
        if dtype == torch.float16:
            proposals = _drop_nan(proposals)
        for threshold in thresholds[1:]:
            proposals = later_merge(proposals, threshold, kl_dtype)
        if refine:
            proposals, _, _ = kmeans_refine(maps, proposals)
        results.append(proposals.reshape(-1, s, s))
    return results


def check_out_size(out_size: int | Sequence[int]) -> tuple[int, int]:
    """A label map size (a side or ``(H, W)``) as ``(H, W)``; ValueError unless positive ints."""
    size = (out_size, out_size) if isinstance(out_size, int) else tuple(out_size)
    if len(size) != 2 or not all(isinstance(v, int) and v > 0 for v in size):
        raise ValueError(f"out_size must be a positive int or (H, W), got {out_size!r}")
    return size


def proposals_to_labels(proposals: torch.Tensor, out_size: int | Sequence[int]) -> torch.Tensor:
    """``(K, S, S)`` proposals -> ``(H, W)`` long labels in ``[0, K)``.

    Bilinear upsampling with half-pixel centres (Keras ``UpSampling2D``/TF2 ``resize``, torch
    ``align_corners=False``), then the argmax over proposals (ties go to the lowest index). Label
    ``k`` is proposal ``k``; a proposal that wins no pixel leaves its label unused, as officially.
    """
    if proposals.ndim != 3 or proposals.shape[0] == 0:
        raise ValueError(f"proposals must be a non-empty (K, S, S) tensor, got {proposals.shape}")
    size = check_out_size(out_size)
    up = F.interpolate(proposals[None], size=size, mode="bilinear", align_corners=False)
    return up[0].argmax(dim=0)


def segment_attention(  # noqa: PLR0913 (the merge settings, each a keyword)
    aggregated: torch.Tensor,
    kl_threshold: Sequence[float] = (1.1, 1.1, 1.1),
    num_points: int = 16,
    refine: bool = False,
    out_size: int | Sequence[int] | None = None,
    first_merge_dtype: str | torch.dtype = "float64",
    kl_dtype: str = "auto",
) -> torch.Tensor:
    """DiffSeg segmentation of aggregated attention ``(B, S, S, S, S)`` -> labels ``(B, H, W)``.

    :func:`merge_attention` then :func:`proposals_to_labels` per image; ``out_size`` defaults to
    ``8 * S`` (512 for SD's 64x64 latents).
    """
    size = None if out_size is None else check_out_size(out_size)
    proposals = merge_attention(
        aggregated, kl_threshold, num_points, refine, first_merge_dtype, kl_dtype
    )
    size = size or (8 * aggregated.shape[-1],) * 2
    return torch.stack([proposals_to_labels(p, size) for p in proposals])
