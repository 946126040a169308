"""Scoring protocols (eval.scoring.protocol, conf/protocol/): DiffCut's crop, 128x128 scoring, background
merge and compat labels on hand-built examples, the composed configs, and one tiny end-to-end run."""

from __future__ import annotations

import csv
import json
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf
from PIL import Image
from scipy.optimize import linear_sum_assignment

from diffseg.preprocess import resize_label
from eval.datasets.classes import ADE20K_CLASSES, VOC_CLASSES
from eval.datasets.synthetic import SyntheticScenes
from eval.scoring.matching import match_per_image
from eval.scoring.metrics import HungarianIoU
from eval.scoring.protocol import (
    Protocol,
    ProtocolData,
    Scoring,
    check_dataset,
    compat_label,
    crop_min_minus_one,
    merge_unmatched_into_background,
)
from tests.helpers import run_module

ROOT = Path(__file__).resolve().parents[3]


class _Items:
    """A dataset of given items with given class names."""

    def __init__(self, items, class_names):
        self.items, self.class_names, self.n_class = items, list(class_names), len(class_names)

    def __len__(self):
        return len(self.items)

    def __getitem__(self, i):
        return self.items[i]


def _score(dataset, preds):
    metric = HungarianIoU(dataset.n_class)
    for i, pred in enumerate(preds):
        metric.update(pred[None], dataset[i]["label"][None])
    return metric.compute()


# ----------------------------------------------------------------------------------------------
# Crop and downsampling


def test_crop_is_torchvision_center_crop_of_min_side_minus_one():
    x = torch.arange(4 * 6).reshape(4, 6)
    # c = 3; top = round(0.5) = 0, left = round(1.5) = 2 (half to even; floor would give 1).
    assert crop_min_minus_one(x).tolist() == [[2, 3, 4], [8, 9, 10], [14, 15, 16]]
    y = torch.arange(7 * 5).reshape(7, 5)
    # c = 4; top = round(1.5) = 2, left = round(0.5) = 0.
    assert crop_min_minus_one(y)[0].tolist() == [10, 11, 12, 13]
    assert crop_min_minus_one(y).shape == (4, 4)


def test_nearest_downsampling_takes_the_first_pixel_of_each_block():
    x = torch.arange(8).repeat(8, 1)  # column index
    assert resize_label(x, 2, mode="nearest").tolist() == [[0, 4], [0, 4]]
    assert resize_label(x, 8, mode="nearest") is x


def test_scoring_at_128_by_hand():
    # At 1024: class 1 from column 503, cluster 1 from column 505 (2 columns disagree). At 128
    # with pixel floor(8j): class 1 from j = 63 (504 >= 503), cluster 1 from j = 64 (504 < 505),
    # so one column of 128 disagrees. (nearest-exact, pixel 8j + 4, would make them agree.)
    cols = torch.arange(1024).expand(1024, 1024)
    label = (cols >= 503).long()
    pred = (cols >= 505).long()
    image = torch.rand(3, 1024, 1024)
    score = Scoring(Protocol(score_resolution=128), n_class=2, background=None)
    item, pred128 = score({"image": image, "label": label, "id": "x"}, pred)
    assert item["label"].shape == pred128.shape == item["image"].shape[1:] == (128, 128)
    tp, fp, fn, total = match_per_image(pred128, item["label"], 2)
    assert total == 128 * 128
    assert tp.tolist() == [128 * 63, 128 * 64]
    assert fp.tolist() == [128, 0] and fn.tolist() == [0, 128]
    # The image is downsampled bilinearly: pixel j averages source pixels 8j + 3 and 8j + 4.
    torch.testing.assert_close(item["image"][:, 0, 0], image[:, 3:5, 3:5].mean((1, 2)))


# ----------------------------------------------------------------------------------------------
# Background merge

LABEL = torch.tensor([[1, 1, 0, 0], [1, 1, 0, 0], [2, 2, 0, 0], [2, 2, 0, -1]])
PRED = torch.tensor([[0, 0, 1, 1], [0, 0, 2, 2], [3, 3, 4, 4], [3, 3, 4, 4]])


def test_unmatched_clusters_merge_into_one_background_cluster():
    # Classes 0 background, 1 cat, 2 dog, 3 bird (absent). Foreground matching: cat -> cluster 0,
    # dog -> cluster 3; bird (no pixels) gets some cluster but is not "assigned", so that cluster
    # is merged too. Clusters 1, 2, 4 (and bird's) become cluster max + 1 = 5.
    merged = merge_unmatched_into_background(PRED, LABEL, n_class=4, background=0)
    assert merged.tolist() == [[0, 0, 5, 5], [0, 0, 5, 5], [3, 3, 5, 5], [3, 3, 5, 5]]
    tp, _, _, total = match_per_image(merged, LABEL, 4)
    assert (tp.sum(), total) == (15, 15)  # every labelled pixel right
    # Without the merge the background only gets cluster 4's 3 pixels.
    tp, _, _, _ = match_per_image(PRED, LABEL, 4)
    assert tp.sum() == 4 + 4 + 3


