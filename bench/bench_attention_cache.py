"""What the attention cache saves on a merging sweep point: time per image of the plain pipeline,
of a cache miss (compute + store) and of a cache hit (read + aggregate + merge), with the stored
size and the share of pixels whose label equals the uncached pipeline's; the hit includes the
check of each entry's key and CRC-32, also timed alone (``check s/img``, ``entry_checksum``).

    python bench/bench_attention_cache.py                      # CPU: tiny at 512, sd14 config at 512
    python bench/bench_attention_cache.py --device cuda --models sd14 --batch 8
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import torch
from bench_pipeline import bench_images, build, machine, report
from safetensors.torch import load_file
from timing import timed

from eval import description
from eval.models.attention_cache import (
    AttentionCache,
    CachedAttentionPipeline,
    bytes_per_image,
    entry_checksum,
)


def main() -> None:
    parser = argparse.ArgumentParser(description=description(__doc__))
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default=None)
    parser.add_argument("--models", nargs="+", default=["tiny", "sd14"], choices=["tiny", "sd14"])
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--resolution", type=int, default=512)
    parser.add_argument("--cache-dtype", default="bfloat16")
    parser.add_argument("--append", type=Path, help="append the table to this Markdown file")
    args = parser.parse_args()
    device = torch.device(args.device)
    rows = [
        "| model | batch | plain s/img | miss s/img | hit s/img | plain/hit | MiB/img stored | "
        "labels = uncached % | check s/img | check/hit |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    images = bench_images(args.batch, args.resolution)
    call = {"resolution": args.resolution}
    for model in args.models:
        pipe = build(model, args.device, args.dtype)
        pipe(images, **call)  # warm-up
        plain, expected = timed(device, pipe, images, **call)
        with tempfile.TemporaryDirectory() as tmp:
            cache = AttentionCache(tmp, {"model": model}, args.cache_dtype)
            cached = CachedAttentionPipeline(pipe, cache)
            miss, _ = timed(device, cached, images, **call)
            hit, labels = timed(device, cached, images, **call)
            assert (cache.hits, cache.misses) == (args.batch, args.batch)
            files = list(Path(tmp).rglob("*.safetensors"))
            stored = sum(f.stat().st_size for f in files)
            entries = [load_file(f) for f in files]
            check = sum(timed("cpu", entry_checksum, tensors)[0] for tensors in entries)
        same = (labels == expected).double().mean().item() * 100
        b = args.batch
        rows.append(
            f"| {model} | {b} | {plain / b:.3f} | {miss / b:.3f} | {hit / b:.3f} | "
            f"{plain / hit:.1f}x | {stored / b / 2**20:.1f} | {same:.2f} | {check / b:.4f} | "
            f"{check / hit:.2f} |"
        )
        print(rows[-1], flush=True)
        expected_bytes = bytes_per_image(pipe, args.resolution, args.cache_dtype)
        assert abs(stored / b - expected_bytes) < 2**16, (stored / b, expected_bytes)
    text = "\n".join(
        [
            f"Machine: {machine(device)}; resolution {args.resolution}; cache dtype "
            f"{args.cache_dtype}; one timed run each after a warm-up of the plain pipeline.",
            "",
            *rows,
        ]
    )
    report(text, f"Attention cache ({args.device})", args.append)


if __name__ == "__main__":
    main()
