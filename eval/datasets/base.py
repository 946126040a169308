"""Shared loading, preprocessing and error handling for the file-based benchmark datasets.

Preprocessing follows the official DiffSeg benchmark (github google/diffseg,
``data/coco/coco_data.py`` and ``data/cityscapes/cityscapes_data.py``, ``process_image``):
centre crop to a square of side ``c = min(h, w)`` at offsets ``((h - c) // 2, (w - c) // 2)``,
then ``tf.image.resize`` to ``resolution``: bilinear with half-pixel centres and no antialiasing
for the image (torch ``interpolate(mode="bilinear", align_corners=False, antialias=False)``), and
nearest neighbour with half-pixel centres for the label (TF2 picks source index
``floor((i + 0.5) * in / out)``, which is torch's ``nearest-exact``, not ``nearest``); the
steps are ``diffseg.preprocess``'s, which the pipeline uses too.  The official
code feeds the model ``x / 127.5 - 1``; items here carry the same image as ``x / 255`` in [0, 1].
JPEGs are decoded as ``jpeg_decoder`` says (:func:`decode_image`): ``tf`` (default) as the official
pipeline's ``tf.io.decode_jpeg`` (libjpeg-turbo's fast integer DCT, fancy upsampling), ``pil``
with Pillow (accurate integer DCT, the pixels of DiffCut's ``torchvision.io.read_image``); the two
differ by a few grey levels on many pixels. Both tested against the decoders' own pixels
(``tests/data/jpeg_decoded.npz``). Other formats (PNG) are decoded with Pillow.
"""

from __future__ import annotations

import io
import warnings
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import simplejpeg
import torch
from PIL import Image, UnidentifiedImageError
from torch.utils.data import Dataset, default_collate

from diffseg.preprocess import center_crop, channels_first, preprocess_image, resize_label

IGNORE = -1
# Marks label values that the dataset's convention does not define (an error, never a class).
_UNDEFINED = -2
ON_ERROR = ("raise", "skip")
JPEG_DECODERS = ("tf", "pil")
_JPEG_MAGIC = b"\xff\xd8\xff"


class SplitSizeWarning(UserWarning):
    """The number of images found differs from the published size of the split."""


class DataFileError(ValueError):
    """A data file is missing, unreadable or inconsistent with its pair."""


@dataclass(frozen=True)
class Sample:
    """One image/label file pair; ``id`` is stable across runs (the file stem)."""

    id: str
    image: Path
    label: Path


def label_lut(mapping: Mapping[int, int], ignore: Sequence[int] = ()) -> np.ndarray:
    """A 256-entry lookup table for 8-bit label PNGs: ``mapping`` values, ``IGNORE`` for the
    ``ignore`` ids; every other value is undefined, an error naming the file (:func:`map_label`)."""
    lut = np.full(256, _UNDEFINED, dtype=np.int64)
    for value in ignore:
        lut[value] = IGNORE
    for value, cls in mapping.items():
        lut[value] = cls
    return lut


