"""Tests for diffseg.merge: grid, iterative merging, K-means refinement, labels."""

import pytest
import torch

from diffseg.aggregate import aggregate_attention
from diffseg.kl import kl_direct, kl_float16, kl_matrix
from diffseg.merge import (
    check_merge_settings,
    kmeans_refine,
    later_merge,
    merge_attention,
    proposals_to_labels,
    sampling_grid,
    segment_attention,
)
from diffseg.reference import (
    realistic_attention,
    reference_grid,
    reference_merge,
    reference_segment,
)


def _quadrant_attention(size: int = 8) -> torch.Tensor:
    """(1, S, S, S, S) and (S, S) quadrant ids: each query attends to its own quadrant (+ a floor)."""
    half = size // 2
    quadrant = torch.zeros(size, size, dtype=torch.long)
    quadrant[:half, half:] = 1
    quadrant[half:, :half] = 2
    quadrant[half:, half:] = 3
    maps = (quadrant[:, :, None, None] == quadrant[None, None]).double() + 1e-3
    return (maps / maps.sum((-2, -1), keepdim=True))[None], quadrant


@pytest.mark.parametrize(
    ("num_points", "size", "coords"),
    [
        (16, 64, list(range(1, 62, 4))),
        (2, 64, [0, 63]),
        (3, 8, [0, 3, 6]),
        (5, 16, [1, 4, 7, 10, 13]),
        (8, 8, list(range(8))),
    ],
)
def test_sampling_grid_known_values(num_points, size, coords):
    grid = sampling_grid(num_points, size)
    expected = torch.tensor([[r, c] for r in coords for c in coords])
    assert torch.equal(grid, expected)
    assert torch.equal(grid, torch.from_numpy(reference_grid(num_points, size)))


@pytest.mark.parametrize(
    ("thresholds", "quadrant_labels"),
    [
        # One iteration keeps all 16 anchors' (identical per quadrant) proposals: the argmax tie
        # goes to each quadrant's first anchor, 0, 2, 8, 10 on the 4x4 row-major grid.
        ((1.1,), [0, 2, 8, 10]),
        ((1.1, 1.1), [0, 1, 2, 3]),
        ((0.5, 0.5, 0.5, 0.5), [0, 1, 2, 3]),
    ],
)
def test_quadrants_give_exactly_four_segments(thresholds, quadrant_labels):
    aggregated, quadrant = _quadrant_attention(8)
    labels = segment_attention(aggregated, thresholds, num_points=4)
    assert labels.shape == (1, 64, 64)
    expected = torch.tensor(quadrant_labels)[quadrant]
    expected = expected.repeat_interleave(8, 0).repeat_interleave(8, 1)
    assert torch.equal(labels[0], expected)
    assert len(merge_attention(aggregated, thresholds, num_points=4)[0]) == (
        16 if len(thresholds) == 1 else 4
    )


def test_later_iteration_merges_with_already_matched_proposals():
    logits = torch.tensor([0.0, 0.0, 0.0, 0.0], dtype=torch.float64)
    p = torch.stack([(logits + torch.tensor([a, 0, 0, 0])).softmax(0) for a in (0.0, 1.5, 3.0)])
    kl = kl_direct(p[:, None].reshape(3, 1, 2, 2), p.reshape(1, 3, 2, 2))
    threshold = (max(kl[0, 1], kl[1, 2]) + kl[0, 2]).item() / 2
    assert kl[0, 1] < threshold < kl[0, 2] and kl[1, 2] < threshold
    merged = later_merge(p, threshold)
    # Anchor 0 takes {0, 1}; 1 is then matched; anchor 2 takes {1, 2}: 1 again.
    expected = torch.stack([p[[0, 1]].mean(0), p[[1, 2]].mean(0)])
    torch.testing.assert_close(merged, expected)


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("thresholds", [(1.1, 1.1, 1.1), (0.7, 1.0), (1.5,)])
def test_labels_equal_reference_on_realistic_attention(seed, thresholds):
    aggregated = aggregate_attention(realistic_attention(batch=2, size=16, seed=seed))
    labels = segment_attention(aggregated, thresholds, num_points=8)
    for b in range(2):
        expected = reference_segment(aggregated[b], thresholds, num_points=8)
        assert torch.equal(labels[b], expected)
    assert labels.max() > 0  # more than one segment: the comparison is not vacuous


