"""The later merge iterations without a host round trip per proposal: the greedy walk on a boolean
matrix and the group means as one matrix product make the decisions of the proposal-by-proposal
loop (the formulation before, kept here as the independent expectation)."""

from __future__ import annotations

import math

import pytest
import torch

from diffseg.aggregate import aggregate_attention
from diffseg.kl import kl_direct
from diffseg.merge import first_merge, greedy_groups, later_merge, sampling_grid
from diffseg.reference import realistic_attention


def _loop_merge(proposals: torch.Tensor, threshold: float) -> torch.Tensor:
    """One proposal at a time, direct elementwise KL, ``mean`` of each group."""
    s = math.isqrt(proposals.shape[1])
    maps = proposals.reshape(-1, s, s)
    matched = torch.zeros(len(proposals), dtype=torch.bool)
    merged = []
    for i in range(len(proposals)):
        if matched[i]:
            continue
        members = kl_direct(maps[i][None], maps) < threshold
        members[i] = True
        matched |= members
        merged.append(proposals[members].mean(dim=0))
    return torch.stack(merged)


def test_greedy_groups_hand_example() -> None:
    # 0~1, 1~2, 3 alone: anchor 0 takes {0, 1}; 1 is matched; anchor 2 takes {1, 2}; anchor 3.
    close = torch.tensor([[1, 1, 0, 0], [1, 1, 1, 0], [0, 1, 1, 0], [0, 0, 0, 1]], dtype=torch.bool)
    expected = torch.tensor([[1, 1, 0, 0], [0, 1, 1, 0], [0, 0, 0, 1]], dtype=torch.bool)
    assert torch.equal(greedy_groups(close), expected)


@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("thresholds", [(1.1, 1.1, 1.1), (0.6, 0.9, 1.3)])
def test_later_merge_equals_the_per_proposal_loop(seed: int, thresholds) -> None:
    maps = aggregate_attention(realistic_attention(size=16, seed=seed))[0].reshape(256, 256)
    proposals = first_merge(maps, sampling_grid(8, 16), thresholds[0])
    fast = slow = proposals
    for threshold in thresholds[1:]:
        fast, slow = later_merge(fast, threshold), _loop_merge(slow, threshold)
        assert fast.shape == slow.shape  # the same groups
        torch.testing.assert_close(fast, slow, rtol=1e-12, atol=1e-15)
    assert 1 < len(fast) < len(proposals)  # the iterations did merge, and not everything


def test_realistic_attention_in_half_precision_scores():
    exact = realistic_attention(batch=1, size=16, seed=0)
    for dtype, tol in ((torch.float16, 1e-2), (torch.bfloat16, 0.1)):
        half = realistic_attention(batch=1, size=16, seed=0, dtype=dtype)
        for a, h in zip(exact, half, strict=True):
            assert h.dtype == torch.float32  # softmax in float32, as the capture processor
            torch.testing.assert_close(h.sum(-1), torch.ones_like(h.sum(-1)))
            assert not torch.equal(a, h)
            torch.testing.assert_close(h, a, rtol=0, atol=tol)
