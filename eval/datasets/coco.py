"""COCO-Stuff-27 and COCO-Object-81 on COCO val2017 with the COCO-Stuff ``stuffthingmaps``.

Label PNGs (``stuffthingmaps_trainval2017.zip``) are 8-bit grey maps of fine ids 0..181 (COCO-Stuff
id minus one: 0 person ... 90 hair brush are things, 91 banner ... 181 wood are stuff) and 255 for
unlabeled pixels.

* ``coco_stuff27``: fine -> 27 coarse classes (``classes.coco_fine_to_coarse``; PiCIE/STEGO order,
  the table the official DiffSeg notebook uses); 255 -> ignore.  Split ``curated`` (alias ``val``)
  is the 2,175-image list ``Coco164kFull_Stuff_Coarse_7.txt`` that PiCIE, STEGO and DiffSeg
  evaluate on; ``full`` is all 5,000 val2017 images.
* ``coco_object``: the 80 annotated thing classes -> 1..80 in COCO id order, every stuff id -> 0
  (background), 255 -> ignore: 81 classes, the COCO-Object convention of the follow-up
  literature (e.g. DiffCut, NeurIPS 2024, which evaluates DiffSeg on it) built here from the same
  stuffthingmaps.  Default split ``full``.

Both: the 11 thing ids COCO defines but never annotates (street sign, hat, shoe, eye glasses, plate,
mirror, window, desk, door, blender, hair brush) never occur in the maps; they map to ignore rather
than to a class.  Any other value (182..254) is an error.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from eval.datasets.base import (
    Sample,
    SegmentationFiles,
    label_lut,
    missing_root_error,
)
from eval.datasets.classes import (
    COCO_FIRST_STUFF,
    COCO_OBJECT_CLASSES,
    COCO_STUFF27_CLASSES,
    COCO_STUFF_FINE,
    coco_fine_to_coarse,
)
from eval.datasets.registry import register

CURATED_LIST = "Coco164kFull_Stuff_Coarse_7.txt"
SPLIT_SIZES = {"curated": 2175, "full": 5000}
LAYOUT = f"""  ROOT/images/val2017/<id>.jpg
  ROOT/annotations/val2017/<id>.png      (stuffthingmaps: 8-bit grey, fine ids 0..181, 255)
  ROOT/curated/val2017/{CURATED_LIST}   (2,175 ids; for split=curated)
  or the official notebook layout: ROOT/val2017/, ROOT/annotation_val2017/, ROOT/{CURATED_LIST}"""

UNUSED_IDS = [i for i, (_, sup) in enumerate(COCO_STUFF_FINE) if sup is None]


def stuff27_lut() -> np.ndarray:
    """Fine id -> coarse class; 255 and unused thing ids -> ignore; 182..254 undefined."""
    return label_lut(coco_fine_to_coarse(), ignore=[255, *UNUSED_IDS])


def stuff27_labels() -> tuple[np.ndarray, Sequence[str]]:
    return stuff27_lut(), COCO_STUFF27_CLASSES


def object81_lut() -> np.ndarray:
    """Annotated thing id -> 1..80 in COCO order, stuff -> 0, 255 and unused ids -> ignore."""
    things = [i for i in range(COCO_FIRST_STUFF) if COCO_STUFF_FINE[i][1] is not None]
    mapping = {fine: k + 1 for k, fine in enumerate(things)}
    mapping.update({fine: 0 for fine in range(COCO_FIRST_STUFF, len(COCO_STUFF_FINE))})
    return label_lut(mapping, ignore=[255, *UNUSED_IDS])


def object81_labels() -> tuple[np.ndarray, Sequence[str]]:
    return object81_lut(), COCO_OBJECT_CLASSES


def _folders(root: Path, name: str) -> tuple[Path, Path, list[Path]]:
    """(image dir, label dir, candidate curated-list paths) of the layout found under ``root``."""
    if (root / "images" / "val2017").is_dir():
        return (
            root / "images" / "val2017",
            root / "annotations" / "val2017",
            [root / "curated" / "val2017" / CURATED_LIST, root / CURATED_LIST],
        )
    if (root / "val2017").is_dir():
        return (
            root / "val2017",
            root / "annotation_val2017",
            [root / CURATED_LIST, root / "curated" / "val2017" / CURATED_LIST],
        )
    raise missing_root_error(name, root, LAYOUT)


def _samples(name: str, root: Path, split: str) -> list[Sample]:
    images, labels, lists = _folders(root, name)
    if split == "full":
        ids = sorted(p.stem for p in images.glob("*.jpg"))
    else:
        path = next((p for p in lists if p.is_file()), None)
        if path is None:
            raise FileNotFoundError(
                f"{name}: split=curated needs {lists[0]} (the 2,175-image list). Get it with: "
                f"python -m eval.tools.prepare dataset={name} dataset.root={root}  (or use split=full)"
            )
        ids = [line.strip() for line in path.read_text().splitlines() if line.strip()]
    return [Sample(i, images / f"{i}.jpg", labels / f"{i}.png") for i in ids]


def _build(
    name: str,
    labels: tuple[np.ndarray, Sequence[str]],
    root: str | os.PathLike,
    split: str,
    on_error: str,
    **kwargs,
) -> SegmentationFiles:
    split = {"val": "curated"}.get(split, split)
    if split not in SPLIT_SIZES:
        raise ValueError(f"{name}: split must be 'curated' (or 'val') or 'full', got {split!r}")
    return SegmentationFiles(
        name,
        _samples(name, Path(root), split),
        *labels,
        on_error=on_error,
        expected_size=SPLIT_SIZES[split],
        **kwargs,
    )


@register("coco_stuff27", labels=stuff27_labels, split_sizes=SPLIT_SIZES)
def coco_stuff27(
    root: str | os.PathLike, split: str = "curated", on_error: str = "raise", **kwargs
) -> SegmentationFiles:
    """COCO-Stuff-27 (27 coarse classes); see the module docstring for the conventions."""
    return _build("coco_stuff27", stuff27_labels(), root, split, on_error, **kwargs)


@register("coco_object", labels=object81_labels, split_sizes=SPLIT_SIZES)
def coco_object(
    root: str | os.PathLike, split: str = "full", on_error: str = "raise", **kwargs
) -> SegmentationFiles:
    """COCO-Object (80 things + background); see the module docstring for the conventions."""
    return _build("coco_object", object81_labels(), root, split, on_error, **kwargs)