def test_labels_equal_reference_at_s32():
    aggregated = aggregate_attention(realistic_attention(size=32, seed=4))
    labels = segment_attention(aggregated, num_points=8)
    assert labels.shape == (1, 256, 256)
    assert torch.equal(labels[0], reference_segment(aggregated[0], (1.1, 1.1, 1.1), num_points=8))
    assert labels.max() > 0
    proposals = merge_attention(aggregated, num_points=8)[0]
    assert segment_attention(aggregated, num_points=8, out_size=(64, 48)).shape == (1, 64, 48)
    assert torch.equal(
        segment_attention(aggregated, num_points=8, out_size=(64, 48))[0],
        proposals_to_labels(proposals, (64, 48)),
    )


# ----------------------------------------------------------------------------------------------
# first_merge_dtype=float16: the official iteration-1 arithmetic


def _underflowing_quadrants() -> torch.Tensor:
    """The 8x8 quadrant attention with one entry of two maps set to 1e-9 (float16 rounds it to 0):
    map 0 (the anchor at (0, 0)) and map 9 (at (1, 1), no anchor); both in quadrant 0."""
    aggregated, _ = _quadrant_attention(8)
    maps = aggregated.reshape(64, 64).clone()
    maps[0, 63] = maps[9, 63] = 1e-9  # position (7, 7), in quadrant 3: the floor, ~6e-5 before
    return (maps / maps.sum(dim=1, keepdim=True)).reshape(1, 8, 8, 8, 8)


def test_float16_underflow_gives_nan_where_float64_merges():
    aggregated = _underflowing_quadrants()
    maps = aggregated.reshape(64, 8, 8)
    grid = sampling_grid(4, 8)
    anchors = maps[grid[:, 0] * 8 + grid[:, 1]]
    # float16: every pair with map 0 or map 9 is nan; float64: finite and small within quadrant 0.
    kl16, kl64 = kl_float16(anchors, maps), kl_matrix(anchors, maps)
    nan = torch.zeros(16, 64, dtype=torch.bool)
    nan[0] = True
    nan[:, [0, 9]] = True
    assert torch.equal(kl16.isnan(), nan)
    assert kl64.isfinite().all() and kl64[0, 9] < 0.1 and kl64[1, 0] < 0.1  # anchor 1: (0, 2)
    p64 = merge_attention(aggregated, (1.1,), num_points=4)[0].reshape(-1, 64)
    p16 = merge_attention(aggregated, (1.1,), num_points=4, first_merge_dtype="float16")[0]
    p16 = p16.reshape(-1, 64)
    # float64: 16 proposals, each its anchor's quadrant mean. float16: anchor 0's proposal is nan
    # (it matches nothing, not even itself) and is dropped; maps 0 and 9 join no other anchor.
    quadrant = _quadrant_attention(8)[1].reshape(-1)
    q0 = aggregated.reshape(64, 64)[quadrant == 0].double()
    assert len(p64) == 16 and len(p16) == 15
    torch.testing.assert_close(p64[0], q0.mean(0), rtol=0, atol=1e-15)
    kept = [i for i in range(64) if quadrant[i] == 0 and i not in (0, 9)]
    without = aggregated.reshape(64, 64)[kept].double().mean(0)
    # Anchor (0, 2), the grid's second, is p16's first row once anchor 0 is gone.
    torch.testing.assert_close(p16[0], without, rtol=0, atol=1e-15)
    torch.testing.assert_close(p64[1], q0.mean(0), rtol=0, atol=1e-15)
    assert not torch.allclose(p16[0], p64[1], rtol=0, atol=1e-6)
    # With a second iteration the quadrants still merge to four segments in both modes.
    assert len(merge_attention(aggregated, (1.1, 1.1), 4, first_merge_dtype="float16")[0]) == 4