def test_background_may_be_any_class_index():
    # Same scene with the background as the last class (DiffCut's order).
    label = torch.where(LABEL == 0, 3, torch.where(LABEL > 0, LABEL - 1, LABEL))
    merged = merge_unmatched_into_background(PRED, label, n_class=4, background=3)
    assert merged.tolist() == [[0, 0, 5, 5], [0, 0, 5, 5], [3, 3, 5, 5], [3, 3, 5, 5]]
    with pytest.raises(ValueError, match="background"):
        merge_unmatched_into_background(PRED, label, n_class=4, background=4)


def test_assigned_means_pixels_in_any_matched_cluster_as_diffcut():
    # Class 1 (3 pixels) and class 2 (2 pixels) both lie in cluster 1, which class 1 wins; class 2
    # is matched to cluster 0 (background pixels only). DiffCut counts class 2 as assigned because
    # it has pixels in *a* matched cluster (hist[:, col_ind].max(axis=1) > 0), so cluster 0 is
    # kept; a rule "pixels in its own cluster" would have merged it into a new cluster 2.
    label = torch.tensor([[1, 1, 1, 2, 2, 0]])
    pred = torch.tensor([[1, 1, 1, 1, 1, 0]])
    merged = merge_unmatched_into_background(pred, label, n_class=3, background=0)
    assert merged.tolist() == [[1, 1, 1, 1, 1, 0]]
    # With class 2 absent, its matched cluster 0 is merged (into cluster 2).
    label = torch.tensor([[1, 1, 1, 1, 1, 0]])
    merged = merge_unmatched_into_background(pred, label, n_class=3, background=0)
    assert merged.tolist() == [[1, 1, 1, 1, 1, 2]]


# ----------------------------------------------------------------------------------------------
# DiffCut's scoring, transcribed from its code (tools/utils.py, eval_diffcut.py) as the expectation


def _diffcut_hist(label_true, label_pred, n_class):
    pred_n_class = np.maximum(n_class, label_pred.max() + 1)
    mask = (label_true >= 0) & (label_true < n_class)
    hist = np.bincount(
        pred_n_class * label_true[mask] + label_pred[mask], minlength=n_class * pred_n_class
    )
    return hist.reshape(n_class, pred_n_class)


def _diffcut_hungarian(pred, label, n_class):
    hist = _diffcut_hist(label.flatten(), pred.flatten(), n_class)
    row_ind, col_ind = linear_sum_assignment(hist, maximize=True)
    fn = np.sum(hist, 1) - hist[row_ind, col_ind]
    tp = hist[row_ind, col_ind]
    hist = hist[:, col_ind]
    fp = np.sum(hist, 0) - np.diag(hist)
    return tp, fp, fn, hist, col_ind


def _diffcut_score(pred, label_map, n_class):
    """One image of a dataset with background: ``label_map`` has -1 for background and the
    foreground classes 0..n_class-2; returns (tp, fp, fn) in DiffCut's class order."""
    pred, label_map = pred.copy(), label_map.copy()
    _, _, _, hist, col_ind = _diffcut_hungarian(pred, label_map, n_class - 1)
    label_map[label_map == -1] = n_class - 1
    assigned_gt_clusters = np.where(hist.max(axis=1) > 0)[0].tolist()
    assigned_pred_clusters = [col_ind[i] for i in assigned_gt_clusters]
    background_clusters = list(set(np.unique(pred)) - set(assigned_pred_clusters))
    bg_label = pred.max() + 1
    for bg_cls in background_clusters:
        pred[pred == bg_cls] = bg_label
    tp, fp, fn, _, _ = _diffcut_hungarian(pred, label_map, n_class)
    return tp, fp, fn


def _random_scene(rng, n_class, size=12):
    """Blocky label (background 0 and up to 3 foreground classes) and clusters (2 to 9)."""
    present = [0, *rng.choice(np.arange(1, n_class), rng.integers(1, 4), replace=False)]
    label = rng.choice(present, (3, 3)).repeat(4, 0).repeat(4, 1)
    pred = rng.integers(0, rng.integers(2, 10), (4, 4)).repeat(3, 0).repeat(3, 1)
    return torch.from_numpy(pred), torch.from_numpy(label)


