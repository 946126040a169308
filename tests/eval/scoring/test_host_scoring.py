"""The harness's faster host-side scoring equals the formulations it replaced (issue 25): boundary
bands, contingency tables, segment counts, the matching on the table's histogram; and its
background writer keeps the records behind the files they name."""

from __future__ import annotations

import json
import threading

import numpy as np
import pytest
import torch
from scipy.ndimage import maximum_filter, minimum_filter

from eval.atomic import JsonlAppender, read_jsonl
from eval.results.visualize import save_label_png
from eval.scoring import contingency
from eval.scoring.matching import match_histogram, match_per_image
from eval.scoring.protocol import Protocol, Scoring
from eval.writer import Writer


def band_by_filters(labels: np.ndarray, d: int) -> np.ndarray:
    """The former ``boundary_band``: the ``(2d + 1)`` square around a pixel, padded with a value
    no region has, holds another value iff its maximum and minimum differ."""
    outside = int(labels.min()) - 1
    high = maximum_filter(labels, size=2 * d + 1, mode="constant", cval=outside)
    low = minimum_filter(labels, size=2 * d + 1, mode="constant", cval=outside)
    return high != low


def table_by_masks(pred: np.ndarray, label: np.ndarray, n_class: int) -> np.ndarray:
    """The former ``image_table``: one bincount per layer, bands by the filters."""
    d = contingency.boundary_width(*label.shape)
    gt, pr = band_by_filters(label, d), band_by_filters(pred, d)
    row = np.where((label >= 0) & (label < n_class), label, n_class)
    n_seg = int(pred.max()) + 1
    cell = (row * n_seg + pred).reshape(-1)
    size = (n_class + 1) * n_seg
    layers = [
        np.bincount(cell if m is None else cell[m.reshape(-1)], minlength=size)
        for m in (None, gt, pr, gt & pr)
    ]
    return np.stack(layers).reshape(len(contingency.LAYERS), n_class + 1, n_seg)


def random_map(rng: np.random.Generator, low: int, high: int) -> np.ndarray:
    """Blocky ids ``(H, W)`` (regions of a few pixels, as segmentations have), sometimes noise."""
    h, w = rng.integers(1, 30, 2)
    ids = rng.integers(low, high, (h, w))
    if rng.random() < 0.7:
        ids = ids.repeat(rng.integers(1, 5), axis=0).repeat(rng.integers(1, 5), axis=1)
    return ids


def test_boundary_band_equals_the_max_min_filters_on_random_labels():
    rng = np.random.default_rng(0)
    for _ in range(400):
        labels = random_map(rng, -1, int(rng.integers(1, 6)))
        d = int(rng.integers(1, 9))  # squares wider than the image too
        assert np.array_equal(contingency.boundary_band(labels, d), band_by_filters(labels, d))


def test_image_table_and_segment_count_equal_the_former_formulations():
    rng = np.random.default_rng(1)
    for _ in range(200):
        n_class = int(rng.integers(1, 6))
        label = random_map(rng, -1, n_class + 2)  # ids past n_class are ignored too
        pred = rng.integers(0, 9, label.shape) if rng.random() < 0.3 else None
        if pred is None:
            pred = np.roll(label, rng.integers(0, 3), axis=1).clip(0) * 3 % 7
        table = contingency.image_table(torch.from_numpy(pred), torch.from_numpy(label), n_class)
        assert np.array_equal(table, table_by_masks(pred, label, n_class))
        assert np.array_equal(contingency.pixel_counts(pred, label, n_class), table[0])
        assert contingency.n_segments(table) == torch.unique(torch.from_numpy(pred)).numel()


def test_image_table_refuses_scores():
    with pytest.raises(ValueError, match="integer ids"):
        contingency.image_table(np.zeros((4, 4)), np.zeros((4, 4), dtype=np.int64), 2)


@pytest.mark.parametrize("compat", [False, True])
def test_matching_the_tables_histogram_equals_the_protocols_match(compat):
    """On images where the class order decides ties (classes 2, 3 absent), with and without
    DiffCut's order (``Scoring.order``): the loop's counts are ``Scoring.match``'s."""
    rng = np.random.default_rng(2)
    scoring = Scoring(Protocol(name="diffcut", compat=compat), 4, 0)
    for _ in range(60):
        pred = torch.from_numpy(rng.integers(0, 6, (4, 4)))
        label = torch.from_numpy(rng.integers(-1, 2, (4, 4)))
        table = contingency.image_table(pred, label, 4)
        assert np.array_equal(contingency.histogram(table), contingency.histogram(table[0]))
        got = match_histogram(contingency.histogram(table[0]), scoring.order)
        want = scoring.match(pred, label)
        for a, b in zip(got, want, strict=True):
            assert np.array_equal(a, b)
    assert (scoring.order is None) == (not compat)
    plain = Scoring(Protocol(), 4, None)
    assert plain.order is None
    got = match_histogram(contingency.histogram(table), plain.order)
    assert all(
        np.array_equal(a, b) for a, b in zip(got, match_per_image(pred, label, 4), strict=True)
    )


# ----------------------------------------------------------------------------------------------
# The background writer


def test_writer_runs_jobs_in_order_on_another_thread(tmp_path):
    done, threads = [], set()

    def job(k):
        threads.add(threading.current_thread().name)
        done.append(k)

    writer = Writer(max_pending=2)  # a full queue makes submit wait, not drop
    for k in range(50):
        writer.submit(job, k)
    writer.close()
    writer.close()  # again: nothing
    assert done == list(range(50))
    assert threads == {"eval-writer"}
    with pytest.raises(RuntimeError, match="closed"):
        writer.submit(job, 50)


def test_a_failed_write_keeps_its_record_out_and_is_raised(tmp_path):
    """A prediction that cannot be written (ids past 16 bits): the batch's record, submitted
    after it, is never appended (a resume does the image again), and the error reaches the main
    thread, at close or at the next submit, once."""
    appender = JsonlAppender(tmp_path / "per_image.jsonl")
    writer = Writer()
    good = torch.zeros(4, 4, dtype=torch.long)
    writer.submit(save_label_png, good, tmp_path / "a.png")
    writer.submit(appender.append, [{"index": 0}])
    writer.submit(save_label_png, torch.full((4, 4), 2**16), tmp_path / "b.png")
    writer.submit(appender.append, [{"index": 1}])
    with pytest.raises(ValueError, match="65535"):
        writer.close()
    writer.close()  # raised once
    appender.close()
    assert read_jsonl(tmp_path / "per_image.jsonl") == [{"index": 0}]
    assert (tmp_path / "a.png").exists() and not (tmp_path / "b.png").exists()

    writer = Writer()
    writer.submit(save_label_png, torch.full((4, 4), -1), tmp_path / "c.png")
    for _ in range(1000):  # until the failure has landed, while the main thread goes on
        if writer._error is not None:
            break
        threading.Event().wait(0.01)
    with pytest.raises(ValueError):
        writer.submit(json.dumps, {})
    writer.close()  # already raised: quiet