def test_float16_threshold_is_rounded_like_the_official_code():
    # Map 0 uniform, maps 1-3 one peaked map y: KL(map 0, y) = 1.0998 exactly, below 1.1, but its
    # float16 value rounds to 1.0996 = float16(1.1), which is not below the float16 threshold.
    p = 0.03156
    y = torch.tensor([p, p, p, 1 - 3 * p], dtype=torch.float64)
    maps = torch.stack([torch.full((4,), 0.25, dtype=torch.float64), y, y, y])
    assert 1.0996 < kl_matrix(maps[:1].reshape(1, 2, 2), y.reshape(1, 2, 2)).item() < 1.1
    assert kl_float16(maps[:1].reshape(1, 2, 2), y.reshape(1, 2, 2)).item() == 1.099609375
    aggregated = maps.reshape(1, 2, 2, 2, 2)
    p64 = merge_attention(aggregated, (1.1,), num_points=2)[0]
    p16 = merge_attention(aggregated, (1.1,), num_points=2, first_merge_dtype="float16")[0]
    torch.testing.assert_close(p64[0].reshape(-1), maps.mean(0), rtol=0, atol=1e-15)
    assert torch.equal(p16[0].reshape(-1), maps[0])


@pytest.mark.parametrize("thresholds", [(1.1, 1.1), (0.9, 1.1, 1.1)])
def test_float16_first_merge_equals_the_official_transcription(thresholds):
    # Peaked attention: about 86% of the 256 maps hold entries float16 rounds to 0.
    aggregated = aggregate_attention(realistic_attention(size=16, temperature=12.0, seed=1))
    maps = aggregated[0].reshape(256, 256)
    assert 0.5 < (maps <= 2**-25).any(dim=1).double().mean() < 1
    p16 = merge_attention(aggregated, thresholds, num_points=8, first_merge_dtype=torch.float16)
    expected = reference_merge(aggregated[0], thresholds, num_points=8, dtype=torch.float16)
    assert torch.equal(p16[0], expected)
    labels = segment_attention(aggregated, thresholds, 8, first_merge_dtype="float16")
    assert torch.equal(
        labels[0], reference_segment(aggregated[0], thresholds, 8, dtype=torch.float16)
    )
    # float64 keeps the anchors float16 loses: more segments, other labels.
    assert len(merge_attention(aggregated, thresholds, num_points=8)[0]) > len(p16[0])


def test_float16_with_every_anchor_underflowing_is_a_clear_error():
    maps = torch.eye(4, dtype=torch.float64) * 0.97 + 0.01
    maps[torch.arange(4), (torch.arange(4) + 1) % 4] = 1e-9  # one entry of every map
    aggregated = (maps / maps.sum(dim=1, keepdim=True)).reshape(1, 2, 2, 2, 2)
    with pytest.raises(ValueError, match=r"no proposal is left.*first_merge_dtype=float64"):
        merge_attention(aggregated, (1.1,), num_points=2, first_merge_dtype="float16")


def test_proposals_to_labels_hand_example():
    # Two 2x2 proposals; upsampled x2 (half-pixel), the argmax boundary sits in the middle.
    p = torch.tensor([[[1.0, 0.0], [1.0, 0.0]], [[0.0, 1.0], [0.0, 1.0]]])
    labels = proposals_to_labels(p, 4)
    assert torch.equal(labels, torch.tensor([[0, 0, 1, 1]] * 4))
    # Ties go to the first proposal.
    assert torch.equal(
        proposals_to_labels(torch.ones(3, 2, 2), (2, 3)), torch.zeros(2, 3, dtype=torch.long)
    )


def test_kmeans_refine_keeps_or_lowers_inertia_and_is_a_fixed_point():
    aggregated = aggregate_attention(realistic_attention(size=16, seed=5))
    maps = aggregated[0].reshape(256, 256).double()
    init = merge_attention(aggregated, num_points=8)[0].reshape(-1, 256)
    init_inertia = torch.cdist(maps, init).pow(2).min(dim=1).values.sum().item()
    centres, labels, inertia = kmeans_refine(maps, init)
    assert inertia <= init_inertia + 1e-12
    torch.testing.assert_close(
        centres, torch.stack([maps[labels == k].mean(0) for k in range(len(centres))])
    )
    assert torch.equal(torch.cdist(maps, centres).argmin(dim=1), labels)
    refined = segment_attention(aggregated, num_points=8, refine=True)
    assert refined.shape == (1, 128, 128) and refined.min() >= 0 and refined.max() < len(centres)


