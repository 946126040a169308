"""The evaluation loop's host work per image, without the model: ``eval.loop.Loop`` at 512 px on
COCO-Stuff-like labels (27 classes, a few classes and ~10 predicted segments per image, some
ignored pixels), with a stand-in segmenter that hands back precomputed label maps, so only the
harness is timed (scoring, contingency tables, records, prediction PNGs, contingency parts).

Prints, per path (``new``: this code; ``old``: the former scoring and synchronous writes, kept
below as the baseline), batch size and ``save_predictions``: the main thread's milliseconds per
image, split by step, the wait for the background writer at the end, and images per second.
Each configuration runs ``--repeats`` times alternating old and new; the table shows medians
and the old / new ratio of the main-thread time (the goal: at most 10 ms per image).

    python bench/bench_harness.py [--images 32] [--batch-sizes 1 8] [--repeats 3] [--append FILE]

The images reach the loop as placeholders (3x1x1): the loader's decoding runs in its worker
processes in a real run, so it is no main-thread work; ``num_workers=0`` keeps the bench in one
process. No qualitative figures (``n_qualitative=0``; they go to the writer thread too).
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import tempfile
import time
from collections import defaultdict
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import torch
from scipy.ndimage import maximum_filter, minimum_filter
from tqdm.auto import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from eval import loop, tracks
from eval.plan import SegmenterPlan
from eval.results import visualize
from eval.scoring import contingency
from eval.scoring.matching import match_per_image
from eval.scoring.metrics import HungarianIoU

N_CLASS = 27
RESOLUTION = 512
STEPS = ("counts", "record", "submit", "metric", "running", "other")
OLD_STEPS = ("match", "unique", "table", "png", "part", "jsonl", "metric", "running", "other")


# ----------------------------------------------------------------------------------------------
# Data


def voronoi(rng: np.random.Generator, cells: int, size: int, step: int = 8) -> np.ndarray:
    """``(size, size)`` int64 cell ids ``0..cells-1``: a Voronoi partition drawn on a grid
    ``step`` times coarser, then upsampled (ragged, stair-cased boundaries, as DiffSeg's
    upsampled 64x64 proposals and polygon labels have)."""
    n = size // step
    seeds = rng.uniform(0, n, (cells, 2))
    grid = np.stack(np.meshgrid(np.arange(n), np.arange(n), indexing="ij"), -1).reshape(-1, 1, 2)
    ids = ((grid + 0.5 - seeds) ** 2).sum(-1).argmin(1).reshape(n, n)
    return ids.repeat(step, 0).repeat(step, 1).astype(np.int64)


def coco_like(rng: np.random.Generator, size: int) -> tuple[np.ndarray, np.ndarray]:
    """``(label, prediction)``: a label with 3-8 of the 27 classes over ~10 regions and an ignored
    region half of the time; a prediction with 6-20 segments (DiffSeg's usual range)."""
    cells = voronoi(rng, int(rng.integers(6, 14)), size)
    classes = rng.choice(N_CLASS, int(rng.integers(3, 9)), replace=False)
    label = classes[rng.integers(0, classes.size, cells.max() + 1)][cells]
    if rng.random() < 0.5:
        label[cells == 0] = -1
    pred = voronoi(rng, int(rng.integers(6, 21)), size)
    return label, np.unique(pred, return_inverse=True)[1].reshape(pred.shape)


class Images(torch.utils.data.Dataset):
    """The loop's dataset: ids, placeholder images and the labels."""

    class_names = tuple(f"class{k}" for k in range(N_CLASS))
    n_class = N_CLASS

    def __init__(self, labels: list[torch.Tensor]) -> None:
        self.labels = labels

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> dict[str, Any]:
        image = torch.zeros(3, 1, 1, dtype=torch.uint8)
        return {"id": f"img{index:05d}", "image": image, "label": self.labels[index]}


class QuietLogger:
    def log_running(self, step: int, values: dict) -> None:
        pass


# ----------------------------------------------------------------------------------------------
# The former path (the baseline): matching on the prediction, torch.unique, the bands by max/min
# filters and one bincount per layer, every file written on the main thread


def band_by_filters(labels: np.ndarray, d: int) -> np.ndarray:
    outside = int(labels.min()) - 1
    high = maximum_filter(labels, size=2 * d + 1, mode="constant", cval=outside)
    low = minimum_filter(labels, size=2 * d + 1, mode="constant", cval=outside)
    return high != low


def old_image_table(pred: torch.Tensor, label: torch.Tensor, n_class: int) -> np.ndarray:
    p, y = pred.numpy().astype(np.int64), label.numpy().astype(np.int64)
    d = contingency.boundary_width(*y.shape)
    gt_band, pred_band = band_by_filters(y, d), band_by_filters(p, d)
    row = np.where((y >= 0) & (y < n_class), y, n_class)
    n_seg = int(p.max()) + 1
    cell = (row * n_seg + p).reshape(-1)
    size = (n_class + 1) * n_seg
    layers = [
        np.bincount(cell if m is None else cell[m.reshape(-1)], minlength=size)
        for m in (None, gt_band, pred_band, gt_band & pred_band)
    ]
    return np.stack(layers).reshape(len(contingency.LAYERS), n_class + 1, n_seg)


class OldLoop(loop.Loop):
    """``Loop`` scoring as before issue 25 (``run`` gets a writer that writes at once)."""

    def score_track(self, track, batch, preds):  # noqa: ANN001, ANN201 (the baseline)
        todo = [
            (i, it, p)
            for i, it, p in zip(batch["index"], batch["items"], preds, strict=True)
            if i not in track.records
        ]
        index = [i for i, _, _ in todo]
        items = [it for _, it, _ in todo]
        preds = [p for _, _, p in todo]
        records = []
        for i, item, pred in zip(index, items, preds, strict=True):
            tp, fp, fn, total = STEP["match"](match_per_image)(pred, item["label"], N_CLASS)
            scores = loop.scores_from_counts(
                torch.from_numpy(tp), torch.from_numpy(fp), torch.from_numpy(fn), total
            )
            rec = {
                "index": i,
                "id": item["id"],
                "segments": int(STEP["unique"](torch.unique)(pred).numel()),
                "accuracy": float(scores["pixel_accuracy"]),
                "miou": float(scores["miou"]),
                "tp": tp.tolist(),
                "fp": fp.tolist(),
                "fn": fn.tolist(),
                "total": int(total),
            }
            if self.plan.save_predictions:
                rec["prediction"] = f"predictions/{loop.safe_name(i, item['id'])}.png"
                STEP["png"](visualize.save_label_png)(pred, track.run_dir / rec["prediction"])
            records.append(rec)
        tables = {
            i: STEP["table"](old_image_table)(pred, item["label"], N_CLASS)
            for i, item, pred in zip(index, items, preds, strict=True)
        }
        part = STEP["part"](contingency.write_part)(track.run_dir, 0, tables)
        for rec in records:
            rec["contingency"] = part
        return list(zip(index, items, preds, records, strict=True))


class AtOnce:
    """A ``Writer`` that runs each job when submitted (the former synchronous writes)."""

    def submit(self, fn: Callable[..., Any], *args: Any) -> None:
        fn(*args)

    def close(self) -> None:
        pass


# ----------------------------------------------------------------------------------------------
# Timing


class Steps:
    """Seconds per step of the main thread, by wrapping the functions each step calls."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = defaultdict(float)

    def __getitem__(self, name: str) -> Callable[[Callable], Callable]:
        def wrap(fn: Callable) -> Callable:
            def timed(*args: Any, **kwargs: Any) -> Any:
                start = time.perf_counter()
                try:
                    return fn(*args, **kwargs)
                finally:
                    self.seconds[name] += time.perf_counter() - start

            return timed

        return wrap


STEP = Steps()


@contextmanager
def patched(obj: Any, name: str, value: Any) -> Iterator[None]:
    old = getattr(obj, name)
    setattr(obj, name, value)
    try:
        yield
    finally:
        setattr(obj, name, old)


def measure(
    path: str, data: Images, preds: list[torch.Tensor], batch_size: int, save: bool
) -> tuple[dict[str, float], float, float]:
    """One run of the loop over every image: ``(main-thread seconds per step, the writer's
    drain at the end, wall seconds)``."""
    global STEP
    STEP = Steps()
    # What the loop reads of a run's plan (eval.plan.RunPlan).
    plan = SimpleNamespace(
        batch_size=batch_size,
        num_workers=0,
        save_predictions=save,
        n_qualitative=0,
        dataset_name="coco_like",
    )

    def stand_in(pipeline, items, device, calls, batch_size, images=None):  # noqa: ANN001, ANN202
        return [[preds[int(it["id"][3:])] for it in items]]

    drain = [0.0]
    with tempfile.TemporaryDirectory() as tmp:
        writer_cls = AtOnce if path == "old" else loop.Writer

        class Timed(writer_cls):
            def submit(self, fn, *args):  # noqa: ANN001, ANN202
                name = "jsonl" if path == "old" and fn.__name__ == "append" else "submit"
                return STEP[name](super().submit)(fn, *args)

            def close(self) -> None:
                start = time.perf_counter()
                super().close()
                drain[0] += time.perf_counter() - start

        with (
            patched(loop, "predict", stand_in),
            patched(loop, "Writer", Timed),
            patched(tracks, "running_scores", STEP["running"](tracks.running_scores)),
            patched(HungarianIoU, "update", STEP["metric"](HungarianIoU.update)),
            patched(contingency, "pixel_counts", STEP["counts"](contingency.pixel_counts)),
            patched(loop, "score_item", STEP["record"](loop.score_item)),
            patched(loop, "tqdm", lambda *a, **k: tqdm(*a, **{**k, "disable": True})),
        ):
            # The metric wraps its update when made: made here, it wraps the timed one.
            own = SegmenterPlan("segmenter", None, {}, {}, Path(tmp))
            track = tracks.Track(own, "bench", {}, HungarianIoU(N_CLASS))
            cls = OldLoop if path == "old" else loop.Loop
            runner = cls(
                plan, data, None, torch.device("cpu"), tracks.Tracks([track]), QuietLogger()
            )
            start = time.perf_counter()
            runner.run(list(range(len(data))))
            wall = time.perf_counter() - start
        assert len(track.records) == len(data)
    steps = dict(STEP.seconds)
    steps["other"] = wall - drain[0] - sum(steps.values())
    return steps, drain[0], wall


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=32)
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--append", type=Path, help="also append the table to this Markdown file")
    args = parser.parse_args()

    rng = np.random.default_rng(args.seed)
    pairs = [coco_like(rng, RESOLUTION) for _ in range(args.images)]
    data = Images([torch.from_numpy(label) for label, _ in pairs])
    preds = [torch.from_numpy(pred) for _, pred in pairs]
    segments = np.mean([p.unique().numel() for p in preds])
    classes = np.mean([np.unique(label[label >= 0]).size for label, _ in pairs])

    lines = [
        f"`bench/bench_harness.py --images {args.images} --repeats {args.repeats}`: "
        f"{RESOLUTION} px, {N_CLASS} classes, {classes:.1f} classes and {segments:.1f} predicted "
        f"segments per image on average; {platform.processor() or platform.machine()}, "
        f"{os.cpu_count()} cores, load average before {os.getloadavg()[0]:.1f}, torch "
        f"{torch.__version__}, {torch.get_num_threads()} threads. Medians of {args.repeats} runs "
        "(old and new alternating); main-thread ms per image, by step.",
        "",
        "| path | batch | save_predictions | main thread ms/img | steps (ms/img) "
        "| writer drain ms/img | images/s | old/new (main thread) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    print("\n".join(lines), flush=True)
    for path in ("old", "new"):  # warm-up: imports (pyarrow), first allocations
        measure(path, data, preds, max(args.batch_sizes), True)
    for batch_size in args.batch_sizes:
        for save in (True, False):
            runs: dict[str, list] = {"old": [], "new": []}
            for _ in range(args.repeats):
                for path in ("old", "new"):
                    runs[path].append(measure(path, data, preds, batch_size, save))
            main_ms = {}
            for path in ("old", "new"):
                n = args.images

                def med(values: list[float], n: int = n) -> float:
                    return 1000 * statistics.median(values) / n

                main_ms[path] = med([wall - drain for _, drain, wall in runs[path]])
                names = OLD_STEPS if path == "old" else STEPS
                steps = ", ".join(
                    f"{name} {med([s.get(name, 0.0) for s, _, _ in runs[path]]):.1f}"
                    for name in names
                )
                drain_ms = med([drain for _, drain, _ in runs[path]])
                per_s = n / statistics.median([wall for _, _, wall in runs[path]])
                ratio = f"{main_ms['old'] / main_ms['new']:.1f}x" if path == "new" else ""
                line = (
                    f"| {path} | {batch_size} | {save} | {main_ms[path]:.1f} | {steps} "
                    f"| {drain_ms:.1f} | {per_s:.0f} | {ratio} |"
                )
                lines.append(line)
                print(line, flush=True)
    lines.append(f"\nLoad average after: {os.getloadavg()[0]:.1f}.")
    print(lines[-1])
    if args.append:
        with open(args.append, "a", encoding="utf-8") as f:
            f.write("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
