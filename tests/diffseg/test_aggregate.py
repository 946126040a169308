"""Tests for diffseg.aggregate: official multi-resolution aggregation."""

import pytest
import torch

from diffseg.aggregate import aggregate_attention, proportional_weights
from diffseg.reference import realistic_attention


def _one_query_attention() -> torch.Tensor:
    """(1, 4, 4) attention at r=2: query q attends with [1, 2, 3, 4] rolled by q, normalised."""
    base = torch.tensor([1.0, 2.0, 3.0, 4.0], dtype=torch.float64)
    rows = torch.stack([base.roll(q) for q in range(4)]) / 10
    return rows[None]


def test_proportional_weights():
    assert proportional_weights([64, 32, 16, 8]) == pytest.approx(
        [64 / 120, 32 / 120, 16 / 120, 8 / 120]
    )
    with pytest.raises(ValueError, match="resolutions"):
        proportional_weights([])


def test_bilinear_upsampling_matches_hand_computed_half_pixel_example():
    out = aggregate_attention([_one_query_attention()], weights=[1.0], size=4)
    # [[1, 2], [3, 4]] upsampled x2 with half-pixel centres: source coords -0.25, 0.25, 0.75, 1.25
    # (clamped), i.e. row weights (1, 0), (.75, .25), (.25, .75), (0, 1); the total is 40.
    expected = (
        torch.tensor(
            [
                [1.0, 1.25, 1.75, 2.0],
                [1.5, 1.75, 2.25, 2.5],
                [2.5, 2.75, 3.25, 3.5],
                [3.0, 3.25, 3.75, 4.0],
            ],
            dtype=torch.float64,
        )
        / 40
    )
    assert out.shape == (1, 4, 4, 4, 4)
    assert out.dtype == torch.float64
    # Query (0, 0) of the 2x2 grid is tiled over output queries (0..1, 0..1).
    for qi in (0, 1):
        for qj in (0, 1):
            torch.testing.assert_close(out[0, qi, qj], expected)
    # Query (1, 1) (flat index 3: [2, 3, 4, 1] -> [[2, 3], [4, 1]]) lands on output (2..3, 2..3).
    assert not torch.allclose(out[0, 2, 3], expected)
    single = aggregate_attention([_one_query_attention()[:, 3:4].repeat(1, 4, 1)], [1.0], 4)
    torch.testing.assert_close(out[0, 2, 3], single[0, 0, 0])


def test_heads_are_averaged():
    maps = realistic_attention(batch=2, size=8, resolutions=[8, 4], heads=3, seed=1)
    means = [m.mean(dim=1) for m in maps]
    torch.testing.assert_close(aggregate_attention(maps), aggregate_attention(means))


def test_weighted_sum_against_repeat_interleave_construction():
    maps = realistic_attention(batch=2, size=8, resolutions=[8, 4, 2], heads=2, seed=3)
    weights = [0.2, 0.5, 0.3]
    out = aggregate_attention(maps, weights=weights)
    expected = torch.zeros(2, 8, 8, 8, 8)
    for m, w in zip(maps, weights, strict=True):
        r = int(m.shape[-1] ** 0.5)
        keys = m.mean(1).reshape(2, r * r, r, r)
        keys = torch.nn.functional.interpolate(keys, size=(8, 8), mode="bilinear")
        keys = (keys / keys.sum((-2, -1), keepdim=True)).reshape(2, r, r, 8, 8)
        keys = keys.repeat_interleave(8 // r, dim=1).repeat_interleave(8 // r, dim=2)
        expected += w * keys
    torch.testing.assert_close(out, expected)
    # Default weights are r / sum(r): each aggregated map then sums to 1.
    default = aggregate_attention(maps)
    explicit = aggregate_attention(maps, weights=proportional_weights([8, 4, 2]))
    torch.testing.assert_close(default, explicit)
    torch.testing.assert_close(default.sum((-2, -1)), torch.ones(2, 8, 8))


def test_dtypes():
    maps = realistic_attention(size=4, resolutions=[4, 2], seed=0)
    assert aggregate_attention([m.half() for m in maps]).dtype == torch.float32
    assert aggregate_attention([m.double() for m in maps]).dtype == torch.float64


@pytest.mark.parametrize(
    ("maps", "kwargs", "match"),
    [
        ([], {}, "non-empty sequence"),
        ([torch.rand(1, 5, 5)], {}, "not a square"),
        ([torch.rand(4, 4)], {}, r"maps\[0\] must have shape"),
        ([torch.rand(1, 4, 3)], {}, r"maps\[0\] must have shape"),
        ([torch.rand(1, 4, 4), torch.rand(2, 1, 1)], {}, "batch sizes"),
        ([torch.full((1, 4, 4), float("nan"))], {}, "non-finite"),
        ([torch.full((1, 4, 4), float("inf"))], {}, "non-finite"),
        ([-torch.rand(1, 4, 4)], {}, "negative"),
        ([torch.ones(1, 4, 4, dtype=torch.long)], {}, "floating-point"),
        ([torch.rand(1, 16, 16), torch.rand(1, 4, 4)], {"weights": [1.0]}, "weights has 1"),
        ([torch.rand(1, 16, 16)], {"weights": [-1.0]}, "non-negative"),
        ([torch.rand(1, 16, 16)], {"size": 6}, "size=6"),
    ],
)
def test_bad_input(maps, kwargs, match):
    with pytest.raises(ValueError, match=match):
        aggregate_attention(maps, **kwargs)