def test_kmeans_empty_cluster_is_dropped():
    maps = torch.tensor([[0.0, 0.0], [0.1, 0.0], [5.0, 5.0], [5.1, 5.0]], dtype=torch.float64)
    init = torch.tensor([[0.0, 0.0], [100.0, 100.0], [5.0, 5.0]], dtype=torch.float64)
    centres, labels, inertia = kmeans_refine(maps, init)
    # The far centre never wins a point, keeps its place while empty and is dropped at the end.
    torch.testing.assert_close(
        centres, torch.tensor([[0.05, 0.0], [5.05, 5.0]], dtype=torch.float64)
    )
    assert labels.tolist() == [0, 0, 1, 1]
    assert inertia == pytest.approx(4 * 0.05**2)


@pytest.mark.parametrize(
    ("aggregated", "kwargs", "match"),
    [
        (torch.rand(4, 4, 4, 4), {}, r"\(B, S, S, S, S\)"),
        (torch.rand(1, 4, 4, 4, 5), {}, r"\(B, S, S, S, S\)"),
        (torch.full((1, 4, 4, 4, 4), float("nan")), {}, "non-finite"),
        (-torch.rand(1, 4, 4, 4, 4), {}, "negative"),
        (torch.rand(1, 4, 4, 4, 4), {"kl_threshold": (1.1, 0.0)}, "positive"),
        (torch.rand(1, 4, 4, 4, 4), {"kl_threshold": (-1.0,)}, "positive"),
        (
            torch.rand(1, 4, 4, 4, 4),
            {"kl_threshold": (-1, -1, 0)},
            r"where -1\.0 and 0\.0 are not$",
        ),
        (torch.rand(1, 4, 4, 4, 4), {"kl_threshold": ()}, "one or more values"),
        (torch.rand(1, 4, 4, 4, 4), {"kl_threshold": 1.1}, "sequence"),
        (torch.rand(1, 4, 4, 4, 4), {"num_points": 1}, "num_points"),
        (torch.rand(1, 4, 4, 4, 4), {"num_points": 5}, r"num_points must be an int in \[2, S=4\]"),
        (torch.rand(1, 4, 4, 4, 4), {"out_size": 0}, "out_size"),
        (torch.rand(1, 4, 4, 4, 4), {"first_merge_dtype": "float32"}, "first_merge_dtype"),
    ],
)
def test_bad_input(aggregated, kwargs, match):
    with pytest.raises(ValueError, match=match):
        segment_attention(aggregated, **kwargs)


@pytest.mark.parametrize(
    ("settings", "match"),
    [
        ({"resolution": 512, "num_points": 1}, r"num_points must be an int in \[2, S=64\].*got 1"),
        ({"resolution": 64, "num_points": 9}, r"\[2, S=8\].*64px image.*got 9"),
        ({"resolution": 512, "num_points": 16.0}, "got 16.0"),
        ({"resolution": 512, "num_points": True}, "got True"),
        ({"resolution": 100}, "resolution must be a positive multiple of 8"),
        ({"resolution": 512, "kl_threshold": (1.1, -1.0)}, "positive"),
    ],
)
def test_merge_settings_are_checked_without_attention(settings, match):
    with pytest.raises(ValueError, match=match):
        check_merge_settings(**settings)


def test_merge_settings_accept_what_the_merge_accepts():
    # S = resolution / scale factor: the side of the aggregated attention the anchors are placed on.
    assert check_merge_settings(512) == 64
    assert check_merge_settings(64, num_points=8, kl_threshold=[0.9]) == 8
    assert check_merge_settings(64, num_points=2) == 8
    assert check_merge_settings(128, num_points=8, scale_factor=4) == 32
    for num_points in (2, 8):
        assert len(sampling_grid(num_points, 8)) == num_points**2  # the merge takes both ends
