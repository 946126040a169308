"""PASCAL VOC 2012 segmentation (21 classes) and Pascal Context 59: id-list datasets under
``VOCdevkit``.

* ``voc``: ``VOCdevkit/VOC2012/JPEGImages/<id>.jpg``, ``SegmentationClass/<id>.png`` (palette
  PNGs whose palette indices are the class ids: 0 background, 1..20 objects, 255 the object
  boundaries, ignored), ids from ``ImageSets/Segmentation/<split>.txt`` (val: 1,449).
* ``pascal_context59`` (Mottaghi et al., CVPR 2014): ``VOCdevkit/VOC2010/JPEGImages/<id>.jpg``,
  ``SegmentationClassContext/<id>.png`` (8-bit maps, 0 background, 1..59 the 59 most frequent
  classes in alphabetical order, as written by mmseg's
  ``tools/dataset_converters/pascal_context.py``; see ``classes.PASCAL_CONTEXT59_CLASSES``),
  ids from ``ImageSets/SegmentationContext/<split>.txt`` (val: 5,105).  As mmseg's
  ``PascalContextDataset59`` with ``reduce_zero_label=True`` (the 59-class benchmark DiffCut and
  others report): 0 -> ignore, 1..59 -> 0..58, 255 -> ignore.  With ``background=True``, the
  60-class variant with background (DiffCut's Pascal Context): 0 -> 0 "background", 1..59 -> 1..59.

Other label values are an error.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from eval.datasets.base import Sample, SegmentationFiles, label_lut, missing_root_error
from eval.datasets.classes import PASCAL_CONTEXT59_CLASSES, VOC_CLASSES
from eval.datasets.registry import register
from eval.schema import FileDatasetSettings

VOC_SIZES = {"val": 1449, "train": 1464}
CONTEXT_SIZES = {"val": 5105, "train": 4996}
VOC_LAYOUT = """  ROOT/VOCdevkit/VOC2012/JPEGImages/<id>.jpg
  ROOT/VOCdevkit/VOC2012/SegmentationClass/<id>.png   (palette PNG, index = class id, 255)
  ROOT/VOCdevkit/VOC2012/ImageSets/Segmentation/val.txt"""
CONTEXT_LAYOUT = """  ROOT/VOCdevkit/VOC2010/JPEGImages/<id>.jpg
  ROOT/VOCdevkit/VOC2010/SegmentationClassContext/<id>.png   (8-bit, 0 background, 1..59)
  ROOT/VOCdevkit/VOC2010/ImageSets/SegmentationContext/val.txt"""


def voc_lut() -> np.ndarray:
    return label_lut({c: c for c in range(len(VOC_CLASSES))}, ignore=[255])


def voc_labels() -> tuple[np.ndarray, Sequence[str]]:
    return voc_lut(), VOC_CLASSES


@dataclass
class PascalContextSettings(FileDatasetSettings):
    """``background``: 60 classes, 0 = background (DiffCut's variant); false: 0 ignored."""

    background: bool = False


def context_lut(background: bool = False) -> np.ndarray:
    if background:
        return label_lut({v: v for v in range(60)}, ignore=[255])
    return label_lut({v: v - 1 for v in range(1, 60)}, ignore=[0, 255])


def context_labels(background: bool = False) -> tuple[np.ndarray, Sequence[str]]:
    """Pascal Context's lookup table and class names, 59 classes or 60 with ``background``."""
    classes = ["background", *PASCAL_CONTEXT59_CLASSES] if background else PASCAL_CONTEXT59_CLASSES
    return context_lut(background), classes


def _id_list_dataset(  # noqa: PLR0913 (the VOC-layout loaders' conf/dataset keys)
    name: str,
    base: Path,
    root: Path,
    labels: str,
    split_file: str,
    layout: str,
    lut: np.ndarray,
    classes: Sequence[str],
    sizes: Mapping[str, int],
    split: str,
    on_error: str,
    **kwargs,
) -> SegmentationFiles:
    ids_path = base / split_file.format(split=split)
    if not (base / "JPEGImages").is_dir():
        raise missing_root_error(name, root, layout)
    if not ids_path.is_file():
        raise FileNotFoundError(
            f"{name}: split list {ids_path} not found (split={split!r}). Expected layout:\n{layout}"
        )
    ids = [line.split()[0] for line in ids_path.read_text().splitlines() if line.strip()]
    candidates = [
        Sample(i, base / "JPEGImages" / f"{i}.jpg", base / labels / f"{i}.png") for i in ids
    ]
    return SegmentationFiles(
        name,
        candidates,
        lut,
        classes,
        on_error=on_error,
        expected_size=sizes.get(split),
        **kwargs,
    )


def _devkit(root: Path, year: str) -> Path:
    """Accept ROOT (holding VOCdevkit), ROOT = VOCdevkit, or ROOT = VOC<year>."""
    for base in (root / "VOCdevkit" / year, root / year, root):
        if (base / "JPEGImages").is_dir():
            return base
    return root / "VOCdevkit" / year


@register("voc", labels=voc_labels, split_sizes=VOC_SIZES)
def voc(
    root: str | os.PathLike, split: str = "val", on_error: str = "raise", **kwargs
) -> SegmentationFiles:
    """PASCAL VOC 2012, 21 classes; see the module docstring for the conventions."""
    root = Path(root)
    return _id_list_dataset(
        "voc",
        _devkit(root, "VOC2012"),
        root,
        "SegmentationClass",
        "ImageSets/Segmentation/{split}.txt",
        VOC_LAYOUT,
        *voc_labels(),
        VOC_SIZES,
        split,
        on_error,
        **kwargs,
    )


@register(
    "pascal_context59",
    PascalContextSettings,
    labels=context_labels,
    label_options=("background",),
    split_sizes=CONTEXT_SIZES,
)
def pascal_context59(
    root: str | os.PathLike,
    split: str = "val",
    on_error: str = "raise",
    background: bool = False,
    **kwargs,
) -> SegmentationFiles:
    """Pascal Context, 59 classes (60 with ``background``); see the module docstring."""
    root = Path(root)
    return _id_list_dataset(
        "pascal_context59",
        _devkit(root, "VOC2010"),
        root,
        "SegmentationClassContext",
        "ImageSets/SegmentationContext/{split}.txt",
        CONTEXT_LAYOUT,
        *context_labels(background),
        CONTEXT_SIZES,
        split,
        on_error,
        **kwargs,
    )
