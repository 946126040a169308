"""Benchmark datasets read from Parquet or a hub dataset instead of the original files.

``dataset.source=parquet:PATH_OR_GLOB`` reads local Parquet files with
``datasets.load_dataset("parquet", data_files=...)``; ``dataset.source=hf:REPO_ID`` reads a hub
dataset with ``datasets.load_dataset(REPO_ID)`` (needs a network the first time; ``datasets``
caches it).  ``dataset.columns`` maps the table's columns to ``image``, ``label`` and ``id``
(defaults: the same names; without an id column the row number is the id).

The label column must hold the values of the dataset's *original* label files (stuffthingmaps fine
ids 0..181 and 255 for COCO, ``labelIds`` for Cityscapes, 0..150 for ADE20K, palette indices for
VOC...): the dataset's own mapping is applied to it, exactly as for the files, then the same crop
and resize.  Labels stored as an image (a ``datasets.Image`` column, PNG bytes) must be 8-bit grey
or palette PNGs; a colour-coded RGB mask is refused, as for the files.  A copy whose labels were
already remapped (e.g. COCO-Stuff-27 coarse ids) does not follow the convention and is rejected
by the mapping or, worse, silently mislabelled: check a copy before trusting it.
"""

from __future__ import annotations

import glob
import io
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from PIL import Image

from eval.datasets import registry
from eval.datasets.base import DataFileError, SegmentationFiles, decode_image

if TYPE_CHECKING:
    import datasets

KINDS = ("parquet", "hf")
DEFAULT_COLUMNS = {"image": "image", "label": "label", "id": "id"}
# Split names of the loaders -> the names hub copies usually use.
SPLIT_ALIASES = {"val": ("validation", "val"), "curated": ("validation", "val")}


def parse_source(source: str) -> tuple[str, str]:
    """``"parquet:PATH_OR_GLOB"`` or ``"hf:REPO_ID"`` -> ``(kind, target)``."""
    kind, sep, target = str(source).partition(":")
    if not sep or kind not in KINDS or not target:
        raise ValueError(
            f"dataset.source must be 'parquet:PATH_OR_GLOB' or 'hf:REPO_ID', got {source!r}"
        )
    return kind, target


def parquet_files(pattern: str) -> list[Path]:
    """The Parquet files ``pattern`` names (a file, a folder of ``*.parquet`` or a glob)."""
    path = Path(pattern).expanduser()
    if path.is_dir():
        files = sorted(path.rglob("*.parquet"))
    else:
        files = sorted(Path(p) for p in glob.glob(str(path), recursive=True))
    if not files:
        raise FileNotFoundError(
            f"dataset.source=parquet:{pattern} matches no file; give a Parquet file, a folder of "
            "*.parquet files or a glob such as data/coco/*.parquet"
        )
    return files


def load_table(source: str, split: str | None, cache_dir: Path | None = None) -> datasets.Dataset:
    """The ``datasets.Dataset`` behind ``source`` (for ``hf:``, its ``split``)."""
    import datasets

    kind, target = parse_source(source)
    cache = None if cache_dir is None else str(cache_dir)
    if kind == "parquet":
        files = [str(p) for p in parquet_files(target)]
        return datasets.load_dataset("parquet", data_files=files, split="train", cache_dir=cache)
    tables = datasets.load_dataset(target, cache_dir=cache)
    for name in (split, *SPLIT_ALIASES.get(split, ())):
        if name in tables:
            return tables[name]
    raise ValueError(
        f"dataset.source=hf:{target} has splits {sorted(tables)}, none matching split={split!r}; "
        "set dataset.split to one of them"
    )


def _cell_value(value: Any, what: str, label: bool, jpeg_decoder: str) -> Any:
    """A table cell's content: a decoded image array, a PIL image, or the raw value."""
    if isinstance(value, dict) and value.get("bytes") is None and value.get("path"):
        value = Path(value["path"]).read_bytes()  # an undecoded cell that names its file
    elif isinstance(value, dict):
        value = value.get("bytes")
    if isinstance(value, bytes) and not label:
        return decode_image(value, jpeg_decoder, what)
    if isinstance(value, bytes):
        try:
            value = Image.open(io.BytesIO(value))
            value.load()
        except (OSError, ValueError) as e:
            raise DataFileError(f"cannot decode {what}: {e}") from e
    return value


