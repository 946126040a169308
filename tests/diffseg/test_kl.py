"""Tests for diffseg.kl: the official symmetric KL, direct and matrix-product forms."""

import math

import pytest
import torch

from diffseg.aggregate import aggregate_attention
from diffseg.kl import kl_direct, kl_matrix
from diffseg.merge import sampling_grid
from diffseg.reference import realistic_attention


def test_direct_hand_computed():
    x = torch.tensor([[0.5, 0.5]], dtype=torch.float64)
    y = torch.tensor([[0.25, 0.75]], dtype=torch.float64)
    # 1/2 * (0.25 * ln 2 - 0.25 * ln(2/3)) = ln(3) / 8
    assert kl_direct(x, y).item() == pytest.approx(math.log(3) / 8, rel=1e-12)
    assert kl_direct(y, x).item() == pytest.approx(math.log(3) / 8, rel=1e-12)
    assert kl_direct(x, x).item() == 0.0


def test_zeros_follow_the_limits():
    x = torch.tensor([[0.0, 0.5], [0.5, 0.0]], dtype=torch.float64)[None]
    same = x.clone()
    other = torch.tensor([[0.25, 0.25], [0.5, 0.0]], dtype=torch.float64)[None]
    assert kl_direct(x, same).item() == 0.0
    assert kl_direct(x, other).item() == math.inf
    matrix = kl_matrix(x, torch.cat([same, other]))
    assert matrix[0, 0].item() == pytest.approx(0.0, abs=1e-12)
    assert matrix[0, 1].item() == math.inf


def test_matrix_equals_direct_for_any_chunking():
    gen = torch.Generator().manual_seed(0)
    maps = torch.rand(40, 6, 6, generator=gen, dtype=torch.float64) ** 4
    maps = maps / maps.sum((-2, -1), keepdim=True)
    anchors = maps[:7]
    direct = kl_direct(anchors[:, None], maps[None])
    full = kl_matrix(anchors, maps)
    torch.testing.assert_close(full, direct, rtol=1e-12, atol=1e-12)
    # BLAS may sum in another order for another shape: equal up to rounding, not bitwise.
    torch.testing.assert_close(kl_matrix(anchors, maps, chunk_size=9), full, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("seed", [0, 1])
def test_fast_path_decisions_equal_direct_float64_on_realistic_attention(seed):
    size = 16
    aggregated = aggregate_attention(realistic_attention(size=size, seed=seed))[0]
    maps = aggregated.reshape(-1, size, size)
    grid = sampling_grid(16, size)
    anchors = maps[grid[:, 0] * size + grid[:, 1]]
    exact = kl_direct(anchors.double()[:, None], maps.double()[None])
    fast = kl_matrix(anchors, maps)  # float32 input, float64 compute: the merge's setting
    fast32 = kl_matrix(anchors, maps, dtype=torch.float32)
    # float32 cancellation: errors of O(1e-5) (they flip rare decisions at S=64, see
    # bench/RESULTS.md, which is why the merge computes in float64).
    assert (fast32.double() - exact).abs().max() < 1e-4
    for threshold in (0.3, 0.9, 1.1, 2.0):
        inside = exact < threshold
        assert 0 < inside.sum() < inside.numel()  # the threshold actually separates pairs
        assert torch.equal(fast < threshold, inside)


def test_shape_errors():
    with pytest.raises(ValueError, match="same S"):
        kl_matrix(torch.rand(2, 4, 4), torch.rand(3, 5, 5))
    with pytest.raises(ValueError, match="chunk_size"):
        kl_matrix(torch.rand(2, 4, 4), torch.rand(3, 4, 4), chunk_size=0)
