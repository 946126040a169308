"""Hand-computed checks of the official per-image Hungarian scoring."""

import itertools

import numpy as np
import pytest
import torch

from eval.scoring.matching import confusion_histogram, match_per_image


def _arr(x):
    return np.asarray(x, dtype=np.int64)


def test_more_clusters_than_classes():
    label = _arr([[0, 0, 0, 0], [1, 1, 1, 1]])
    pred = _arr([[0, 0, 0, 2], [1, 1, 1, 2]])
    # hist: class 0 -> [3, 0, 1], class 1 -> [0, 3, 1]; best: 0->0, 1->1 (6 pixels).
    tp, fp, fn, total = match_per_image(pred, label, 2)
    np.testing.assert_array_equal(tp, [3, 3])
    np.testing.assert_array_equal(fn, [1, 1])  # cluster 2 is unmatched: its pixels are only FN
    np.testing.assert_array_equal(fp, [0, 0])
    assert total == 8


def test_fewer_clusters_than_classes():
    label = _arr([0, 0, 1, 1, 2, 2])
    pred = _arr([0, 0, 0, 1, 1, 1])
    # hist (3 x 3, column 2 empty): [2,0,0], [1,1,0], [0,2,0]; best: 0->0, 2->1, 1->empty (4).
    assert confusion_histogram(pred, label, 3).shape == (3, 3)
    tp, fp, fn, total = match_per_image(pred, label, 3)
    np.testing.assert_array_equal(tp, [2, 0, 2])
    np.testing.assert_array_equal(fn, [0, 2, 0])
    np.testing.assert_array_equal(fp, [1, 0, 1])
    assert total == 6


def test_absent_class_matched_to_a_nonempty_cluster_gets_false_positives():
    label = _arr([0, 0, 0, 1, 1, 1])  # class 2 absent
    pred = _arr([0, 0, 0, 1, 1, 2])
    # hist: [3,0,0], [0,2,1], [0,0,0]; best: identity (5). Class 2 takes cluster 2 (1 pixel).
    tp, fp, fn, total = match_per_image(pred, label, 3)
    np.testing.assert_array_equal(tp, [3, 2, 0])
    np.testing.assert_array_equal(fn, [0, 1, 0])
    np.testing.assert_array_equal(fp, [0, 0, 1])
    assert total == 6


def test_absent_class_matched_to_an_empty_column_counts_nothing():
    label = _arr([0, 0, 0, 1, 1, 1])
    pred = _arr([0, 0, 0, 1, 1, 1])
    tp, fp, fn, total = match_per_image(pred, label, 3)
    np.testing.assert_array_equal(tp, [3, 3, 0])
    np.testing.assert_array_equal(fp, [0, 0, 0])
    np.testing.assert_array_equal(fn, [0, 0, 0])
    assert total == 6


def test_all_ignore_image():
    label = np.full((3, 3), -1, dtype=np.int64)
    pred = _arr(np.arange(9).reshape(3, 3))
    tp, fp, fn, total = match_per_image(pred, label, 4)
    for counts in (tp, fp, fn):
        np.testing.assert_array_equal(counts, [0, 0, 0, 0])
    assert total == 0


def test_ignore_label_and_out_of_range_labels_are_excluded():
    label = _arr([0, 0, -1, 5, 1, 1])
    pred = _arr([0, 0, 7, 1, 1, 1])
    # The histogram is as wide as pred.max()+1 over all pixels (as the official code) ...
    hist = confusion_histogram(pred, label, 2)
    assert hist.shape == (2, 8)
    np.testing.assert_array_equal(hist[:, :2], [[2, 0], [0, 2]])
    assert hist[:, 2:].sum() == 0
    # ... but ignored pixels never count, even where their cluster is matched (cluster 1).
    tp, fp, fn, total = match_per_image(pred, label, 2)
    np.testing.assert_array_equal(tp, [2, 2])
    np.testing.assert_array_equal(fp, [0, 0])
    np.testing.assert_array_equal(fn, [0, 0])
    assert total == 4


def test_torch_and_numpy_inputs_agree():
    rng = np.random.default_rng(0)
    label = rng.integers(-1, 4, size=(6, 7))
    pred = rng.integers(0, 5, size=(6, 7))
    out_np = match_per_image(pred, label, 4)
    out_t = match_per_image(torch.from_numpy(pred), torch.from_numpy(label).int(), 4)
    for a, b in zip(out_np[:3], out_t[:3], strict=True):
        np.testing.assert_array_equal(a, b)
    assert out_np[3] == out_t[3]


@pytest.mark.parametrize("seed", range(5))
def test_matched_pixels_are_the_brute_force_maximum(seed):
    # Independent check of the assignment: enumerate every injective class -> cluster map.
    rng = np.random.default_rng(seed)
    n_class, n_cluster = 3, 4
    label = rng.integers(-1, n_class, size=(5, 5))
    pred = rng.integers(0, n_cluster, size=(5, 5))
    keep = label >= 0
    best = 0
    for perm in itertools.permutations(range(n_cluster), n_class):
        matched = sum(int(((label == c) & (pred == k)).sum()) for c, k in enumerate(perm))
        best = max(best, matched)
    tp, fp, fn, total = match_per_image(pred, label, n_class)
    assert tp.sum() == best
    assert total == keep.sum()
    np.testing.assert_array_equal(tp + fn, [(label == c).sum() for c in range(n_class)])
    assert (fp >= 0).all()


@pytest.mark.parametrize(
    ("pred", "label", "n_class", "match"),
    [
        (np.zeros((2, 2), np.int64), np.zeros((2, 3), np.int64), 2, "same shape"),
        (np.zeros((2, 2), np.float32), np.zeros((2, 2), np.int64), 2, "integer segment ids"),
        (np.array([[0, -1]]), np.zeros((1, 2), np.int64), 2, "non-negative"),
        (np.zeros((2, 2), np.int64), np.zeros((2, 2), np.float64), 2, "label must hold integer"),
        (np.zeros((2, 2), np.int64), np.zeros((2, 2), np.int64), 0, "n_class"),
        (np.zeros((0,), np.int64), np.zeros((0,), np.int64), 2, "empty"),
        ([[0, 1]], np.zeros((1, 2), np.int64), 2, "torch.Tensor or numpy"),
    ],
)
def test_bad_input_raises_value_error(pred, label, n_class, match):
    with pytest.raises(ValueError, match=match):
        match_per_image(pred, label, n_class)