def test_compat_scoring_equals_diffcut_code_including_ties():
    n_class, rng = 8, np.random.default_rng(0)
    protocol = Protocol(name="diffcut", compat=True, background={"voc": "background"})
    score = Scoring(protocol, n_class=n_class, background=0)
    background_first = 0
    for _ in range(60):
        pred, label = _random_scene(rng, n_class)
        item, merged = score({"image": torch.zeros(3, 12, 12), "label": label, "id": "x"}, pred)
        tp, fp, fn, total = score.match(merged, item["label"])
        # DiffCut's labels: our background 0 is its -1 (then its last class), our c its c - 1.
        expected = _diffcut_score(pred.numpy(), label.numpy() - 1, n_class)
        ours_in_diffcut_order = [np.roll(counts, -1) for counts in (tp, fp, fn)]
        for got, want in zip(ours_in_diffcut_order, expected, strict=True):
            np.testing.assert_array_equal(got, want)
        assert total == label.numel()
        background_first += not np.array_equal(match_per_image(merged, label, n_class)[1], fp)
    # With background first the assignment's ties put false positives on other absent classes.
    assert background_first > 5


# ----------------------------------------------------------------------------------------------
# compat


def test_compat_labels_by_hand():
    voc = torch.tensor([[0, 1], [-1, 20]])
    assert compat_label(voc, "voc", 21).tolist() == [[0, 1], [0, 20]]
    assert compat_label(voc, "coco_object", 81).tolist() == [[0, 1], [0, 20]]
    ade = torch.tensor([[-1, 0], [148, 149]])
    assert compat_label(ade, "ade20k", 150).tolist() == [[0, 1], [149, -1]]
    assert compat_label(voc, "coco_stuff27", 27) is voc


def test_compat_changes_voc_scoring_as_documented():
    # Object (class 1) in columns 0-1, its boundary (ignored) in column 2, background in column 3;
    # the segmenter puts the boundary with the object.
    label = torch.tensor([[1, 1, -1, 0]] * 4)
    pred = torch.tensor([[0, 0, 0, 1]] * 4)
    base = _Items([{"image": torch.zeros(3, 4, 4), "label": label, "id": "a"}], VOC_CLASSES)
    correct = _score(ProtocolData(base, Protocol(name="diffcut"), "voc"), [pred])
    compat = _score(ProtocolData(base, Protocol(name="diffcut", compat=True), "voc"), [pred])
    assert int(correct["total"]) == 12 and float(correct["pixel_accuracy"]) == 1.0
    # compat: the 4 boundary pixels are background, scored wrong (they sit in the object cluster).
    assert int(compat["total"]) == 16 and float(compat["pixel_accuracy"]) == 0.75
    # DataLoader workers may pickle the wrapped dataset.
    again = pickle.loads(pickle.dumps(ProtocolData(base, Protocol(compat=True), "voc")))
    assert again[0]["label"].tolist() == compat_label(label, "voc", 21).tolist()


def test_compat_changes_ade20k_scoring_as_documented():
    # ADE "other" (our -1) in column 0, our class 0 (ADE 1) in column 1, our 149 (ADE 150, flag)
    # in columns 2-3; the prediction follows the columns.
    label = torch.tensor([[-1, 0, 149, 149]] * 2)
    pred = torch.tensor([[0, 1, 2, 2]] * 2)
    base = _Items([{"image": torch.zeros(3, 2, 4), "label": label, "id": "a"}], ADE20K_CLASSES)
    data = ProtocolData(base, Protocol(name="diffcut", compat=True), "ade20k")
    assert data.n_class == 150 and data.class_names[1] == ADE20K_CLASSES[0]
    assert data.class_names[0].startswith("other")
    correct = _score(ProtocolData(base, Protocol(name="diffcut"), "ade20k"), [pred])
    compat = _score(data, [pred])
    assert int(correct["total"]) == 6  # "other" ignored, flag scored
    assert float(correct["per_class_iou"][149]) == 1.0
    assert int(compat["total"]) == 4  # "other" scored as class 0, flag ignored
    assert float(compat["per_class_iou"][0]) == 1.0 and float(compat["tp"][149]) == 0


# ----------------------------------------------------------------------------------------------
# Configs and the run


def _compose(*overrides):
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        return compose("config", overrides=list(overrides))


def test_configs_compose():
    cfg = _compose("dataset=voc")
    assert cfg.protocol.name == "diffseg" and cfg.segmenter.kl_threshold == [1.1, 1.1, 1.1]
    assert Protocol.from_config(cfg.protocol) == Protocol(name="diffseg")
    cfg = _compose("dataset=voc", "protocol=diffcut")
    p = Protocol.from_config(cfg.protocol)
    assert (p.resolution, p.score_resolution, p.crop) == (1024, 128, "min_minus_one")
    assert p.background["voc"] == "background"
    assert _compose("dataset=coco_object", "protocol=diffcut").dataset.split == "curated"
    assert _compose("dataset=coco_object").dataset.split == "full"
    assert cfg.segmenter.kl_threshold == [1.0, 1.0, 1.0]
    with pytest.raises(ValueError, match="unknown protocol keys"):
        Protocol.from_config({"name": "x", "score_res": 3})
    with pytest.raises(ValueError, match=r"protocol\.crop"):
        Protocol(crop="centre")


