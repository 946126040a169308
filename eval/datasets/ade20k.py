"""ADE20K SceneParsing, 150 classes (Zhou et al., CVPR 2017; ``ADEChallengeData2016.zip``).

Layout: ``ADEChallengeData2016/images/validation/ADE_val_*.jpg`` with
``ADEChallengeData2016/annotations/validation/ADE_val_*.png`` (8-bit grey).  0 ("other") is
ignored and 1..150 become 0..149, as mmseg's ``reduce_zero_label`` and the challenge's scoring;
values above 150 are an error.  The validation split has 2,000 images.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from eval.datasets.base import Sample, SegmentationFiles, label_lut, missing_root_error
from eval.datasets.classes import ADE20K_CLASSES
from eval.datasets.registry import register

FOLDERS = {"val": "validation", "validation": "validation", "train": "training"}
# Published images per split (the config says val; the folders say validation).
SPLIT_SIZES = {"val": 2000, "validation": 2000, "train": 20210}
LAYOUT = """  ROOT/ADEChallengeData2016/images/validation/<id>.jpg
  ROOT/ADEChallengeData2016/annotations/validation/<id>.png   (8-bit grey, 0 other, 1..150)"""


def lut() -> np.ndarray:
    return label_lut({v: v - 1 for v in range(1, len(ADE20K_CLASSES) + 1)}, ignore=[0])


def labels() -> tuple[np.ndarray, Sequence[str]]:
    return lut(), ADE20K_CLASSES


@register("ade20k", labels=labels, split_sizes=SPLIT_SIZES)
def ade20k(
    root: str | os.PathLike, split: str = "val", on_error: str = "raise", **kwargs
) -> SegmentationFiles:
    """ADE20K-150; ``root`` may be the folder holding ``ADEChallengeData2016`` or that folder."""
    if split not in FOLDERS:
        raise ValueError(f"ade20k: split must be one of {sorted(FOLDERS)}, got {split!r}")
    root = Path(root)
    base = root / "ADEChallengeData2016" if (root / "ADEChallengeData2016").is_dir() else root
    folder = FOLDERS[split]
    images = base / "images" / folder
    if not images.is_dir():
        raise missing_root_error("ade20k", root, LAYOUT)
    candidates = [
        Sample(p.stem, p, base / "annotations" / folder / f"{p.stem}.png")
        for p in sorted(images.glob("*.jpg"))
    ]
    return SegmentationFiles(
        "ade20k",
        candidates,
        *labels(),
        on_error=on_error,
        expected_size=SPLIT_SIZES[split],
        **kwargs,
    )
