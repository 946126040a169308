"""Tiny datasets generated in each benchmark's exact on-disk format (real folder and file names,
8-bit grey label PNGs, palette PNG for VOC, JPEG where the real images are JPEG, real split
lists), with known content for pixel-by-pixel checks."""

from __future__ import annotations

import io
import tarfile
import zipfile
from pathlib import Path

import numpy as np
from PIL import Image

# A VOC-style palette: index i -> some colour; only the indices matter to the loader.
_PALETTE = [v for i in range(256) for v in ((i * 37) % 256, (i * 91) % 256, (i * 53) % 256)]


def rgb(h: int, w: int, seed: int) -> np.ndarray:
    """A smooth uint8 ``(h, w, 3)`` picture (smooth so JPEG keeps it close)."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:h, 0:w]
    a, b, c = rng.uniform(0.05, 0.3, 3)
    img = np.stack([x * a * 10, y * b * 10, (x + y) * c * 5], -1) % 256
    return img.astype(np.uint8)


def save_image(path: Path, array: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix == ".jpg":
        Image.fromarray(array).save(path, quality=95)
    else:
        Image.fromarray(array).save(path)


def save_grey(path: Path, label: np.ndarray) -> None:
    """8-bit grey ("L") PNG, as stuffthingmaps, Cityscapes labelIds, ADE and Context maps."""
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(label.astype(np.uint8), mode="L").save(path)


def save_palette(path: Path, label: np.ndarray) -> None:
    """Palette ("P") PNG whose indices are the class ids, as VOC's SegmentationClass."""
    path.parent.mkdir(parents=True, exist_ok=True)
    im = Image.fromarray(label.astype(np.uint8), mode="P")
    im.putpalette(_PALETTE)
    im.save(path)


def grid_label(values, h: int, w: int) -> np.ndarray:
    """``(h, w)`` uint8 holding ``values`` in raster order, repeated to fill."""
    v = np.asarray(values, dtype=np.uint8)
    return np.resize(v, h * w).reshape(h, w)


def make_coco(root: Path, labels: dict[str, np.ndarray], layout: str = "stego", curated=None):
    """COCO-Stuff val2017: ``labels`` maps 12-digit ids to stuffthingmaps arrays.

    ``layout="stego"``: images/val2017, annotations/val2017, curated/val2017/<list>;
    ``layout="notebook"``: val2017, annotation_val2017, <list> at the root."""
    images, anns, lst = {
        "stego": ("images/val2017", "annotations/val2017", "curated/val2017"),
        "notebook": ("val2017", "annotation_val2017", "."),
    }[layout]
    for k, (i, lab) in enumerate(labels.items()):
        save_image(root / images / f"{i}.jpg", rgb(*lab.shape, seed=k))
        save_grey(root / anns / f"{i}.png", lab)
    ids = sorted(labels) if curated is None else curated
    (root / lst).mkdir(parents=True, exist_ok=True)
    (root / lst / "Coco164kFull_Stuff_Coarse_7.txt").write_text("".join(f"{i}\n" for i in ids))


def make_cityscapes(root: Path, labels: dict[tuple[str, str], np.ndarray]) -> dict:
    """``labels``: (city, "<city>_<seq>_<frame>") -> labelIds array; returns stem -> image."""
    out = {}
    for k, ((city, stem), lab) in enumerate(labels.items()):
        img = rgb(*lab.shape, seed=k)
        save_image(root / "leftImg8bit" / "val" / city / f"{stem}_leftImg8bit.png", img)
        save_grey(root / "gtFine" / "val" / city / f"{stem}_gtFine_labelIds.png", lab)
        out[stem] = img
    return out


def make_ade(root: Path, labels: dict[str, np.ndarray]) -> None:
    base = root / "ADEChallengeData2016"
    for k, (i, lab) in enumerate(labels.items()):
        save_image(base / "images" / "validation" / f"{i}.jpg", rgb(*lab.shape, seed=k))
        save_grey(base / "annotations" / "validation" / f"{i}.png", lab)


def make_voc(root: Path, labels: dict[str, np.ndarray], year: str = "VOC2012") -> None:
    """VOC2012 segmentation (palette PNGs) or, with ``year="VOC2010"``, Pascal Context 59
    (8-bit grey SegmentationClassContext and ImageSets/SegmentationContext)."""
    base = root / "VOCdevkit" / year
    context = year == "VOC2010"
    for k, (i, lab) in enumerate(labels.items()):
        save_image(base / "JPEGImages" / f"{i}.jpg", rgb(*lab.shape, seed=k))
        if context:
            save_grey(base / "SegmentationClassContext" / f"{i}.png", lab)
        else:
            save_palette(base / "SegmentationClass" / f"{i}.png", lab)
    sets = base / "ImageSets" / ("SegmentationContext" if context else "Segmentation")
    sets.mkdir(parents=True, exist_ok=True)
    (sets / "val.txt").write_text("".join(f"{i}\n" for i in labels))


# Pascal Context: the original (459-class, Detail API / labels.txt) ids of the 59 classes that
# mmseg's tools/dataset_converters/pascal_context.py keeps, in that script's listing order, with
# their names in the original label list. Independent of eval/datasets/classes.py on purpose.
CONTEXT_ORIGINAL_IDS = {
    2: "aeroplane", 259: "mountain", 260: "mouse", 415: "track", 324: "road", 9: "bag",
    258: "motorbike", 144: "fence", 18: "bed", 19: "bedclothes", 22: "bench", 23: "bicycle",
    397: "table", 25: "bird", 284: "person", 158: "floor", 159: "flower", 416: "train", 33: "book",
    162: "food", 420: "tree", 454: "window", 295: "plate", 296: "platform", 427: "tvmonitor",
    44: "building", 45: "bus", 46: "cabinet", 308: "pottedplant", 59: "car", 440: "wall",
    445: "water", 31: "boat", 232: "light", 65: "cat", 354: "sidewalk", 424: "truck",
    68: "ceiling", 326: "rock", 72: "chair", 458: "wood", 34: "bottle", 207: "horse", 80: "cloth",
    355: "sign", 85: "computer", 347: "sheep", 220: "keyboard", 349: "shelves", 360: "sky",
    98: "cow", 187: "grass", 104: "cup", 105: "curtain", 366: "snow", 189: "ground", 368: "sofa",
    113: "dog", 115: "door",
}  # fmt: skip


def context_converter(original: np.ndarray) -> np.ndarray:
    """Original-id mask (as ``Detail.getMask``: 0 background, else a kept id) -> the uint8 label
    values the converter writes: the position of the id among the sorted kept ids and 0."""
    kept = np.sort(np.array([0, *CONTEXT_ORIGINAL_IDS]))
    assert np.isin(original, kept).all(), "the converter asserts every id is kept"
    return np.digitize(original.ravel(), kept, right=True).astype(np.uint8).reshape(original.shape)


def zip_folder(folder: Path, prefix: str = "") -> bytes:
    """A zip of every file under ``folder``, member names relative to it (plus ``prefix``)."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        for p in sorted(folder.rglob("*")):
            if p.is_file():
                z.write(p, prefix + p.relative_to(folder).as_posix())
    return buf.getvalue()


def tar_folder(folder: Path) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as t:
        for p in sorted(folder.rglob("*")):
            if p.is_file():
                t.add(p, p.relative_to(folder).as_posix())
    return buf.getvalue()
