"""A preprocessed, memory-mapped copy of an evaluation split (HF ``datasets`` Arrow files).

Decoding a 2048x1024 Cityscapes PNG and resizing it costs far more than the model's data budget
at 20+ images/s, and every sweep point decodes the same images again.  The cache stores each item
after crop, resize and label mapping, so reading it is a memory-mapped copy:

* ``image``: ``(3, R, R)`` float32 by default — bit-identical to the source loader (its bilinear
  resize yields values between the 8-bit levels, so uint8 cannot hold them exactly); with
  ``cache_dtype="uint8"`` the image is rounded to 8 bits (4x smaller, at most 0.5/255 off).
* ``label``: ``(R, R)`` int8 (int16 when there are 128 classes or more), -1 ignored.
* ``id``; ``error``: the :class:`DataFileError` message of a pair that could not be read ("" if
  fine), so ``on_error`` applies when reading, exactly as with the files.

Location: ``<cache root>/<name>-<split>-<resolution>-<key>/``, the cache root being
``dataset.cache_dir`` or, by default, ``<root>/.cache`` (:func:`cache_root`), where ``key`` hashes
everything that changes the stored values (dataset, split, resolution, antialias, JPEG decoder,
dtype, source and column mapping, synthetic options).  Next to the Arrow data, ``fingerprint.json``
records the inputs:
every source file's path, size and mtime (or the Parquet files / hub fingerprint), the label
lookup table, the class names and a hash of the preprocessing code.  A cache whose fingerprint
differs is rebuilt, with a message, never used.  ``checksums.json`` holds a CRC-32 of every file
of the Arrow data (per shard), checked each time the cache is opened (:func:`check_files`): a
flipped, cut or replaced byte rebuilds the cache, with a message naming it (reading the shards
costs about as much as one pass over the data; ``bench/bench_data.py`` measures it).  It is written into a temporary folder and renamed
into place, under a file lock, so concurrent ranks build it once and never see half a cache.
"""

from __future__ import annotations

import hashlib
import inspect
import json
import os
import shutil
import sys
import tempfile
import warnings
import zlib
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from diffseg import preprocess
from eval.datasets import base, registry
from eval.datasets.base import DataFileError, SegmentationFiles, check_on_error
from eval.datasets.sources import TableSegmentation, parquet_files, parse_source

if TYPE_CHECKING:
    import datasets

CACHE_VERSION = 1
DTYPES = ("float32", "uint8")
# Rows per Arrow record batch while writing: bounds the writer's memory (3 MiB per 512 image).
WRITER_BATCH = 16


def cache_root(
    name: str, root: str | os.PathLike | None, cache_dir: str | os.PathLike | None
) -> Path:
    """Where a dataset's caches live: ``cache_dir``, else ``ROOT/.cache``."""
    if cache_dir is not None:
        return Path(cache_dir).expanduser()
    if root is None:
        raise ValueError(f"{name}: dataset.cache=true needs dataset.root=PATH (the cache lives in "
                         "ROOT/.cache) or dataset.cache_dir=PATH")  # fmt: skip
    return Path(root).expanduser() / ".cache"


def cache_path(
    root: Path, name: str, split: str | None, resolution: int, key_options: Mapping
) -> Path:
    """``<root>/<name>-<split>-<resolution>-<hash of key_options>``, ``root`` a cache root."""
    blob = json.dumps({"name": name, "split": split, "resolution": resolution, **key_options},
                      sort_keys=True, default=str)  # fmt: skip
    key = hashlib.sha256(blob.encode()).hexdigest()[:12]
    return root / f"{name}-{split}-{resolution}-{key}"


