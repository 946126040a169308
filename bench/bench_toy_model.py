"""Does a trained toy model earn its place? DiffSeg on it versus the random tiny model and baselines.

On held-out hard synthetic scenes (``eval.tools.train_toy.hard_scenes``, seeds other than training's),
with the project's scoring (per-image Hungarian matching, counts summed: ``HungarianIoU``):

- DiffSeg on the trained model and on the random ``model=tiny``, each at its own KL threshold
  chosen on training scenes (the best mIoU over ``--thresholds``; all three iterations alike);
- pixel K-means on RGB with K = the image's true region count (colour only);
- K-Means-C (6 clusters) and K-Means-S (K = true regions) on each model's aggregated attention.

Also the mean normalised entropy of the aggregated attention maps (1: uniform), the sharpness
that DiffSeg's KL threshold depends on. The issue's bar for shipping the model: more than 1.5
segments per image and an mIoU above both the random model's and pixel K-means'.

    PYTHONPATH=. .venv/bin/python bench/bench_toy_model.py MODEL_DIR [--images 32]
"""

from __future__ import annotations

import argparse
from collections.abc import Callable, Sequence

import torch

from diffseg.kmeans import kmeans_segment, pixel_kmeans_segment
from diffseg.merge import segment_attention
from diffseg.pipeline import DiffSegPipeline
from eval import description
from eval.scoring.metrics import HungarianIoU
from eval.tools.train_toy import hard_scenes

THRESHOLDS = (0.0003, 0.001, 0.003, 0.01, 0.02, 0.03, 0.05, 0.07, 0.1, 0.2, 0.3, 0.5, 1.1)
TIMESTEP = 300


def _load(data: Sequence[dict]) -> tuple[torch.Tensor, torch.Tensor, list[int]]:
    """(images (N, 3, R, R), labels (N, R, R), true region count per image)."""
    images = torch.stack([item["image"] for item in data])
    labels = torch.stack([item["label"] for item in data])
    return images, labels, [len(label.unique()) for label in labels]


def _aggregate(pipe: DiffSegPipeline, images: torch.Tensor, resolution: int) -> torch.Tensor:
    return torch.cat(
        [
            pipe.aggregate(b, timestep=TIMESTEP, resolution=resolution).float()
            for b in images.split(8)
        ]
    )


def _score(pred: torch.Tensor, labels: torch.Tensor, n_class: int) -> tuple[float, float]:
    """(mIoU, mean segments per image) of label maps ``pred (N, R, R)``."""
    metric = HungarianIoU(n_class)
    metric.update(pred, labels)
    segments = sum(len(p.unique()) for p in pred) / len(pred)
    return float(metric.compute()["miou"]), segments


def _entropy(aggregated: torch.Tensor) -> float:
    """Mean entropy of the maps of ``aggregated (N, S, S, S, S)`` over that of a uniform map."""
    s = aggregated.shape[-1]
    maps = aggregated.reshape(-1, s * s).double().clamp_min(1e-12)
    return float((-(maps * maps.log()).sum(1)).mean() / torch.log(torch.tensor(s * s)))


def _diffseg(
    aggregated: torch.Tensor, threshold: float, num_points: int, size: int
) -> torch.Tensor:
    return segment_attention(aggregated, (threshold,) * 3, num_points, out_size=size)


def _best_threshold(
    segment: Callable[[float], torch.Tensor], labels: torch.Tensor, n_class: int
) -> tuple[float, list[str]]:
    """The threshold of ``THRESHOLDS`` with the best mIoU (ties: the smaller), and a log line each."""
    lines, best = [], (-1.0, None)
    for t in THRESHOLDS:
        miou, segments = _score(segment(t), labels, n_class)
        lines.append(f"  KL {t:<6} mIoU {miou:.3f}, {segments:.2f} segments/image")
        if miou > best[0]:
            best = (miou, t)
    return best[1], lines


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=description(__doc__))
    parser.add_argument("model", help="the trained model's directory (diffusers layout)")
    parser.add_argument("--images", type=int, default=32, help="held-out scenes")
    parser.add_argument("--tune-images", type=int, default=16, help="training scenes for the KL")
    parser.add_argument("--resolution", type=int, default=128)
    parser.add_argument("--num-points", type=int, default=16)
    parser.add_argument(
        "--train-seed", type=int, default=100, help="eval.tools.train_toy's --data-seed"
    )
    parser.add_argument("--seed", type=int, default=7, help="held-out scenes' seed")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    size, n_class = args.resolution, 5
    tune_images, tune_labels, _ = _load(hard_scenes(args.tune_images, size, args.train_seed))
    images, labels, counts = _load(hard_scenes(args.images, size, args.seed))
    rows = []
    models = {
        "trained": DiffSegPipeline.from_pretrained(args.model, dtype="float32", device="cpu"),
        "random": DiffSegPipeline.from_tiny(seed=0),
    }
    for name, pipe in models.items():
        tune_attention = _aggregate(pipe, tune_images, size)
        threshold, lines = _best_threshold(
            lambda t, a=tune_attention: _diffseg(a, t, args.num_points, size),
            tune_labels,
            n_class,
        )
        print(f"{name} model, KL threshold sweep on {args.tune_images} training scenes:")
        print("\n".join(lines))
        attention = _aggregate(pipe, images, size)
        entropy = _entropy(attention)
        pred = _diffseg(attention, threshold, args.num_points, size)
        rows.append(
            (f"DiffSeg, {name} model (KL {threshold})", *_score(pred, labels, n_class), entropy)
        )
        for label, k in (("K-Means-C", 6), ("K-Means-S", counts)):
            pred = kmeans_segment(attention, k, out_size=size)
            rows.append(
                (f"{label}, {name} model's attention", *_score(pred, labels, n_class), entropy)
            )
    pred = pixel_kmeans_segment(images, counts)
    rows.append(
        ("Pixel K-means on RGB (K = true regions)", *_score(pred, labels, n_class), float("nan"))
    )
    print(
        f"\n{args.images} held-out hard scenes at {size} px (seed {args.seed}), "
        f"{sum(counts) / len(counts):.2f} true regions/image"
    )
    print("| method | mIoU | segments/image | attention entropy |")
    print("|---|---|---|---|")
    for method, miou, segments, entropy in rows:
        print(f"| {method} | {miou:.3f} | {segments:.2f} | {entropy:.4f} |")


if __name__ == "__main__":
    main()
