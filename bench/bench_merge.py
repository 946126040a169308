"""Benchmark DiffSeg merging: `segment_attention` (its KL in float64, and in float32 with the float64
re-check near the threshold: `kl_dtype`) versus the direct elementwise reference.

One (1, 64, 64, 64, 64) aggregated map built from peaked synthetic attention at 4 resolutions,
16x16 anchors, 3 merging iterations. Each method runs in a fresh subprocess that loads the saved
input, so its peak resident memory (`VmHWM`: the whole process, Python and torch included) is
its own; on CUDA the peak is `torch.cuda.max_memory_allocated`. Labels are compared exactly.
It also prints the share of the aggregated maps holding an entry of at most 2^-25, which float16
rounds to 0 (`segmenter.first_merge_dtype=float16`, the official arithmetic: such a map's KL is
nan, so it never merges, and an anchor with one gives no proposal). A last table gives the share
of pixels labelled as from float32 when the attention is rounded to float16 or bfloat16 before
aggregating (as the attention cache stores it) or its scores are computed in them (as a
half-precision UNet does).

    .venv/bin/python bench/bench_merge.py [--device cuda] [--ref-dtype float64] [--repeat 3]
        [--skip-reference]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
from timing import timed

from diffseg.aggregate import aggregate_attention
from diffseg.kl import kl_matrix
from diffseg.merge import sampling_grid, segment_attention
from diffseg.reference import realistic_attention, reference_segment
from eval import description

THRESHOLDS = (1.1, 1.1, 1.1)
FLIP_THRESHOLDS = (0.5, 0.9, 1.1, 1.5)


def _peak_rss_mib() -> float:
    """This process's peak resident memory. Not `ru_maxrss`: in a child of `subprocess` it
    reports the parent's high-water mark when that is higher; `VmHWM` is the child's own."""
    with open("/proc/self/status") as f:
        kib = next(int(line.split()[1]) for line in f if line.startswith("VmHWM:"))
    return kib / 1024


def _child(method: str, path: str, device: str, ref_dtype: str, repeat: int) -> None:
    """Run one method on the saved input and print a JSON line with time and peak memory."""
    aggregated = torch.load(path).to(device)

    def segment() -> torch.Tensor:
        if method in ("float64", "float32"):
            return segment_attention(aggregated, THRESHOLDS, num_points=16, kl_dtype=method)[0]
        dtype = getattr(torch, ref_dtype)
        return reference_segment(aggregated[0], THRESHOLDS, num_points=16, dtype=dtype)

    runs = [timed(device, segment) for _ in range(repeat)]
    times, labels = [t for t, _ in runs], runs[-1][1]
    cuda = device == "cuda"
    peak_mib = torch.cuda.max_memory_allocated() / 2**20 if cuda else _peak_rss_mib()
    torch.save(labels.cpu(), f"{path}.{method}.labels")
    print(json.dumps({"seconds": sorted(times)[len(times) // 2], "peak_mib": peak_mib}))


def _run(method: str, path: str, args: argparse.Namespace, repeat: int) -> dict:
    cmd = [sys.executable, __file__, "--child", method, "--input", path]
    cmd += ["--device", args.device, "--ref-dtype", args.ref_dtype, "--repeat", str(repeat)]
    done = subprocess.run(cmd, check=True, capture_output=True, text=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=description(__doc__))
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--ref-dtype", default="float64", choices=["float32", "float64"])
    parser.add_argument(
        "--repeat", type=int, default=3, help="runs of each matrix-KL path (median)"
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--skip-reference", action="store_true", help="only the two KL paths")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--input", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        _child(args.child, args.input, args.device, args.ref_dtype, args.repeat)
        return
    # Here, not at the top: the children's peak memory must not include diffusers' import.
    from bench_pipeline import machine

    aggregated = aggregate_attention(realistic_attention(batch=1, size=64, seed=args.seed))
    with tempfile.TemporaryDirectory() as tmp:
        path = str(Path(tmp) / "aggregated.pt")
        torch.save(aggregated, path)
        methods = ["float64", "float32"] + ([] if args.skip_reference else ["reference"])
        results = {m: _run(m, path, args, 1 if m == "reference" else args.repeat) for m in methods}
        labels = {m: torch.load(f"{path}.{m}.labels") for m in methods}

    maps = aggregated[0].reshape(-1, 64, 64)
    grid = sampling_grid(16, 64)
    anchors = maps[grid[:, 0] * 64 + grid[:, 1]]
    kl_seconds = {}
    kl = {}
    for dtype in (torch.float64, torch.float32):
        kl_seconds[dtype], kl[dtype] = timed(maps.device, kl_matrix, anchors, maps, dtype=dtype)
    flips = {
        t: int(((kl[torch.float32] < t) != (kl[torch.float64] < t)).sum()) for t in FLIP_THRESHOLDS
    }

    underflow = (maps.flatten(1) <= 2**-25).any(dim=1).double().mean().item() * 100
    print(f"device: {args.device} ({machine(torch.device(args.device))})")
    print("input: 1 x 64^4 aggregated attention, 16x16 anchors, kl_threshold (1.1, 1.1, 1.1)")
    print()
    print(
        "| method | time (s) | peak memory (MiB) | speed-up on float64 | labels identical to "
        "float64 | segments |"
    )
    print("|---|---|---|---|---|---|")
    mem = "CUDA max allocated" if args.device == "cuda" else "process max RSS"
    names = {
        "float64": "segment_attention (matrix KL, float64)",
        "float32": "segment_attention (matrix KL, float32 + float64 re-check)",
        "reference": f"reference (elementwise KL, {args.ref_dtype})",
    }
    for method, result in results.items():
        ratio = results["float64"]["seconds"] / result["seconds"]
        same = torch.equal(labels[method], labels["float64"])
        print(
            f"| {names[method]} | {result['seconds']:.2f} | {result['peak_mib']:.0f} | "
            f"{ratio:.2f}x | {same} | {len(labels[method].unique())} |"
        )
    print()
    print(f"peak memory = {mem}; matrix KL times = median of {args.repeat} runs, reference = 1 run")
    print(
        f"iteration-1 threshold decisions (of {kl[torch.float64].numel()}) where float32 matrix "
        f"KL differs from float64, per threshold: {flips}"
    )
    print(
        f"iteration-1 matrix KL time: float64 {kl_seconds[torch.float64]:.2f} s, "
        f"float32 {kl_seconds[torch.float32]:.2f} s"
    )
    print(
        f"aggregated maps with an entry <= 2^-25 (0 in float16; nan KL under "
        f"first_merge_dtype=float16): {underflow:.1f}% of {len(maps)}"
    )
    print()
    print(storage_precision(args.seed))


def storage_precision(seed: int) -> str:
    """Labels from half-precision attention against the labels from float32, as the share of equal
    pixels: the head-averaged maps rounded to a 2-byte type (what the attention cache stores), and
    the scores ``Q K^T`` computed in it (what a half-precision UNet's capture does; its softmax is
    float32)."""

    def labels(attention: list[torch.Tensor]) -> torch.Tensor:
        return segment_attention(aggregate_attention(attention), THRESHOLDS, num_points=16)[0]

    exact = [a.mean(dim=1) for a in realistic_attention(batch=1, size=64, seed=seed)]
    expected = labels(exact)
    rows = [
        "| half precision in | segments | pixels labelled as from float32 (%) |",
        "|---|---:|---:|",
        f"| nothing (float32) | {len(expected.unique())} | 100.00 |",
    ]
    for dtype in (torch.float16, torch.bfloat16):
        name = str(dtype).removeprefix("torch.")
        variants = {
            f"stored maps, {name}": [a.to(dtype).float() for a in exact],
            f"scores Q K^T, {name}": realistic_attention(batch=1, size=64, seed=seed, dtype=dtype),
        }
        for what, attention in variants.items():
            got = labels(attention)
            same = (got == expected).double().mean().item() * 100
            rows.append(f"| {what} | {len(got.unique())} | {same:.2f} |")
    return "\n".join(rows)


if __name__ == "__main__":
    main()
