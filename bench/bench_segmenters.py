"""Several segmenters on shared UNet passes against one pass each, and what DiffCut's own pass
saves over one that also captures DiffSeg's attention.

Table 1: DiffSeg, K-Means-C and DiffCut (their conf/segmenter/ settings), as in the README's example
run. `shared` is `eval.segmenters.segment_all` (one UNet pass per pass setting: DiffSeg and
K-Means-C share one; DiffCut's is its own, with DiffCut's numerics); the baseline `separate` is
`segment_batch` per segmenter (a pass each), in the same run on the same images.

Table 2: DiffCut alone. Its pass as the project ran it before (`numerics=plain`: DiffSeg's capture
processor computes and records the self-attention beside the features) against DiffCut's own
pass (`numerics=diffcut`: diffusers' attention, nothing captured; on CUDA in float16 also under
autocast), the same images in the same run.

Models: `tiny` and the SD 1.4 UNet/VAE configuration with random weights (`sd14`, no download;
`bench_pipeline.build`). The labels of both ways of table 1 are checked equal.

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

from diffseg.passes import DIFFCUT, PassSettings
from eval import PROJECT_ROOT, description
from eval.segmenters import segment_all, segment_batch, segmenter_call

# conf/segmenter/NAME.yaml with these changes.
SEGMENTERS: dict[str, dict[str, Any]] = {"diffseg": {}, "kmeans_c": {}, "diffcut": {}}


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


def bench_capture(model: str, args: argparse.Namespace) -> str:
    """One row of table 2: DiffCut's pass with and without DiffSeg's capture, timed alike."""
    device = torch.device(args.device)
    pipe = build(model, args.device, args.dtype)
    call = calls(pipe, args.resolution)[list(SEGMENTERS).index("diffcut")]
    images = bench_images(args.batch, args.resolution)
    ways = [PassSettings.of(call), PassSettings.of(call, numerics=DIFFCUT.name)]
    for settings in ways:  # warm-up
        pipe.unet_pass(images, settings)
    captured, own = (
        best_of(args.repeats, device, lambda s=s: [pipe.unet_pass(images, s)])[0] for s in ways
    )
    return f"| {model} | {captured:.2f} | {own:.2f} | {captured / own:.2f}x |"


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
    capture = [
        "| model | DiffCut's pass with DiffSeg's capture (s) | DiffCut's own pass (s) |"
        " with / without |",
        "|---|---|---|---|",
    ]
    for model in args.models:
        rows.append(bench_model(model, args))
        print(rows[-1], flush=True)
        capture.append(bench_capture(model, args))
        print(capture[-1], flush=True)
    text = "\n".join(
        [
            f"Machine: {machine(torch.device(args.device))}; resolution {args.resolution}, "
            f"batch {args.batch}; best of {args.repeats} after one warm-up. Per batch, all "
            "three segmenters (DiffCut's pass is its own: its numerics).",
            "",
            *rows,
            "",
            "DiffCut alone, per batch: its UNet pass (VAE included) with and without DiffSeg's "
            "attention capture.",
            "",
            *capture,
        ]
    )
    report(text, f"Several segmenters on one UNet pass ({args.device})", args.append)


if __name__ == "__main__":
    main()