def check_writable(folder: Path, name: str) -> None:
    """Create ``folder`` and write a file in it, or raise one error saying where to cache instead
    (a read-only dataset root would otherwise fail deep inside the lock or the writer)."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=folder):
            pass
    except OSError as e:
        reason = e.strerror or type(e).__name__
        raise OSError(
            f"{name}: cannot write the dataset cache in {folder} ({reason}); set "
            "dataset.cache_dir=WRITABLE_PATH"
        ) from e


def _stat(path: Path) -> list:
    st = path.stat()
    return [str(path), st.st_size, st.st_mtime_ns]


def _code_hash(dataset: Dataset) -> str:
    """Hash of the preprocessing code and of the dataset's own module: an edit there makes old
    caches stale."""
    h = hashlib.sha256()
    for module in (preprocess, base, sys.modules[type(dataset).__module__]):
        h.update(Path(inspect.getsourcefile(module)).read_bytes())
    return h.hexdigest()


def inputs(dataset: Dataset) -> list:
    """What the stored values were computed from, beyond the options (for the fingerprint)."""
    if isinstance(dataset, TableSegmentation):
        kind, target = parse_source(dataset.source)
        if kind == "parquet":
            return [_stat(p) for p in parquet_files(target)]
        # The hub copy's Arrow files as downloaded: a new revision is new files.
        return [_stat(Path(f["filename"])) for f in dataset.table.cache_files]
    if isinstance(dataset, SegmentationFiles):
        return [[s.id, _stat(s.image), _stat(s.label)] for s in dataset.samples]
    return []  # synthetic: the options and the code determine every pixel


def identity(dataset: Dataset) -> str:
    """A hash (16 hex) of what a dataset's items are read from, for a resume to compare: its
    length and :func:`inputs` (each item's id and files' names, sizes and mtimes; a table's
    files), the folders left out (the root is compared on its own); for a cache, those of the
    source it was built from; through a wrapper that keeps the dataset as ``.dataset``
    (``ProtocolData``), the wrapped one's."""
    inner = vars(dataset).get("dataset", dataset)
    stored = getattr(inner, "fingerprint", None)
    data = stored["inputs"] if isinstance(stored, dict) else inputs(inner)
    blob = json.dumps([len(dataset), _names(data)], default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def _names(item: Any) -> Any:
    """``inputs`` with each file's path (``[path, size, mtime]``, :func:`_stat`) cut to its name."""
    if not isinstance(item, list):
        return item
    if len(item) == 3 and isinstance(item[0], str) and all(isinstance(v, int) for v in item[1:]):
        return [Path(item[0]).name, *item[1:]]
    return [_names(x) for x in item]


def fingerprint(dataset: Dataset, key_options: Mapping) -> dict:
    lut = getattr(dataset, "lut", None)
    return {
        "version": CACHE_VERSION,
        "options": json.loads(json.dumps(dict(key_options), sort_keys=True, default=str)),
        "classes": list(dataset.class_names),
        "lut": None if lut is None else hashlib.sha256(np.asarray(lut).tobytes()).hexdigest(),
        "code": _code_hash(dataset),
        "skipped": getattr(dataset, "skipped", 0),
        "inputs": inputs(dataset),
    }


def stale_reason(stored: dict, current: dict) -> str:
    """A short human description of why ``stored`` no longer matches ``current``."""
    changed = [k for k in current if k != "inputs" and stored.get(k) != current[k]]
    old, new = stored.get("inputs", []), current["inputs"]
    if old != new:
        if len(old) != len(new):
            changed.append(f"inputs ({len(old)} -> {len(new)} items)")
        else:
            first = next(n for o, n in zip(old, new, strict=True) if o != n)
            diff = sum(o != n for o, n in zip(old, new, strict=True))
            changed.append(f"inputs ({diff} changed, first {json.dumps(first)[:200]})")
    return ", ".join(changed)


CHECKSUMS = "checksums.json"


def file_crc32(path: Path) -> str:
    """CRC-32 (hex) of a file's bytes, read in 16 MiB chunks."""
    crc = 0
    with open(path, "rb") as f:
        while chunk := f.read(2**24):
            crc = zlib.crc32(chunk, crc)
    return f"{crc:08x}"


def data_checksums(data: Path) -> dict[str, str]:
    """Relative path -> CRC-32 of every file under the Arrow data folder ``data``."""
    return {
        p.relative_to(data).as_posix(): file_crc32(p)
        for p in sorted(data.rglob("*"))
        if p.is_file()
    }


def check_files(path: Path) -> str | None:
    """Why the Arrow data of the cache at ``path`` cannot be trusted (None when it can): no
    recorded checksums, or a file missing, added or changed since they were recorded."""
    try:
        recorded = json.loads((path / CHECKSUMS).read_text())
    except (OSError, ValueError):
        return f"has no readable {CHECKSUMS} (made before checksums were recorded?)"
    current = data_checksums(path / "data")
    changed = sorted(set(recorded) ^ set(current)) + sorted(
        name for name in set(recorded) & set(current) if recorded[name] != current[name]
    )
    return f"has files that changed since it was built ({', '.join(changed)})" if changed else None


def _read_fingerprint(path: Path) -> dict | None:
    try:
        return json.loads((path / "fingerprint.json").read_text())
    except (OSError, ValueError):
        return None


class _Rows(Dataset):
    """``(item or None, error message, id)`` of the source, whatever its ``on_error``."""

    def __init__(self, source: Dataset) -> None:
        self.source = source

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, index: int) -> tuple[dict | None, str, str]:
        load = getattr(self.source, "load", self.source.__getitem__)
        try:
            item = load(index)
            return item, "", item["id"]
        except DataFileError as e:
            ids = getattr(self.source, "ids", None) or [s.id for s in self.source.samples]
            return None, str(e), ids[index]


