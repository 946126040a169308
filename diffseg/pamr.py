"""Pixel-adaptive mask refinement (PAMR; Araslanov & Roth, "Single-Stage Semantic Segmentation from
Image Labels", CVPR 2020), a pure function on tensors.

Each pixel's mask is replaced, ``num_iter`` times, by a weighted mean of the masks of its 8
neighbours at every dilation ``d`` (offsets ``{-d, 0, d}^2`` without the centre; borders
replicated). The weights depend on the image only: for each channel, the absolute difference
between the pixel and the neighbour divided by ``0.1`` times the standard deviation (unbiased) of
the ``9 * len(dilations)`` values of the pixel's neighbourhoods (centre included once per
dilation), negated, averaged over channels and passed through a softmax over all neighbours. So
masks spread along regions of similar colour and stop at colour edges. The formulation and
constants are those of the authors' module (``visinf/1-stage-wseg``, ``models/mods/pamr.py``),
which DiffCut's evaluation also uses.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

# 0.1: the authors' temperature; 1e-8 keeps a flat neighbourhood (std 0) finite.
_TEMPERATURE = 0.1
_EPS = 1e-8


def _check_dilations(dilations: Sequence[int]) -> tuple[int, ...]:
    dil = tuple(dilations)
    if not dil or not all(isinstance(d, int) and not isinstance(d, bool) and d > 0 for d in dil):
        raise ValueError(
            f"dilations must be a non-empty sequence of positive ints, got {dilations!r}"
        )
    return dil


def neighbours(x: torch.Tensor, dilations: Sequence[int], centre: bool = False) -> torch.Tensor:
    """Values of the 3x3 neighbourhood at each dilation, borders replicated.

    Args:
        x: ``(B, C, H, W)``.
        dilations: positive ints.
        centre: include the centre pixel (9 values per dilation instead of 8).

    Returns:
        ``(B, C, P, H, W)`` with ``P = (9 if centre else 8) * len(dilations)``; for each dilation
        the offsets ``(dy, dx)`` in row-major order over ``{-d, 0, d}^2``.
    """
    h, w = x.shape[-2:]
    out = []
    for d in _check_dilations(dilations):
        padded = F.pad(x, (d, d, d, d), mode="replicate")
        for dy in (-d, 0, d):
            for dx in (-d, 0, d):
                if dy == 0 and dx == 0 and not centre:
                    continue
                out.append(padded[..., d + dy : d + dy + h, d + dx : d + dx + w])
    return torch.stack(out, dim=2)


def pamr_affinity(image: torch.Tensor, dilations: Sequence[int]) -> torch.Tensor:
    """Weights ``(B, 1, 8 * len(dilations), H, W)`` (summing to 1 over dim 2) from ``image``
    ``(B, C, H, W)``; the neighbours are ordered as :func:`neighbours` orders them."""
    image = image.float()
    spread = neighbours(image, dilations, centre=True).std(dim=2, keepdim=True)
    diff = (image[:, :, None] - neighbours(image, dilations)).abs()
    logits = (-diff / (_EPS + _TEMPERATURE * spread)).mean(dim=1, keepdim=True)
    return logits.softmax(dim=2)


def pamr(
    masks: torch.Tensor,
    image: torch.Tensor,
    num_iter: int = 10,
    dilations: Sequence[int] = (1, 2, 4, 8, 12, 24),
) -> torch.Tensor:
    """Refine soft masks ``(B, K, H', W')`` with the image ``(B, C, H, W)`` -> ``(B, K, H, W)``.

    Masks of another size are first resized to the image's bilinearly with ``align_corners=True``
    (as the authors' module). Defaults: the authors' 10 iterations and dilations
    ``(1, 2, 4, 8, 12, 24)``; DiffCut's evaluation uses ``(1, 2, 4, 8)``. Each iteration is a
    convex combination of neighbouring masks, so masks that sum to 1 per pixel still do.
    """
    if masks.ndim != 4 or image.ndim != 4 or masks.shape[0] != image.shape[0]:
        raise ValueError(
            f"masks must be (B, K, H, W) and image (B, C, H, W) with the same B, got masks "
            f"{tuple(masks.shape)} and image {tuple(image.shape)}"
        )
    if isinstance(num_iter, bool) or not isinstance(num_iter, int) or num_iter < 0:
        raise ValueError(f"num_iter must be an int >= 0, got {num_iter!r}")
    masks = masks.float()
    if masks.shape[-2:] != image.shape[-2:]:
        masks = F.interpolate(masks, size=image.shape[-2:], mode="bilinear", align_corners=True)
    affinity = pamr_affinity(image, dilations)
    for _ in range(num_iter):
        masks = (neighbours(masks, dilations) * affinity).sum(dim=2)
    return masks