def _array(value: Any, what: str, label: bool, jpeg_decoder: str = "tf") -> np.ndarray:
    """A table cell (PIL image, ``{"bytes": ...}`` dict, raw bytes or nested list) as an array:
    RGB uint8 ``(H, W, 3)`` for images (encoded bytes decoded by ``base.decode_image`` with
    ``jpeg_decoder``), raw ids ``(H, W)`` for labels."""
    value = _cell_value(value, what, label, jpeg_decoder)
    if isinstance(value, Image.Image):
        if not label:
            return np.array(value.convert("RGB"))
        if value.mode not in ("L", "P"):
            raise DataFileError(
                f"{what} has PIL mode {value.mode!r}; expected an 8-bit grey ('L') or palette ('P') "
                "image holding the original label ids (is it a colour-coded mask?)"
            )
        return np.array(value)
    array = np.asarray(value)
    if label and (array.ndim != 2 or array.min(initial=0) < 0 or array.max(initial=0) > 255):
        raise DataFileError(f"{what} must be a 2-D map of 8-bit label ids, got {array.shape}")
    if not label and (array.ndim != 3 or array.shape[-1] != 3):
        raise DataFileError(f"{what} must be an RGB image (H, W, 3), got {array.shape}")
    return array.astype(np.uint8 if not label else np.int64)


class TableSegmentation(SegmentationFiles):
    """A :class:`SegmentationFiles` whose pairs are rows of a ``datasets`` table.

    Items, errors and ``on_error`` behave as for the files; error messages name the source and row.
    The labels are mapped with the registered label map of dataset ``name``
    (``eval.datasets.registry``, ``labels(**label_options)``), as the loader of the files does.
    """

    def __init__(
        self,
        name: str,
        table: datasets.Dataset,
        source: str,
        columns: Mapping[str, str],
        label_options: Mapping[str, Any] | None = None,
        **kwargs,
    ):
        lut, classes = registry.get(name).labels(**(label_options or {}))
        missing = [c for k, c in columns.items() if k != "id" and c not in table.column_names]
        if missing:
            raise ValueError(
                f"{name}: dataset.source={source} has columns {table.column_names}, not {missing}; "
                "map them with dataset.columns={image: ..., label: ..., id: ...}"
            )
        import datasets as hf

        feature = table.features[columns["image"]]
        if isinstance(feature, hf.Image) and feature.decode:
            # The encoded bytes, not the table's own (Pillow) decoding: dataset.jpeg_decoder decides.
            table = table.cast_column(columns["image"], hf.Image(decode=False))
        self.table, self.source, self.columns = table, source, dict(columns)
        ids = (
            [str(i) for i in table[columns["id"]]]
            if columns.get("id") in table.column_names
            else [f"{i:06d}" for i in range(len(table))]
        )
        super().__init__(name, [], lut, classes, **kwargs)
        self.ids = ids

    def __len__(self) -> int:
        return len(self.ids)

    def read_pair(self, index: int) -> tuple[np.ndarray, np.ndarray, str, str, str]:
        row = self.table[index]
        where = f"{self.source} row {index} (id {self.ids[index]})"
        image = _array(row[self.columns["image"]], f"image of {where}", False, self.jpeg_decoder)
        raw = _array(row[self.columns["label"]], f"label of {where}", label=True)
        return image, raw, f"image of {where}", f"label of {where}", self.ids[index]


def from_source(
    name: str,
    source: str,
    split: str | None = "val",
    resolution: int = 512,
    columns: Mapping[str, str] | None = None,
    cache_dir: Path | None = None,
    **options,
) -> TableSegmentation:
    """Dataset ``name`` read from ``source`` (``parquet:...`` or ``hf:...``) with the column
    mapping ``columns`` (keys ``image``, ``label``, ``id``); ``options`` as for the files."""
    spec = registry.get(name)
    if spec.labels is None:
        supported = [n for n in registry.names() if registry.get(n).labels is not None]
        raise ValueError(f"{name}: dataset.source is not supported (supported: {supported})")
    unknown = sorted(set(columns or {}) - set(DEFAULT_COLUMNS))
    if unknown:
        raise ValueError(f"dataset.columns: unknown keys {unknown}; use {list(DEFAULT_COLUMNS)}")
    label_options = {k: options.pop(k) for k in spec.label_options if k in options}
    table = load_table(source, split, cache_dir)
    return TableSegmentation(
        name,
        table,
        source,
        {**DEFAULT_COLUMNS, **(columns or {})},
        label_options,
        resolution=resolution,
        **options,
    )
