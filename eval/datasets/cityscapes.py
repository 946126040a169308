"""Cityscapes-27 (Cordts et al., CVPR 2016) as evaluated by DiffSeg, STEGO and PiCIE.

Layout: ``leftImg8bit/<split>/<city>/<stem>_leftImg8bit.png`` with
``gtFine/<split>/<city>/<stem>_gtFine_labelIds.png`` (8-bit grey ``labelIds``).  labelIds 7..33
(road ... bicycle) become classes 0..26; the void labelIds 0..6 and 255 (-1, license plate, as
a byte) are ignored, exactly the official ``get_fine_to_coarse`` in
``data/cityscapes/cityscapes_data.py`` (which defines 0..33 and -1 and fails on anything else).
Other values (34..254) are an error.  The val split has 500 images.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from eval.datasets.base import Sample, SegmentationFiles, label_lut, missing_root_error
from eval.datasets.classes import CITYSCAPES27_CLASSES
from eval.datasets.registry import register

FIRST_ID = 7
SPLIT_SIZES = {"train": 2975, "val": 500, "test": 1525}
LAYOUT = """  ROOT/leftImg8bit/val/<city>/<city>_<seq>_<frame>_leftImg8bit.png
  ROOT/gtFine/val/<city>/<city>_<seq>_<frame>_gtFine_labelIds.png   (8-bit grey labelIds)"""


def lut() -> np.ndarray:
    """labelId 7..33 -> 0..26; 0..6 and 255 -> ignore; 34..254 undefined."""
    mapping = {FIRST_ID + k: k for k in range(len(CITYSCAPES27_CLASSES))}
    return label_lut(mapping, ignore=[*range(FIRST_ID), 255])


def labels() -> tuple[np.ndarray, Sequence[str]]:
    return lut(), CITYSCAPES27_CLASSES


@register("cityscapes", labels=labels, split_sizes=SPLIT_SIZES)
def cityscapes(
    root: str | os.PathLike, split: str = "val", on_error: str = "raise", **kwargs
) -> SegmentationFiles:
    """Cityscapes with 27 classes; see the module docstring for the conventions."""
    root = Path(root)
    images = root / "leftImg8bit" / split
    if not images.is_dir():
        raise missing_root_error("cityscapes", root, LAYOUT)
    candidates = []
    for path in sorted(images.glob("*/*_leftImg8bit.png")):
        stem = path.name[: -len("_leftImg8bit.png")]
        label = root / "gtFine" / split / path.parent.name / f"{stem}_gtFine_labelIds.png"
        candidates.append(Sample(stem, path, label))
    return SegmentationFiles(
        "cityscapes",
        candidates,
        *labels(),
        on_error=on_error,
        expected_size=SPLIT_SIZES.get(split),
        **kwargs,
    )
