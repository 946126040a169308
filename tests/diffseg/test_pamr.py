"""PAMR (diffseg.pamr) against a per-pixel loop written from the paper's definition, plus its
behaviour on a two-colour image."""

from __future__ import annotations

import itertools
import math

import pytest
import torch

from diffseg.pamr import neighbours, pamr


def _pixel_loop_pamr(masks, image, num_iter, dilations):
    """PAMR pixel by pixel with clamped (replicated) coordinates, in float64 Python arithmetic."""
    _, k, h, w = masks.shape
    c = image.shape[1]
    img = image[0].double().tolist()
    m = masks[0].double().tolist()

    def at(a, y, x):
        return a[min(max(y, 0), h - 1)][min(max(x, 0), w - 1)]

    offsets = []
    for d in dilations:
        offsets += [
            (dy, dx) for dy, dx in itertools.product((-d, 0, d), repeat=2) if (dy, dx) != (0, 0)
        ]
    weights = [[None] * w for _ in range(h)]
    for y, x in itertools.product(range(h), range(w)):
        logits = [0.0] * len(offsets)
        for ch in range(c):
            window = [
                at(img[ch], y + dy, x + dx)
                for d in dilations
                for dy in (-d, 0, d)
                for dx in (-d, 0, d)
            ]
            mean = sum(window) / len(window)
            std = math.sqrt(sum((v - mean) ** 2 for v in window) / (len(window) - 1))
            for p, (dy, dx) in enumerate(offsets):
                diff = abs(img[ch][y][x] - at(img[ch], y + dy, x + dx))
                logits[p] += -diff / (1e-8 + 0.1 * std) / c
        top = max(logits)
        exps = [math.exp(v - top) for v in logits]
        weights[y][x] = [e / sum(exps) for e in exps]
    for _ in range(num_iter):
        m = [
            [
                [
                    sum(
                        wgt * at(m[j], y + dy, x + dx)
                        for wgt, (dy, dx) in zip(weights[y][x], offsets, strict=True)
                    )
                    for x in range(w)
                ]
                for y in range(h)
            ]
            for j in range(k)
        ]
    return torch.tensor(m, dtype=torch.float64)[None]


def test_pamr_equals_the_pixel_loop():
    g = torch.Generator().manual_seed(0)
    image = torch.rand(1, 3, 5, 7, generator=g)
    masks = torch.rand(1, 2, 5, 7, generator=g)
    got = pamr(masks, image, num_iter=3, dilations=(1, 2))
    want = _pixel_loop_pamr(masks, image, 3, (1, 2))
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-6)


def test_neighbours_order_and_replicated_border():
    x = torch.arange(9.0).reshape(1, 1, 3, 3)
    n = neighbours(x, [1])  # (1, 1, 8, 3, 3)
    # Centre pixel (1, 1) = 4: its 8 neighbours in row-major order.
    assert n[0, 0, :, 1, 1].tolist() == [0, 1, 2, 3, 5, 6, 7, 8]
    # Corner (0, 0): up/left neighbours are the border replicated.
    assert n[0, 0, :, 0, 0].tolist() == [0, 0, 1, 0, 1, 3, 3, 4]
    assert neighbours(x, [1, 2], centre=True).shape == (1, 1, 18, 3, 3)


def test_masks_snap_to_the_colour_edge_and_keep_their_sum():
    # Black in columns 0..5, white in 6..11; mask "left" wrongly stops at column 3.
    image = torch.zeros(1, 3, 8, 12)
    image[..., 6:] = 1.0
    left = torch.zeros(8, 12)
    left[:, :4] = 1.0
    masks = torch.stack([left, 1 - left])[None]
    out = pamr(masks, image, num_iter=10, dilations=(1, 2, 4))
    labels = out[0].argmax(0)
    assert (labels[:, :6] == 0).all() and (labels[:, 6:] == 1).all()
    # Each step is a convex combination of neighbours: one-hot masks still sum to 1.
    torch.testing.assert_close(out.sum(1), torch.ones(1, 8, 12))


def test_masks_of_another_size_are_resized_and_bad_input_refused():
    image = torch.rand(1, 3, 8, 8)
    out = pamr(torch.rand(1, 2, 4, 4), image, num_iter=1, dilations=(1,))
    assert out.shape == (1, 2, 8, 8)
    with pytest.raises(ValueError, match="dilations"):
        pamr(torch.rand(1, 2, 8, 8), image, dilations=(0,))
    with pytest.raises(ValueError, match="masks must be"):
        pamr(torch.rand(2, 8, 8), image)
    with pytest.raises(ValueError, match="num_iter"):
        pamr(torch.rand(1, 2, 8, 8), image, num_iter=-1)
