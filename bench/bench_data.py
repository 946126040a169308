"""Benchmark data loading: images/s a DataLoader delivers from the source files versus the cache.

Generated fixtures in the real on-disk formats: Cityscapes-sized (2048x1024 PNG image, 8-bit
labelIds PNG) and COCO-sized (640x480 JPEG image, stuffthingmaps PNG), with photo-like noise so
the files compress (and decode) like real ones.  Both paths give the model the same tensors
(``image`` float (3, R, R), ``label`` int64); each DataLoader configuration makes one full pass
over the split, ``batch_size`` images a batch, timed from the first batch on (steady state).
The cache build (decode once, write Arrow) is timed separately, and so are opening the built
cache again and, of that, the check of its Arrow files' CRC-32 checksums (``check_files``).

    .venv/bin/python bench/bench_data.py [--n-cityscapes 32] [--n-coco 64] [--resolution 512]
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import tempfile
import warnings
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from eval import description

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # for tests.fixtures

from timing import timed

from eval.datasets import SplitSizeWarning, collate, get_dataset
from eval.datasets.cache import check_files
from tests import fixtures as fx


def _photo(h: int, w: int, seed: int) -> np.ndarray:
    """A smooth picture plus noise: PNG/JPEG sizes close to real photographs."""
    noise = np.random.default_rng(seed).normal(0, 12, (h, w, 3))
    return np.clip(fx.rgb(h, w, seed).astype(np.float64) + noise, 0, 255).astype(np.uint8)


def _blobs(h: int, w: int, values: list[int], seed: int) -> np.ndarray:
    """Label map of large rectangles (compresses like real label PNGs)."""
    rng = np.random.default_rng(seed)
    lab = np.full((h, w), values[0], np.uint8)
    for _ in range(12):
        y, x = rng.integers(0, h), rng.integers(0, w)
        lab[y : y + h // 3, x : x + w // 4] = rng.choice(values)
    return lab


def make_cityscapes(root: Path, n: int) -> None:
    for k in range(n):
        stem = f"frankfurt_000000_{k:06d}"
        base = f"frankfurt/{stem}"
        fx.save_image(root / f"leftImg8bit/val/{base}_leftImg8bit.png", _photo(1024, 2048, k))
        label = _blobs(1024, 2048, [*range(34)], k)
        fx.save_grey(root / f"gtFine/val/{base}_gtFine_labelIds.png", label)


def make_coco(root: Path, n: int) -> None:
    ids = [f"{k:012d}" for k in range(n)]
    for k, i in enumerate(ids):
        fx.save_image(root / f"images/val2017/{i}.jpg", _photo(480, 640, k))
        fx.save_grey(root / f"annotations/val2017/{i}.png", _blobs(480, 640, [0, 91, 181, 255], k))
    curated = root / "curated/val2017/Coco164kFull_Stuff_Coarse_7.txt"
    curated.parent.mkdir(parents=True, exist_ok=True)
    curated.write_text("".join(f"{i}\n" for i in ids))


def images_per_s(dataset: Dataset, workers: int, batch_size: int) -> float:
    """Steady-state rate: the clock starts when the first batch arrives (worker start-up and
    the first batch are left out, as they are once per run, not per image)."""
    loader = iter(DataLoader(dataset, batch_size, num_workers=workers, collate_fn=collate))
    next(loader)
    seconds, n = timed("cpu", lambda: sum(len(batch["id"]) for batch in loader))
    return n / seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=description(__doc__))
    parser.add_argument("--n-cityscapes", type=int, default=32)
    parser.add_argument("--n-coco", type=int, default=64)
    parser.add_argument("--resolution", type=int, default=512)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--workers", type=int, nargs="*", default=None)
    args = parser.parse_args()
    cores = os.cpu_count() or 1
    workers = args.workers or [w for w in (0, 2, 4) if w <= max(2, cores)]
    warnings.simplefilter("ignore", SplitSizeWarning)

    rows, builds = [], []
    with tempfile.TemporaryDirectory() as tmp:
        for name, make, n, shape in [
            ("cityscapes", make_cityscapes, args.n_cityscapes, "2048x1024 PNG"),
            ("coco_stuff27", make_coco, args.n_coco, "640x480 JPEG"),
        ]:
            root = Path(tmp) / name
            make(root, n)
            source = get_dataset(name, root, resolution=args.resolution)
            build_s, cached = timed(
                "cpu", get_dataset, name, root, resolution=args.resolution, cache=True
            )
            size = sum(f.stat().st_size for f in (root / ".cache").rglob("*") if f.is_file())
            open_s, _ = timed(
                "cpu", get_dataset, name, root, resolution=args.resolution, cache=True
            )
            (folder,) = [p for p in (root / ".cache").iterdir() if p.is_dir() and p.name != "hf"]
            check_s, _ = timed("cpu", check_files, folder)
            pass_s = n / images_per_s(cached, 0, args.batch_size)  # one pass over the cache
            builds.append((name, shape, n, build_s, size, open_s, check_s, pass_s))
            for w in workers:
                src = images_per_s(source, w, args.batch_size)
                hit = images_per_s(cached, w, args.batch_size)
                rows.append((name, shape, w, src, hit))

    print(f"\nmachine: {platform.processor() or platform.machine()}, {cores} CPU cores, "
          f"torch {torch.__version__}, resolution {args.resolution}, "
          f"batch size {args.batch_size}")  # fmt: skip
    print("\n| dataset | source files | workers | source img/s | cache img/s | cache / source |")
    print("|---|---|---:|---:|---:|---:|")
    for name, shape, w, src, hit in rows:
        print(f"| {name} | {shape} | {w} | {src:.1f} | {hit:.1f} | {hit / src:.1f}x |")
    print(
        "\n| dataset | images | cache build (s) | build img/s | cache size (MiB) | open (s) "
        "| of it checksums (s) | checksums / one pass (0 workers) |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for name, _, n, build_s, size, open_s, check_s, pass_s in builds:
        print(
            f"| {name} | {n} | {build_s:.1f} | {n / build_s:.1f} | {size / 2**20:.0f} "
            f"| {open_s:.2f} | {check_s:.2f} | {check_s / pass_s:.2f} |"
        )


if __name__ == "__main__":
    main()
