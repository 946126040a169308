"""Pictures: palette label PNGs, legend entries, boundaries, matched-class colours, IoU labels."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from eval.results.visualize import (
    IGNORE_COLOR,
    PALETTE,
    UNMATCHED_COLOR,
    boundaries,
    categorical_palette,
    color_prediction,
    iou_text,
    legend_entries,
    save_comparison,
    save_label_png,
)
from eval.scoring.matching import matched_classes


def test_label_png_is_a_palette_png_holding_the_ids(tmp_path: Path) -> None:
    small = torch.arange(12).reshape(3, 4) * 20
    assert save_label_png(small, tmp_path / "a.png") == "8-bit palette"
    im = Image.open(tmp_path / "a.png")
    assert im.mode == "P" and np.array_equal(np.asarray(im), small.numpy())
    # A viewer shows the palette colours: id 20 is not the near-black grey level 20.
    assert im.convert("RGB").getpixel((1, 0)) == tuple(int(v) for v in PALETTE[20])
    big = small * 30  # ids above 255: 16-bit grey, values unchanged
    assert save_label_png(big, tmp_path / "b.png") == "16-bit grey"
    im = Image.open(tmp_path / "b.png")
    assert im.mode == "I;16" and np.array_equal(np.asarray(im).astype(np.int64), big.numpy())
    with pytest.raises(ValueError, match="labels"):
        save_label_png(-small, tmp_path / "c.png")


def test_palette_colours_are_distinct_and_never_the_reserved_ones() -> None:
    colours = {tuple(c) for c in categorical_palette(256)}
    assert len(colours) == 256
    assert IGNORE_COLOR not in colours and UNMATCHED_COLOR not in colours
    assert not any(r == g == b for r, g, b in colours)  # no grey to mistake for "unmatched"


def test_legend_lists_the_classes_present_in_class_order() -> None:
    names = ["sky", "grass", "water", "sand"]
    label = np.array([[3, 3, 1], [-1, 1, 3]])
    entries = legend_entries(label, names)
    assert [name for name, _ in entries] == ["grass", "sand", "ignored"]
    assert entries[0][1] == tuple(int(v) for v in PALETTE[1]) and entries[2][1] == IGNORE_COLOR
    assert [n for n, _ in legend_entries(np.zeros((2, 2), int), names, unmatched=True)] == [
        "sky",
        "unmatched segment",
    ]


def test_boundaries_on_a_hand_made_label_map() -> None:
    labels = np.zeros((6, 7), dtype=np.int64)
    labels[:, 4:] = 1  # a vertical boundary between columns 3 and 4
    thin = np.zeros((6, 7), dtype=bool)
    thin[1:5, 3:5] = True  # both sides, the one-pixel frame excluded (official find_edges)
    assert np.array_equal(boundaries(labels), thin)
    wide = np.zeros((6, 7), dtype=bool)
    wide[0:6, 2:6] = True  # dilated by one pixel each way
    assert np.array_equal(boundaries(labels, 3), wide)
    assert not boundaries(np.zeros((5, 5), dtype=np.int64), 3).any()


def test_prediction_takes_its_matched_class_colour() -> None:
    label = np.array([[0, 0, 1, 1], [0, 0, 1, 1], [2, 2, -1, -1]])
    # Segment 5 covers class 1, segment 2 class 0 and class 2, segment 7 only ignored pixels.
    pred = np.array([[2, 2, 5, 5], [2, 2, 5, 5], [2, 2, 7, 7]])
    seg_class = matched_classes(pred, label, 3)
    assert seg_class[2] == 0 and seg_class[5] == 1
    assert seg_class[7] == -1  # whatever the assignment pairs it with, it has no pixel of it
    colours = color_prediction(pred, seg_class)
    assert tuple(colours[0, 0]) == tuple(PALETTE[0]) and tuple(colours[0, 3]) == tuple(PALETTE[1])
    assert tuple(colours[2, 3]) == UNMATCHED_COLOR


def test_iou_bar_labels_tell_zero_from_not_scored() -> None:
    assert iou_text(0.0) == "0"
    assert iou_text(float("nan")) == "n/a"
    assert iou_text(45.34) == "45.3" and iou_text(0.04) == "0.0"


def test_comparison_picture_is_written(tmp_path: Path) -> None:
    label = torch.tensor([[0, 0, 1, 1]] * 4)
    pred = torch.tensor([[0, 1, 1, 1]] * 4)
    save_comparison(torch.rand(3, 4, 4), label, pred, tmp_path / "c.png", ["a", "b"], "t")
    im = Image.open(tmp_path / "c.png")
    assert im.size[0] > 2 * im.size[1]  # three panels side by side