def preprocess(
    image: np.ndarray,
    label: np.ndarray,
    resolution: int,
    antialias: bool = False,
    keep_size: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """uint8 ``(H, W, 3)`` image and int64 ``(H, W)`` label -> float ``(3, R, R)`` in [0, 1] and
    int64 ``(R, R)`` (or the original ``H, W`` with ``keep_size``), by ``diffseg.preprocess``."""
    lab = torch.from_numpy(label)
    if keep_size:
        return channels_first(image).float() / 255.0, lab
    return preprocess_image(image, resolution, antialias), resize_label(
        center_crop(lab), resolution
    )


def map_label(
    raw: np.ndarray, image: np.ndarray, lut: np.ndarray, name: str, image_src: str, label_src: str
) -> np.ndarray:
    """Raw label ids ``(H, W)`` -> class ids through ``lut``, checked against ``image (H, W, 3)``.

    Raises :class:`DataFileError` naming ``image_src`` / ``label_src`` for a size mismatch or
    values the ``name`` convention does not define.
    """
    if raw.shape != image.shape[:2]:
        raise DataFileError(
            f"{image_src} is {image.shape[1]}x{image.shape[0]} but {label_src} is "
            f"{raw.shape[1]}x{raw.shape[0]} (width x height); they must match"
        )
    label = lut[raw]
    if (label == _UNDEFINED).any():
        bad = np.unique(raw[label == _UNDEFINED]).tolist()
        raise DataFileError(
            f"{label_src} contains values {bad} that the {name} convention does not define (is "
            "this the right dataset or annotation version? a table source needs the original ids)"
        )
    return label


def check_jpeg_decoder(jpeg_decoder: str) -> None:
    if jpeg_decoder not in JPEG_DECODERS:
        raise ValueError(
            f"dataset.jpeg_decoder must be one of {JPEG_DECODERS} (tf: as TF's decode_jpeg, the "
            f"official DiffSeg pipeline; pil: Pillow, as DiffCut), got {jpeg_decoder!r}"
        )


def decode_image(data: bytes, jpeg_decoder: str, what: str) -> np.ndarray:
    """Encoded image ``data`` -> RGB uint8 ``(H, W, 3)``; :class:`DataFileError` naming ``what``.

    A JPEG with ``jpeg_decoder="tf"``: libjpeg-turbo with the fast integer DCT and fancy
    upsampling (``simplejpeg``), bit-identical to ``tf.io.decode_jpeg``'s defaults, which the
    official DiffSeg data pipeline uses. Otherwise Pillow (for JPEG: the accurate integer DCT).
    16-bit grey images keep their high byte, as Pillow decodes 16-bit colour PNGs (Pillow's own
    conversion would clip them at 255, nearly white); 32-bit integer or float images, whose range
    is unknown, are refused.
    """
    try:
        if jpeg_decoder == "tf" and data[:3] == _JPEG_MAGIC:
            return simplejpeg.decode_jpeg(data, colorspace="RGB", fastdct=True, fastupsample=False)
        with Image.open(io.BytesIO(data)) as im:
            if im.mode.startswith("I;16"):
                grey = (np.asarray(im).astype(np.uint16) >> 8).astype(np.uint8)
                return np.repeat(grey[..., None], 3, axis=-1)
            if im.mode in ("I", "F"):
                raise DataFileError(
                    f"{what} has PIL mode {im.mode!r} (32-bit integer or float pixels of "
                    "unknown range); save it as an 8- or 16-bit image"
                )
            return np.array(im.convert("RGB"))
    except UnidentifiedImageError as e:  # its message names an in-memory buffer, not the file
        raise DataFileError(f"cannot read {what}: not an image format Pillow knows") from e
    except (OSError, ValueError, Image.DecompressionBombError) as e:
        if isinstance(e, DataFileError):
            raise
        raise DataFileError(f"cannot read {what}: {e}") from e


def read_image(path: Path, jpeg_decoder: str = "tf") -> np.ndarray:
    """RGB uint8 ``(H, W, 3)`` decoded by :func:`decode_image`; raises :class:`DataFileError`
    naming the file when unreadable."""
    try:
        data = Path(path).read_bytes()
    except OSError as e:
        raise DataFileError(f"cannot read image {path}: {e}") from e
    return decode_image(data, jpeg_decoder, f"image {path}")


def read_label(path: Path) -> np.ndarray:
    """Raw label values ``(H, W)`` of a single-channel (grey or palette) PNG.

    For palette ("P") PNGs such as VOC's the raw values are the palette indices, which are the
    class ids; converting to RGB would lose them.
    """
    try:
        with Image.open(path) as im:
            if im.mode not in ("L", "P"):
                raise DataFileError(
                    f"label {path} has PIL mode {im.mode!r}; expected an 8-bit grey ('L') or "
                    "palette ('P') PNG with class ids as pixel values (was it converted to colour?)"
                )
            return np.array(im)
    except (OSError, ValueError, Image.DecompressionBombError) as e:
        if isinstance(e, DataFileError):
            raise
        raise DataFileError(f"cannot read label {path}: {e}") from e


def missing_root_error(name: str, root: Path, layout: str) -> FileNotFoundError:
    """The error for an absent dataset: what should be there and the command that puts it there."""
    return FileNotFoundError(
        f"{name}: dataset not found at {root}. Expected layout:\n{layout}\n"
        f"Get it with: python -m eval.tools.prepare dataset={name} dataset.root={root}"
    )


class SegmentationFiles(Dataset):
    """Image/label file pairs with a per-dataset label mapping.

    ``candidates`` are indexed with :func:`index_pairs`: pairs with a missing file raise, or are
    dropped and counted in ``skipped`` with ``on_error="skip"``.

    Items: ``{"image": float (3, R, R) in [0, 1], "label": int64 (R, R) with 0..C-1 and -1
    ignored, "id": str}``.  With ``on_error="skip"`` a bad pair yields ``None`` and a warning
    instead of an exception (use :func:`collate` to drop it and count it); pairs already known to
    be broken when the index is built are dropped with a warning and counted in ``skipped``.
    """

    def __init__(  # noqa: PLR0913 (the loaders pass their conf/dataset keys through)
        self,
        name: str,
        candidates: Iterable[Sample],
        lut: np.ndarray,
        class_names: Sequence[str],
        resolution: int = 512,
        antialias: bool = False,
        keep_size: bool = False,
        on_error: str = "raise",
        expected_size: int | None = None,
        jpeg_decoder: str = "tf",
    ) -> None:
        check_jpeg_decoder(jpeg_decoder)
        samples, skipped_ids = index_pairs(name, candidates, on_error)
        if not keep_size and (not isinstance(resolution, int) or resolution < 1):
            raise ValueError(f"resolution must be a positive int, got {resolution!r}")
        self.name = name
        self.samples = list(samples)
        self.lut = lut
        self.class_names = list(class_names)
        self.n_class = len(self.class_names)
        self.resolution = resolution
        self.antialias = antialias
        self.keep_size = keep_size
        self.jpeg_decoder = jpeg_decoder
        self.on_error = on_error
        # Pairs dropped while indexing (named in the run's summary, results and ledger); later
        # failures of a pair only count, in `skipped`, since a worker cannot report back.
        self.skipped_ids = skipped_ids
        self.skipped = len(skipped_ids)
        self.split_size = expected_size
        if expected_size is not None and len(self.samples) + self.skipped != expected_size:
            warnings.warn(
                f"{name}: found {len(self.samples) + self.skipped} images, the published split has "
                f"{expected_size}; results will not be comparable with published numbers",
                SplitSizeWarning,
                stacklevel=3,
            )

    def __len__(self) -> int:
        return len(self.samples)

    def item_id(self, index: int) -> str:
        """The id of item ``index``, without reading its files."""
        return self.samples[index].id

    def read_pair(self, index: int) -> tuple[np.ndarray, np.ndarray, str, str, str]:
        """Decoded image ``(H, W, 3)`` uint8, raw label ids ``(H, W)``, the names errors give
        them, and the item's id. Subclasses that read pairs elsewhere override this alone."""
        s = self.samples[index]
        image, raw = read_image(s.image, self.jpeg_decoder), read_label(s.label)
        return image, raw, f"image {s.image}", f"label {s.label}", s.id

    def load(self, index: int) -> dict:
        """The item, raising :class:`DataFileError` for a bad pair whatever ``on_error`` says."""
        image, raw, image_name, label_name, item_id = self.read_pair(index)
        label = map_label(raw, image, self.lut, self.name, image_name, label_name)
        img, lab = preprocess(image, label, self.resolution, self.antialias, self.keep_size)
        return {"image": img, "label": lab, "id": item_id}

    def __getitem__(self, index: int) -> dict | None:
        if self.on_error == "raise":
            return self.load(index)
        try:
            return self.load(index)
        except DataFileError as e:
            self.skipped += 1
            warnings.warn(f"skipped: {e}", stacklevel=2)
            return None


def check_on_error(on_error: str) -> None:
    if on_error not in ON_ERROR:
        raise ValueError(f"on_error must be one of {ON_ERROR}, got {on_error!r}")


def index_pairs(
    name: str, candidates: Iterable[Sample], on_error: str
) -> tuple[list[Sample], list[str]]:
    """Keep the pairs whose two files exist; the others are one error naming them all, or (with
    ``on_error="skip"``) a warning each; returns the kept pairs and the ids of the others."""
    check_on_error(on_error)
    samples, problems, ids = [], [], []
    for s in candidates:
        missing = [str(p) for p in (s.image, s.label) if not p.is_file()]
        if missing:
            problems.append(f"{s.id}: missing {' and '.join(missing)}")
            ids.append(s.id)
        else:
            samples.append(s)
    if not problems:
        return samples, []
    if on_error == "raise":
        shown = "\n  ".join(problems[:10])
        more = f"\n  ... and {len(problems) - 10} more" if len(problems) > 10 else ""
        raise DataFileError(
            f"{name}: {len(problems)} broken image/label pairs:\n  {shown}{more}\n"
            "Fix the files or pass dataset.on_error=skip to leave them out (counted in the summary)"
        )
    for p in problems:
        warnings.warn(f"{name}: skipped {p}", stacklevel=3)
    return samples, ids


def collate(batch: Sequence[dict | None]) -> dict:
    """``default_collate`` that drops the ``None`` items of ``on_error="skip"`` and reports how
    many it dropped as ``n_skipped`` (worker processes cannot update the dataset's counter).
    With ``keep_size`` images differ in size, so use ``batch_size=1`` there."""
    items = [b for b in batch if b is not None]
    n_skipped = len(batch) - len(items)
    if not items:
        return {"image": None, "label": None, "id": [], "n_skipped": n_skipped}
    out = default_collate(items)
    out["n_skipped"] = n_skipped
    return out