def _label_dtype(n_class: int) -> str:
    return "int8" if n_class < 128 else "int16"


def _generate(
    source: Dataset, resolution: int, dtype: str, num_workers: int, desc: str
) -> Iterator[dict[str, np.ndarray | str]]:
    from tqdm.auto import tqdm

    ldtype = getattr(torch, _label_dtype(source.n_class))
    # batch_size=None: items one by one, decoded in parallel by the workers, in order.
    loader = DataLoader(_Rows(source), batch_size=None, num_workers=num_workers)
    for item, error, id_ in tqdm(loader, total=len(source), desc=desc, unit="img"):
        if item is None:
            image = torch.zeros(3, resolution, resolution)
            label = torch.full((resolution, resolution), base.IGNORE)
        else:
            image, label = item["image"], item["label"]
        if dtype == "uint8":
            image = image.mul(255).round_().to(torch.uint8)
        yield {"image": image.numpy(), "label": label.to(ldtype).numpy(), "id": id_, "error": error}


def estimate_bytes(n: int, resolution: int, dtype: str, n_class: int) -> int:
    """Bytes the cache of ``n`` items takes (image + label; ids are negligible)."""
    image = 3 * resolution * resolution * np.dtype(dtype).itemsize
    return n * (image + resolution * resolution * np.dtype(_label_dtype(n_class)).itemsize)


