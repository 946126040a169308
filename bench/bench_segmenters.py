"""Several segmenters on one UNet pass against one pass each: what `segmenters:` saves per batch.

The segmenters are DiffSeg, K-Means-C and DiffCut with one pass setting (timestep 300, no noise,
so that all three can share it), as in the README's example run. `shared` is
`eval.segmenters.segment_all` (one UNet pass that also captures DiffCut's features, then each
segmenter); the baseline `separate` is `segment_batch` per segmenter (a pass each), in the same
run on the same images. Models: `tiny` and the SD 1.4 UNet/VAE configuration with random weights
(`sd14`, no download; `bench_pipeline.build`). The labels of both ways are checked equal.

    python bench/bench_segmenters.py                            # CPU, tiny + sd14 at 256 px
    python bench/bench_segmenters.py --device cuda --resolution 512 --batch 4
    python bench/bench_segmenters.py --append bench/RESULTS.md
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from bench_pipeline import MODELS, bench_images, build, machine, report
from omegaconf import OmegaConf
from timing import timed

from eval import PROJECT_ROOT, description
from eval.segmenters import segment_all, segment_batch, segmenter_call

# conf/segmenter/NAME.yaml with these changes: DiffCut on DiffSeg's pass setting.
SEGMENTERS = {"diffseg": {}, "kmeans_c": {}, "diffcut": {"timestep": 300, "noise": False}}


def calls(pipe: Any, resolution: int, seed: int = 0) -> list[dict[str, Any]]:
    """The three segmenters' call settings; DiffSeg's anchors per side at most the model's
    largest attention map's side (16 at 256 px on SD 1.x, 8 at 128)."""
    side = pipe.attention_sides(resolution)[0]
    out = []
    for name, changes in SEGMENTERS.items():
        # Under a root holding the run's keys, as in the composed config (`seed: ${seed}`).
        root = OmegaConf.create({"seed": seed})
        root.segmenter = OmegaConf.load(PROJECT_ROOT / "conf" / "segmenter" / f"{name}.yaml")
        config = {**OmegaConf.to_container(root.segmenter, resolve=True), **changes}
        if name == "diffseg":
            config["num_points"] = min(config["num_points"], side)
        out.append(segmenter_call(config, resolution, seed, scale_factor=resolution // side))
    return out


def best_of(repeats: int, device: torch.device, fn: Callable[[], list]) -> tuple[float, list]:
    times, out = [], []
    for _ in range(repeats):
        seconds, out = timed(device, fn)
        times.append(seconds)
    return min(times), out


def bench_model(model: str, args: argparse.Namespace) -> str:
    """One table row: both ways timed on the same images, their labels compared."""
    device = torch.device(args.device)
    pipe = build(model, args.device, args.dtype)
    settings = calls(pipe, args.resolution)
    images = bench_images(args.batch, args.resolution)
    items = [{"id": str(i)} for i in range(args.batch)]
    segment_all(pipe, images, items, settings)  # warm-up
    separate, alone = best_of(
        args.repeats, device, lambda: [segment_batch(pipe, images, items, c) for c in settings]
    )
    shared, together = best_of(
        args.repeats, device, lambda: segment_all(pipe, images, items, settings)
    )
    equal = all(torch.equal(a.cpu(), b.cpu()) for a, b in zip(alone, together, strict=True))
    return (
        f"| {model} | {' + '.join(SEGMENTERS)} | {separate:.2f} | {shared:.2f} | "
        f"{separate / shared:.2f}x | {equal} |"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=description(__doc__))
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default=None, help="default: fp32 on CPU, fp16 on CUDA")
    parser.add_argument("--models", nargs="+", default=["tiny", "sd14"], choices=MODELS)
    parser.add_argument("--resolution", type=int, default=256)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--append", type=Path, default=None)
    args = parser.parse_args()
    rows = [
        "| model | segmenters | separate passes (s) | one shared pass (s) | separate / shared |"
        " labels equal |",
        "|---|---|---|---|---|---|",
    ]
    for model in args.models:
        rows.append(bench_model(model, args))
        print(rows[-1], flush=True)
    text = "\n".join(
        [
            f"Machine: {machine(torch.device(args.device))}; resolution {args.resolution}, "
            f"batch {args.batch}; best of {args.repeats} after one warm-up. Per batch, all "
            "three segmenters.",
            "",
            *rows,
        ]
    )
    report(text, f"Several segmenters on one UNet pass ({args.device})", args.append)


if __name__ == "__main__":
    main()
