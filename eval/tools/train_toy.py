"""``python -m eval.tools.train_toy OUT [--unet-steps N ...]``: train the toy model on the hard scenes.

The recipe of `diffseg.train` on ``--scenes`` hard synthetic scenes (``dataset=synthetic`` with
``hard=True``, seed ``--data-seed``; the held-out scenes of ``bench/bench_toy_model.py`` use other
seeds) at ``--resolution``. Writes into ``OUT`` the model in diffusers layout, as
``DiffSegPipeline.from_pretrained`` reads it (``unet/``, ``vae/``, ``scheduler/``, the empty
prompt's ``prompt_embeds.safetensors``; the UNet and VAE in float16 to stay a few MB),
``train_log.csv`` (stage, step, loss) and ``recipe.json``. On a GPU when one is visible, else on
the CPU with ``--threads`` torch threads; a fixed number of steps, so the run is reproducible on
one device.
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import torch

from diffseg.train import Recipe, train_tiny
from eval.datasets.synthetic import SyntheticScenes

NOISE = 0.05  # pixel noise of the hard scenes, training and held-out alike


def hard_scenes(length: int, resolution: int, seed: int) -> SyntheticScenes:
    """The toy model's scenes: 5 region types, 3 per image, hard, pixel noise `NOISE`."""
    return SyntheticScenes(length, resolution, seed, n_class=5, regions=3, noise=NOISE, hard=True)


def _parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    defaults = Recipe()
    parser = argparse.ArgumentParser(prog="python -m eval.tools.train_toy", description=__doc__)
    parser.add_argument("out", type=Path, help="the model directory to write")
    parser.add_argument("--scenes", type=int, default=1024)
    parser.add_argument("--data-seed", type=int, default=100)
    parser.add_argument("--resolution", type=int, default=128)
    parser.add_argument("--threads", type=int, default=1)
    for name, value in defaults.as_dict().items():
        parser.add_argument(f"--{name.replace('_', '-')}", type=type(value), default=value)
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = _parse_args(argv)
    torch.set_num_threads(args.threads)
    recipe = Recipe(**{k: getattr(args, k) for k in Recipe().as_dict()})
    device = "cuda" if torch.cuda.is_available() else "cpu"
    data = hard_scenes(args.scenes, args.resolution, args.data_seed)
    pixels = torch.stack([data[i]["image"] for i in range(len(data))])
    args.out.mkdir(parents=True, exist_ok=True)
    start = time.monotonic()
    with open(args.out / "train_log.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["stage", "step", "loss"])

        def log(stage: str, step: int, loss: float) -> None:
            writer.writerow([stage, step, f"{loss:.6f}"])
            if step % 100 == 0:
                print(
                    f"{stage} step {step}: loss {loss:.5f} ({time.monotonic() - start:.0f}s)",
                    flush=True,
                )
                f.flush()

        pipe = train_tiny(pixels, recipe, log, device)
    pipe.unet.half()
    pipe.vae.half()
    pipe.save_pretrained(args.out, prompt_embeds_only=True)
    settings = {k: v for k, v in vars(args).items() if k != "out"}
    (args.out / "recipe.json").write_text(
        json.dumps({**settings, "device": device, "torch": torch.__version__}, indent=1) + "\n"
    )
    print(f"wrote {args.out} in {time.monotonic() - start:.0f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
