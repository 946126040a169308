"""HungarianIoU: dataset-level accumulation and state reduction, with hand-computed answers."""

import math

import pytest
import torch

from eval.scoring.matching import match_per_image
from eval.scoring.metrics import HungarianIoU, image_scores

# Image A: tp [3, 3], fp [0, 0], fn [1, 1], 8 labelled pixels (see test_matching).
LABEL_A = torch.tensor([[0, 0, 0, 0], [1, 1, 1, 1]])
PRED_A = torch.tensor([[0, 0, 0, 2], [1, 1, 1, 2]])
# Image B: one cluster; hist [6, 0], [2, 0] -> tp [6, 0], fp [2, 0], fn [0, 2], 8 pixels.
LABEL_B = torch.tensor([[0, 0, 0, 0], [0, 0, 1, 1]])
PRED_B = torch.zeros(2, 4, dtype=torch.long)


def _both():
    return torch.stack([PRED_A, PRED_B]), torch.stack([LABEL_A, LABEL_B])


def test_counts_are_summed_over_the_dataset_before_dividing():
    metric = HungarianIoU(2)
    metric.update(*_both())
    out = metric.compute()
    assert out["tp"].tolist() == [9, 3]
    assert out["fp"].tolist() == [2, 0]
    assert out["fn"].tolist() == [1, 3]
    assert int(out["total"]) == 16
    assert float(out["pixel_accuracy"]) == pytest.approx(12 / 16)
    assert out["per_class_iou"].tolist() == pytest.approx([9 / 12, 3 / 6])
    # Dataset mIoU 0.625, not the mean of the per-image mIoUs (0.75 and 0.375 -> 0.5625).
    assert float(out["miou"]) == pytest.approx(0.625)
    per_image = [image_scores(PRED_A, LABEL_A, 2)["miou"], image_scores(PRED_B, LABEL_B, 2)["miou"]]
    assert per_image == pytest.approx([0.75, 0.375])


def test_batch_update_equals_image_by_image_updates():
    batched = HungarianIoU(2)
    batched.update(*_both())
    single = HungarianIoU(2)
    single.update(PRED_A[None], LABEL_A[None])
    single.update(PRED_B[None], LABEL_B[None])
    for key in ("tp", "fp", "fn", "total"):
        assert torch.equal(batched.compute()[key], single.compute()[key])


def test_merged_states_equal_one_metric_over_all_images():
    # merge_state applies each state's dist_reduce_fx, as a distributed sync would.
    first, second, whole = HungarianIoU(2), HungarianIoU(2), HungarianIoU(2)
    first.update(PRED_A[None], LABEL_A[None])
    second.update(PRED_B[None], LABEL_B[None])
    whole.update(*_both())
    first.merge_state(second)
    merged, expected = first.compute(), whole.compute()
    for key in ("tp", "fp", "fn", "total"):
        assert torch.equal(merged[key], expected[key])
    assert float(merged["miou"]) == pytest.approx(0.625)


def test_class_never_seen_nor_matched_is_nan_and_left_out_of_miou():
    label = torch.tensor([[0, 0, 1, 1]])
    pred = torch.tensor([[0, 0, 0, 1]])
    # hist (3 x 3): [2,0,0], [1,1,0], [0,0,0] -> tp [2,1,0], fp [1,0,0], fn [0,1,0].
    metric = HungarianIoU(3)
    metric.update(pred[None], label[None])
    out = metric.compute()
    iou = out["per_class_iou"].tolist()
    assert iou[:2] == pytest.approx([2 / 3, 1 / 2])
    assert math.isnan(iou[2])
    assert float(out["miou"]) == pytest.approx((2 / 3 + 1 / 2) / 2)
    assert float(out["pixel_accuracy"]) == pytest.approx(3 / 4)


def test_all_ignore_image_adds_nothing_and_alone_gives_nan():
    ignore = torch.full((1, 2, 4), -1)
    metric = HungarianIoU(2)
    metric.update(PRED_A[None], ignore)
    out = metric.compute()
    assert int(out["total"]) == 0
    assert math.isnan(float(out["pixel_accuracy"]))
    assert math.isnan(float(out["miou"]))
    metric.update(PRED_A[None], LABEL_A[None])
    out = metric.compute()
    assert float(out["pixel_accuracy"]) == pytest.approx(6 / 8)
    single = image_scores(PRED_A, ignore[0], 2)
    assert math.isnan(single["pixel_accuracy"])
    assert math.isnan(single["miou"])


def test_reset_clears_the_counts():
    metric = HungarianIoU(2)
    metric.update(*_both())
    metric.reset()
    metric.update(PRED_A[None], LABEL_A[None])
    assert metric.compute()["tp"].tolist() == [3, 3]


def test_bad_shapes_and_n_class_raise():
    metric = HungarianIoU(2)
    with pytest.raises(ValueError, match=r"\(B, H, W\)"):
        metric.update(PRED_A, LABEL_A)
    with pytest.raises(ValueError, match="same shape"):
        metric.update(PRED_A[None], LABEL_A[None, :, :3])
    with pytest.raises(ValueError, match="n_class"):
        HungarianIoU(0)


def test_update_with_stored_counts_equals_matching_and_refreshes_compute():
    g = torch.Generator().manual_seed(5)
    preds = torch.randint(0, 4, (3, 6, 6), generator=g)
    labels = torch.randint(-1, 3, (3, 6, 6), generator=g)
    matched, added = HungarianIoU(3), HungarianIoU(3)
    matched.update(preds, labels)
    for i, (p, y) in enumerate(zip(preds, labels, strict=True)):
        tp, fp, fn, total = match_per_image(p, y, 3)
        added.update(
            counts={"tp": tp.tolist(), "fp": fp.tolist(), "fn": fn.tolist(), "total": total}
        )
        if i == 0:
            assert added.compute()["tp"].tolist() == tp.tolist()
    # Each compute() sees the updates before it (merge_state would have kept the cached result).
    assert added.compute()["tp"].tolist() != match_per_image(preds[0], labels[0], 3)[0].tolist()
    for key, value in matched.compute().items():
        torch.testing.assert_close(added.compute()[key], value, rtol=0, atol=0)
    with pytest.raises(ValueError, match="pred and label, or counts"):
        added.update(preds)
