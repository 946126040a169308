"""The float32 KL with a float64 re-check near the threshold (``diffseg.kl.kl_below``) decides as
the float64 KL does, where float32 alone does not."""

from __future__ import annotations

import pytest
import torch

from diffseg.aggregate import aggregate_attention
from diffseg.kl import kl_below, kl_matrix, resolve_kl_dtype
from diffseg.merge import sampling_grid, segment_attention
from diffseg.reference import realistic_attention


def peaked_maps(size: int, seed: int) -> torch.Tensor:
    """``(size**2, size, size)`` float64 aggregated attention maps, peaked as a UNet's."""
    aggregated = aggregate_attention(realistic_attention(size=size, seed=seed))[0]
    return aggregated.reshape(size * size, size, size)


@pytest.mark.parametrize("seed", [0, 1])
def test_decisions_at_thresholds_inside_float32_noise_are_the_float64_ones(seed):
    """Thresholds placed 1e-9 (relative) either side of float64 KL values, far inside float32's
    noise (~1e-5) and far outside float64's (~1e-15): float32 alone decides some of those pairs
    otherwise; with the re-check every decision is float64's."""
    maps = peaked_maps(16, seed)
    anchors = maps[sampling_grid(8, 16)[:, 0] * 16 + sampling_grid(8, 16)[:, 1]]
    exact = kl_matrix(anchors, maps)
    rough = kl_matrix(anchors, maps, dtype=torch.float32).double()
    finite = exact[exact.isfinite() & (exact > 0.05)]
    picks = finite[torch.randperm(finite.numel(), generator=torch.Generator().manual_seed(seed))]
    float32_flips = 0
    for value in picks[:40].tolist():
        for threshold in (value * (1 - 1e-9), value * (1 + 1e-9)):
            want = exact < threshold
            assert torch.equal(kl_below(anchors, maps, threshold, "float32"), want)
            float32_flips += int(((rough < threshold) != want).sum())
    assert float32_flips > 0  # the re-check is what makes them equal


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("thresholds", [(1.1, 1.1, 1.1), (0.6, 0.9, 1.3)])
def test_segmentation_with_the_float32_kl_equals_the_float64_one(seed, thresholds):
    aggregated = aggregate_attention(realistic_attention(size=16, seed=seed))
    labels = {
        kl: segment_attention(aggregated, thresholds, num_points=8, kl_dtype=kl)
        for kl in ("float64", "float32")
    }
    assert torch.equal(labels["float32"], labels["float64"])
    assert labels["float64"].unique().numel() > 1


def test_maps_float32_cannot_hold_are_decided_in_float64():
    """An entry below float32's smallest normal (its log would be off) or above 1."""
    maps = peaked_maps(8, 0)
    for bad in (1e-40, 1.5):
        odd = maps.clone()
        odd[3, 0, 0] = bad
        for threshold in (0.5, 1.1):
            want = kl_matrix(odd, odd) < threshold
            assert torch.equal(kl_below(odd, odd, threshold, "float32"), want)


def test_kl_dtype_choices():
    assert resolve_kl_dtype("auto", torch.device("cpu")) == "float64"
    assert resolve_kl_dtype("float32", torch.device("cpu")) == "float32"
    with pytest.raises(ValueError, match="kl_dtype"):
        resolve_kl_dtype("bfloat16", torch.device("cpu"))