def test_diffcut_loads_pascal_context_with_background():
    cfg = _compose("protocol=diffcut", "dataset=pascal_context59")
    protocol = Protocol.from_config(cfg.protocol)
    assert cfg.dataset.background is True and cfg.dataset.keep_size is True
    check_dataset(protocol, OmegaConf.to_container(cfg.dataset))
    voc = _compose("protocol=diffcut", "dataset=voc").dataset
    assert "background" not in voc and voc.keep_size is True
    assert _compose("dataset=pascal_context59").dataset.background is False
    with pytest.raises(ValueError, match=r"dataset\.keep_size=true"):
        check_dataset(protocol, {**OmegaConf.to_container(voc), "keep_size": False})
    with pytest.raises(ValueError, match=r"dataset\.cache=false"):
        check_dataset(protocol, {**OmegaConf.to_container(voc), "cache": True})


def test_protocol_selects_the_jpeg_decoder():
    # The official pipeline decodes with TF, DiffCut with torchvision (Pillow's pixels); the
    # effective choice is cfg.dataset.jpeg_decoder, which the command line still overrides.
    assert _compose("dataset=voc").dataset.jpeg_decoder == "tf"
    assert _compose("dataset=voc", "protocol=diffcut").dataset.jpeg_decoder == "pil"
    cfg = _compose("dataset=coco_object", "protocol=diffcut", "dataset.jpeg_decoder=tf")
    assert cfg.dataset.jpeg_decoder == "tf"


def test_diffcut_run_end_to_end_on_tiny(tmp_path):
    run_dir, ledger = tmp_path / "run", tmp_path / "ledger.csv"
    # A protocol setting made in an experiment file (not on the command line) is recorded too:
    # the ledger holds the resolved protocol, not the overrides.
    (tmp_path / "conf" / "experiment").mkdir(parents=True)
    (tmp_path / "conf" / "experiment" / "compat_here.yaml").write_text(
        "# @package _global_\nprotocol:\n  compat: true\n"
    )
    args = [
        f"hydra.searchpath=[file://{tmp_path / 'conf'}]",
        "+experiment=compat_here",
        "protocol=diffcut",
        "dataset=synthetic",
        "model=tiny",
        "limit=2",
        "dataset.resolution=64",
        "protocol.resolution=64",
        "protocol.score_resolution=32",
        "+protocol.background.synthetic=sky",
        "segmenter.num_points=8",
        "num_workers=0",
        "n_qualitative=1",
        "logger=csv",
        f"hydra.run.dir={run_dir}",
        f"paths.ledger={ledger}",
    ]
    out = run_module("eval", tmp_path, *args)
    assert out.returncode == 0, out.stderr[-3000:]
    with open(ledger, newline="") as f:
        (row,) = list(csv.DictReader(f))
    assert (row["protocol"], json.loads(row["kl_threshold"]), row["resolution"]) == (
        "diffcut",
        [1.0, 1.0, 1.0],
        "64",
    )
    settings = json.loads(row["protocol_settings"])
    assert settings["compat"] is True and settings["background"]["synthetic"] == "sky"
    assert (settings["resolution"], settings["score_resolution"]) == (64, 32)
    assert row["deviations"].startswith("no published cell for protocol=diffcut[compat]")
    # Re-score the saved predictions against labels made here by the protocol's rules: synthetic
    # scene at 64 -> crop 63 -> nearest-exact to 64 -> nearest to 32.
    data = SyntheticScenes(length=2, resolution=64)
    records = [json.loads(line) for line in (run_dir / "per_image.jsonl").read_text().splitlines()]
    assert len(records) == 2
    for rec in records:
        pred = torch.from_numpy(np.array(Image.open(run_dir / rec["prediction"])).astype(np.int64))
        assert pred.shape == (32, 32)
        label = data[rec["index"]]["label"]
        label = torch.nn.functional.interpolate(
            crop_min_minus_one(label)[None, None].float(), size=(64, 64), mode="nearest-exact"
        )[0, 0].long()
        label = resize_label(label, 32, mode="nearest")
        tp, fp, fn, total = match_per_image(pred, label, data.n_class)
        assert (tp.tolist(), fp.tolist(), fn.tolist(), total) == (
            rec["tp"],
            rec["fp"],
            rec["fn"],
            rec["total"],
        )