def build(
    source: Dataset,
    path: Path,
    fp: dict,
    resolution: int,
    dtype: str = "float32",
    echo: Callable[[str], None] = print,
) -> None:
    """Write ``source``'s items into a new cache at ``path`` (replacing any old one)."""
    import datasets
    from datasets import Array2D, Array3D, Features, Value

    n = len(source)
    size = estimate_bytes(n, resolution, dtype, source.n_class)
    free = shutil.disk_usage(path.parent).free
    echo(f"caching {n} images at {resolution}x{resolution} ({dtype}): {size / 2**30:.2f} GiB "
         f"into {path} ({free / 2**30:.1f} GiB free)")  # fmt: skip
    if size > free:
        raise OSError(f"not enough space for the cache at {path}: needs {size} bytes, {free} free")
    features = Features({
        "image": Array3D(shape=(3, resolution, resolution), dtype=dtype),
        "label": Array2D(shape=(resolution, resolution), dtype=_label_dtype(source.n_class)),
        "id": Value("string"),
        "error": Value("string"),
    })  # fmt: skip
    # Worker start-up costs more than it saves on a few images.
    num_workers = 0 if n < 32 else min(4, os.cpu_count() or 1)
    tmp = path.parent / f".{path.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        progress = datasets.is_progress_bar_enabled()
        datasets.disable_progress_bars()  # our own bar counts images, theirs duplicates it
        try:
            table = datasets.Dataset.from_generator(
                _generate,
                features=features,
                cache_dir=str(tmp / "scratch"),
                gen_kwargs={"source": source, "resolution": resolution, "dtype": dtype,
                            "num_workers": num_workers, "desc": f"caching {path.name}"},
                fingerprint=hashlib.sha256(json.dumps(fp).encode()).hexdigest()[:16],
                writer_batch_size=WRITER_BATCH,
            )  # fmt: skip
            table.save_to_disk(str(tmp / "data"))
        finally:
            if progress:
                datasets.enable_progress_bars()
        del table
        shutil.rmtree(tmp / "scratch")
        (tmp / CHECKSUMS).write_text(json.dumps(data_checksums(tmp / "data")) + "\n")
        (tmp / "fingerprint.json").write_text(json.dumps(fp) + "\n")
        old = path.parent / f".{path.name}.old-{os.getpid()}"
        if path.exists():
            path.rename(old)
        tmp.rename(path)
        shutil.rmtree(old, ignore_errors=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


class CachedDataset(Dataset):
    """Items of a cache, as the source loader gives them: ``image`` float ``(3, R, R)`` in
    [0, 1], ``label`` int64 ``(R, R)`` with -1 ignored, ``id``; ``class_names``, ``n_class``,
    ``skipped``.  A pair that could not be read raises its :class:`DataFileError` again, or with
    ``on_error="skip"`` warns and yields ``None``, as the source loader does."""

    def __init__(
        self,
        table: datasets.Dataset,
        class_names: Sequence[str],
        name: str,
        on_error: str = "raise",
        skipped: int = 0,
    ):
        check_on_error(on_error)
        # "numpy" + torch.from_numpy, not "torch": the torch formatter copies each array through
        # torch.tensor, which costs ~15 ms for a (3, 512, 512) float32 image (bench_data.py).
        self.table = table.with_format("numpy")
        self.class_names = list(class_names)
        self.n_class = len(self.class_names)
        self.name, self.on_error, self.skipped = name, on_error, skipped

    def __len__(self) -> int:
        return len(self.table)

    def item_id(self, index: int) -> str:
        return str(self.table[index]["id"])

    def __getitem__(self, index: int) -> dict | None:
        row = self.table[index]
        if row["error"]:
            if self.on_error == "raise":
                raise DataFileError(row["error"])
            self.skipped += 1
            warnings.warn(f"skipped: {row['error']}", stacklevel=2)
            return None
        image = torch.from_numpy(row["image"])
        if not image.is_floating_point():  # uint8 cache
            image = image.float().div_(255.0)
        label = torch.from_numpy(row["label"]).long()
        return {"image": image, "label": label, "id": str(row["id"])}


def key_options(dataset: Dataset, name: str, source: str | None, columns: Mapping | None) -> dict:
    """The options, besides name, split and resolution, that change the stored values: the
    registered loader options of dataset ``name`` that ``dataset`` holds as attributes, but
    ``on_error`` (the cache stores a pair's error, ``on_error`` applies when it is read)."""
    attrs = [a for a in registry.get(name).loader_options if a != "on_error"]
    options = {a: getattr(dataset, a) for a in attrs if hasattr(dataset, a)}
    if options.get("hard") is False:  # so the default scenes' caches keep their keys
        del options["hard"]
    return {**options, "source": source, "columns": dict(columns) if columns else None}


def cached(  # noqa: PLR0913 (get_dataset's own keywords, which key the cache)
    dataset: Dataset,
    root: str | os.PathLike | None,
    name: str,
    split: str | None,
    resolution: int,
    source: str | None = None,
    columns: Mapping | None = None,
    dtype: str = "float32",
    on_error: str = "raise",
    echo: Callable[[str], None] = print,
    cache_dir: str | os.PathLike | None = None,
) -> CachedDataset:
    """The cache of ``dataset`` (built or rebuilt first when absent or stale), memory-mapped;
    ``source`` and ``columns`` as given to ``get_dataset`` (they are part of the key);
    ``cache_dir``: the cache root (default ``root/.cache``)."""
    import datasets
    from filelock import FileLock

    if dtype not in DTYPES:
        raise ValueError(f"dataset.cache_dtype must be one of {DTYPES}, got {dtype!r}")
    folder = cache_root(name, root, cache_dir)
    if getattr(dataset, "keep_size", False):
        raise ValueError(f"{name}: dataset.cache=true stores fixed-size images; it cannot be "
                         "combined with keep_size=true")  # fmt: skip
    key = {**key_options(dataset, name, source, columns), "dtype": dtype}
    path = cache_path(folder, name, split, resolution, key)
    check_writable(folder, name)
    fp = fingerprint(dataset, key)
    with FileLock(str(path) + ".lock"):
        stored = _read_fingerprint(path)
        problem = None if stored is None else check_files(path)
        if stored != fp or problem:
            if stored is not None:
                why = f"is stale ({stale_reason(stored, fp)})" if stored != fp else problem
                echo(f"{name}: cache {path} {why}; rebuilding")
            build(dataset, path, fp, resolution, dtype, echo=echo)
        # Inside the lock: another process may be rebuilding this folder otherwise.
        table = datasets.load_from_disk(str(path / "data"))
    out = CachedDataset(table, dataset.class_names, name, on_error, fp["skipped"])
    out.skipped_ids = list(getattr(dataset, "skipped_ids", []))
    out.fingerprint = fp  # what it was built from, for eval.state's resume check (identity)
    out.split_size = getattr(dataset, "split_size", None)
    return out
