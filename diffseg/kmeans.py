"""The paper's K-means baselines (Table 1: K-Means-C and K-Means-S), our reading of the paper.

The paper lists K-Means-C (a constant 6 clusters) and K-Means-S (as many clusters as the image's
ground truth has classes) "over the same aggregated attention maps" at 512x512, without code. Here:
the ``S*S`` attention maps of an image (one per query pixel, each a distribution over the ``S*S``
key pixels, from :func:`diffseg.aggregate.aggregate_attention`) are clustered with K-means in
float64 (k-means++ initialisation drawn from a seeded ``torch.Generator``, then Lloyd's iterations
by :func:`diffseg.merge.kmeans_refine`, the same routine as DiffSeg's optional refinement); each
cluster's mean map is a proposal, and the label map is made exactly as DiffSeg's last step
(:func:`diffseg.merge.proposals_to_labels`: bilinear upsampling of the maps, then the argmax), never
by upsampling integer labels.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from diffseg.merge import check_aggregated, check_out_size, kmeans_refine, proposals_to_labels


def kmeans_plusplus(x: torch.Tensor, n_clusters: int, generator: torch.Generator) -> torch.Tensor:
    """k-means++ seeding (Arthur and Vassilvitskii 2007): ``(n_clusters, D)`` rows of ``x (N, D)``.

    The first centre is drawn uniformly, each further one with probability proportional to the
    squared distance to the nearest centre chosen so far. When every point coincides with a
    chosen centre (fewer distinct points than clusters) the draw is uniform; the duplicate centres
    then end up empty and :func:`diffseg.merge.kmeans_refine` drops them.
    """
    n = x.shape[0]
    first = torch.randint(n, (1,), generator=generator).item()
    chosen = [first]
    nearest = ((x - x[first]) ** 2).sum(dim=1)
    for _ in range(1, n_clusters):
        weights = nearest.cpu() if nearest.sum() > 0 else torch.ones(n, dtype=x.dtype)
        index = torch.multinomial(weights, 1, generator=generator).item()
        chosen.append(index)
        nearest = torch.minimum(nearest, ((x - x[index]) ** 2).sum(dim=1))
    return x[chosen].clone()


def _per_image(name: str, value: int | Sequence[int], batch: int) -> list[int]:
    values = [value] * batch if isinstance(value, int) else list(value)
    if len(values) != batch or not all(
        isinstance(v, int) and not isinstance(v, bool) for v in values
    ):
        raise ValueError(
            f"{name} must be an int or one int per image ({batch} images), got {value!r}"
        )
    return values


def kmeans_proposals(
    aggregated: torch.Tensor,
    n_clusters: int | Sequence[int],
    seed: int | Sequence[int] = 0,
    max_iter: int = 300,
    tol: float = 1e-4,
) -> list[torch.Tensor]:
    """K-means over each image's attention maps: one float64 ``(K_b, S, S)`` set of cluster means.

    ``aggregated (B, S, S, S, S)``; ``n_clusters`` and ``seed`` are one int for the batch or one
    per image (each image draws its k-means++ initialisation from ``torch.Generator`` seeded with
    its own ``seed``, so its result does not depend on the batch it is in). ``K_b <= n_clusters``:
    clusters left empty are dropped (see :func:`diffseg.merge.kmeans_refine`).
    """
    s = check_aggregated(aggregated)
    batch = aggregated.shape[0]
    counts = _per_image("n_clusters", n_clusters, batch)
    seeds = _per_image("seed", seed, batch)
    bad = [k for k in counts if not 1 <= k <= s * s]
    if bad:
        raise ValueError(
            f"n_clusters must be in [1, S*S={s * s}] (one cluster at most per attention map), "
            f"got {bad}"
        )
    results = []
    for image, k, image_seed in zip(aggregated, counts, seeds, strict=True):
        maps = image.reshape(s * s, s * s).to(torch.float64)
        generator = torch.Generator().manual_seed(image_seed)
        init = kmeans_plusplus(maps, k, generator)
        centres, _, _ = kmeans_refine(maps, init, max_iter=max_iter, tol=tol)
        results.append(centres.reshape(-1, s, s))
    return results


def kmeans_segment(
    aggregated: torch.Tensor,
    n_clusters: int | Sequence[int],
    seed: int | Sequence[int] = 0,
    out_size: int | Sequence[int] | None = None,
    max_iter: int = 300,
    tol: float = 1e-4,
) -> torch.Tensor:
    """K-means baseline segmentation of ``aggregated (B, S, S, S, S)`` -> labels ``(B, H, W)``.

    :func:`kmeans_proposals`, then :func:`diffseg.merge.proposals_to_labels` per image;
    ``out_size`` defaults to ``8 * S`` (512 for SD's 64x64 latents), as DiffSeg's.
    """
    size = None if out_size is None else check_out_size(out_size)
    proposals = kmeans_proposals(aggregated, n_clusters, seed, max_iter, tol)
    size = size or (8 * aggregated.shape[-1],) * 2
    return torch.stack([proposals_to_labels(p, size) for p in proposals])


def pixel_kmeans_segment(
    images: torch.Tensor,
    n_clusters: int | Sequence[int],
    seed: int | Sequence[int] = 0,
    max_iter: int = 300,
    tol: float = 1e-4,
) -> torch.Tensor:
    """K-means on each image's RGB values, a colour-only baseline: ``(B, 3, H, W)`` -> ``(B, H, W)``.

    Same seeding and Lloyd's iterations as :func:`kmeans_proposals`, over the ``H*W`` pixels
    (3 features each) instead of the attention maps; a pixel's label is its cluster's index.
    """
    if images.ndim != 4 or images.shape[1] != 3:
        raise ValueError(f"images must be (B, 3, H, W), got {tuple(images.shape)}")
    batch, _, height, width = images.shape
    counts = _per_image("n_clusters", n_clusters, batch)
    seeds = _per_image("seed", seed, batch)
    labels = []
    for image, k, image_seed in zip(images, counts, seeds, strict=True):
        pixels = image.reshape(3, -1).T.to(torch.float64)
        init = kmeans_plusplus(pixels, k, torch.Generator().manual_seed(image_seed))
        _, image_labels, _ = kmeans_refine(pixels, init, max_iter=max_iter, tol=tol)
        labels.append(image_labels.reshape(height, width))
    return torch.stack(labels)
