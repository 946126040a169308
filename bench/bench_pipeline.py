"""Per-image time and peak memory of the DiffSeg pipeline, stage by stage.

Stages: VAE encode (with preprocessing), UNet with self-attention capture, aggregation, merging.
The baseline is a plain UNet forward with the default processors on the same latents in the same
run; `capture/plain` is the capture overhead (goal < 1.25x). Models: `tiny` and the real SD 1.4 UNet
and VAE configurations with random weights (`sd14`; no download). `--compare-capture` also times the
two ways of capturing one SD 1.4 64x64 self-attention layer (probabilities @ V, which the processor
uses, versus SDPA for the output plus a separate probability pass).

    python bench/bench_pipeline.py                                   # CPU, tiny + sd14, batch 1
    python bench/bench_pipeline.py --device cuda --batch-sizes 1 4 8 16
    python bench/bench_pipeline.py --append bench/RESULTS.md         # add the table there
    python bench/bench_pipeline.py --device cuda --compile            # torch.compile'd UNet

With `--compile` the capture is first timed eagerly, then the UNet is compiled and the table gets
the compiled times, plus a second table: compiled against eager, and the first compiled call's wall
time (compilation included).

Outside fp32 (fp16 by default on CUDA) the `= fp32` column is the share of pixels whose label
equals that of an fp32 pipeline with the same (seeded) weights on the same images.
"""

from __future__ import annotations

import argparse
import os
import platform
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TypeVar

import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
from timing import timed

from diffseg.aggregate import aggregate_attention
from diffseg.attention import chunked_attention, default_max_elements
from diffseg.devices import resolve_dtype
from diffseg.merge import segment_attention
from diffseg.models import (
    sd14_scheduler_config,
    sd14_unet_config,
    sd14_vae_config,
)
from diffseg.pipeline import DiffSegPipeline
from eval import description

STAGES = ("vae", "unet_plain", "unet_capture", "aggregate", "merge")
T = TypeVar("T")


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


@contextmanager
def _peak_memory(device: torch.device, out: dict[str, float], key: str) -> Iterator[None]:
    """Peak extra memory (MiB) while the block runs: CUDA allocator peak, or sampled CPU RSS."""
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        yield
        torch.cuda.synchronize()
        out[key] = (torch.cuda.max_memory_allocated() - base) / 2**20
        out["total"] = max(out.get("total", 0.0), torch.cuda.max_memory_allocated() / 2**20)
        return
    base = peak = _rss_bytes()
    stop = threading.Event()

    def sample() -> None:
        nonlocal peak
        while not stop.is_set():
            peak = max(peak, _rss_bytes())
            time.sleep(0.002)

    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()
        out[key] = (max(peak, _rss_bytes()) - base) / 2**20


def _timed(fn: Callable[[], T], device: torch.device, times: dict, mem: dict, key: str) -> T:
    with _peak_memory(device, mem, key):
        times[key], result = timed(device, fn)
    return result


MODELS = ("tiny", "tiny_xl", "sd14")


def build(model: str, device: str, dtype: str | None) -> DiffSegPipeline:
    """One of :data:`MODELS`: the tiny random models, or SD 1.4's shapes with random weights."""
    if model in ("tiny", "tiny_xl"):
        return DiffSegPipeline.from_tiny(0, device, dtype, "sdxl" if model == "tiny_xl" else "sd")
    if model != "sd14":
        raise ValueError(f"model must be one of {MODELS}, got {model!r}")
    torch.manual_seed(0)
    unet = UNet2DConditionModel(**sd14_unet_config())
    vae = AutoencoderKL(**sd14_vae_config())
    embeds = torch.randn(1, 77, 768)  # stands in for CLIP's empty-prompt embedding
    scheduler = DDPMScheduler.from_config(sd14_scheduler_config())
    return DiffSegPipeline(unet, vae, scheduler, prompt_embeds=embeds).place(device, dtype)


def bench_images(batch: int, resolution: int) -> torch.Tensor:
    return torch.rand(batch, 3, resolution, resolution, generator=torch.Generator().manual_seed(0))


def run_once(
    pipe: DiffSegPipeline, batch: int, resolution: int, plain_pass: bool = True
) -> tuple[dict, dict, torch.Tensor]:
    """Stage times and peak memory of one batch, and its labels ``(B, R, R)``."""
    images = bench_images(batch, resolution)
    times: dict[str, float] = {}
    mem: dict[str, float] = {}
    dev = pipe.device
    latents = _timed(
        lambda: pipe.encode_images(pipe.preprocess(images, resolution)), dev, times, mem, "vae"
    )
    context = pipe.encode_prompt("").expand(batch, -1, -1)
    t = torch.tensor([300], device=dev)

    def plain() -> None:
        with torch.inference_mode():
            pipe.unet(latents, t, encoder_hidden_states=context)

    if plain_pass:
        _timed(plain, dev, times, mem, "unet_plain")
    else:  # a compiled UNet keeps the capture processors installed: no plain pass to compare
        times["unet_plain"], mem["unet_plain"] = float("nan"), float("nan")
    attention = _timed(lambda: pipe.capture_attention(latents), dev, times, mem, "unet_capture")
    with torch.inference_mode():
        aggregated = _timed(
            lambda: aggregate_attention(list(attention.values())), dev, times, mem, "aggregate"
        )
        labels = _timed(
            lambda: segment_attention(aggregated, out_size=resolution), dev, times, mem, "merge"
        )
    return times, mem, labels.cpu()


def measure(
    pipe: DiffSegPipeline, batch: int, args: argparse.Namespace
) -> tuple[dict, dict, torch.Tensor, float]:
    """Best stage times and worst peak memory over `args.repeats` runs after `args.warmup`, the
    labels of the first timed run, and the wall time of the first warm-up (compilation, if any)."""
    plain = not pipe.compiled
    first = float("nan")
    for i in range(args.warmup):
        seconds, _ = timed(pipe.device, run_once, pipe, batch, args.resolution, plain_pass=plain)
        if i == 0:
            first = seconds
    runs = [run_once(pipe, batch, args.resolution, plain_pass=plain) for _ in range(args.repeats)]
    times = {s: min(r[0][s] for r in runs) for s in STAGES}
    mem = {s: max(r[1][s] for r in runs) for s in [*STAGES, "total"] if s in runs[0][1]}
    return times, mem, runs[0][2], first


def compare_capture(device: torch.device, dtype: torch.dtype, repeats: int) -> list[str]:
    """One SD 1.4 self-attention layer at 64x64 (8 heads of 40): three ways, best of `repeats`."""
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 4096, 8, 40, generator=g).transpose(1, 2) for _ in range(3))
    q, k, v = (x.to(device, dtype) for x in (q, k, v))
    scale = 40**-0.5

    def sdpa_then_probs() -> None:
        F.scaled_dot_product_attention(q, k, v)
        chunked_attention(
            q, k, v[..., :0], scale, None, default_max_elements(device)
        )  # probabilities only

    variants = {
        "SDPA only (no capture)": lambda: F.scaled_dot_product_attention(q, k, v),
        "probs @ V (used)": lambda: chunked_attention(
            q, k, v, scale, None, default_max_elements(device)
        ),
        "SDPA + separate probs": sdpa_then_probs,
        "probs @ V, 2^26-score chunks": lambda: chunked_attention(q, k, v, scale, None, 2**26),
    }
    rows = ["| layer variant | seconds | ratio to SDPA |", "|---|---:|---:|"]
    best = {}
    with torch.inference_mode():
        for name, fn in variants.items():
            best[name] = min(timed(device, fn)[0] for _ in range(repeats))
    base = best["SDPA only (no capture)"]
    rows += [f"| {name} | {s:.3f} | {s / base:.2f}x |" for name, s in best.items()]
    return rows


def report(text: str, title: str, append: Path | None) -> None:
    """Print a result table; with `append`, also add it to that Markdown file under `title`."""
    print("\n" + text)
    if append:
        with open(append, "a") as f:
            f.write(f"\n## {title}\n\n{text}\n")


def machine(device: torch.device) -> str:
    if device.type == "cuda":
        return f"{torch.cuda.get_device_name(device)}, torch {torch.__version__}"
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if "model name" in line)
    except (OSError, StopIteration):
        pass
    return f"{cpu}, {torch.get_num_threads()} threads, torch {torch.__version__}"


def main() -> None:
    parser = argparse.ArgumentParser(description=description(__doc__))
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default=None, help="default: fp32 on CPU, fp16 on CUDA")
    parser.add_argument("--models", nargs="+", default=["tiny", "sd14"], choices=["tiny", "sd14"])
    parser.add_argument("--batch-sizes", nargs="+", type=int, default=[1])
    parser.add_argument("--resolution", type=int, default=512)
    parser.add_argument("--warmup", type=int, default=1, help="untimed runs per configuration")
    parser.add_argument("--repeats", type=int, default=1, help="timed runs (best is reported)")
    parser.add_argument("--compare-capture", action="store_true")
    parser.add_argument("--compile", action="store_true", help="torch.compile the UNet")
    parser.add_argument("--append", type=Path, help="append the tables to this Markdown file")
    args = parser.parse_args()

    device = torch.device(args.device)
    header = (
        "| model | batch | dtype | VAE s/img | UNet plain s/img | UNet capture s/img | "
        "capture/plain | aggregate s/img | merge s/img | images/s | = fp32 % | peak MiB (VAE / "
        "plain / capture / agg / merge) | peak MiB total |"
    )
    rows = [header, "|" + "---|" * 2 + "---|" + "---:|" * 10]
    compile_rows = [
        "| model | batch | eager capture s/img | compiled capture s/img | compiled / eager | "
        "first compiled call s |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for model in args.models:
        pipe = build(model, args.device, args.dtype)
        # Same seeded weights in fp32: the reference labels for the agreement column.
        ref = build(model, args.device, "float32") if pipe.dtype != torch.float32 else None
        eager = {}
        if args.compile:  # the baseline: the same capture, not compiled, in this run
            for batch in args.batch_sizes:
                eager[batch] = measure(pipe, batch, args)[0]["unet_capture"] / batch
            pipe.compile_unet()
        for batch in args.batch_sizes:
            times, mem, labels, first = measure(pipe, batch, args)
            total = sum(times[s] for s in STAGES if s != "unet_plain")
            per = {s: times[s] / batch for s in STAGES}
            dtype = str(pipe.dtype).removeprefix("torch.")
            same = 100.0
            if ref is not None:
                with torch.inference_mode():
                    expected = ref(bench_images(batch, args.resolution), resolution=args.resolution)
                same = (labels == expected).double().mean().item() * 100
            rows.append(
                f"| {model} | {batch} | {dtype} | {per['vae']:.3f} | {per['unet_plain']:.3f} | "
                f"{per['unet_capture']:.3f} | {times['unet_capture'] / times['unet_plain']:.2f}x | "
                f"{per['aggregate']:.3f} | {per['merge']:.3f} | {batch / total:.2f} | "
                f"{same:.2f} | "
                + " / ".join(f"{mem[s]:.0f}" for s in STAGES)
                + f" | {mem.get('total', float('nan')):.0f} |"
            )
            print(rows[-1], flush=True)
            if args.compile:
                compile_rows.append(
                    f"| {model} | {batch} | {eager[batch]:.3f} | {per['unet_capture']:.3f} | "
                    f"{per['unet_capture'] / eager[batch]:.2f}x | {first:.1f} |"
                )
                print(compile_rows[-1], flush=True)
        del pipe, ref
    lines = [
        f"Machine: {machine(device)}; resolution {args.resolution}; best of {args.repeats} "
        f"after {args.warmup} warm-up run(s). Peak memory: extra over the stage's start "
        f"({'CUDA allocator' if device.type == 'cuda' else 'sampled process RSS'}); total: "
        "the CUDA allocator's peak, weights included (CUDA only)."
        + (" UNet torch.compile'd." if args.compile else ""),
        "",
        *rows,
    ]
    if args.compile:
        lines += [
            "",
            "torch.compile (default inductor backend) against the same capture run eagerly first; "
            "the first compiled call includes compilation:",
            "",
            *compile_rows,
        ]
    if args.compare_capture:
        dtype = resolve_dtype(args.dtype, device)
        lines += ["", "Capture variants, one SD 1.4 layer at 64x64 (batch 1):", ""]
        lines += compare_capture(device, dtype, repeats=3)
    report("\n".join(lines), f"Pipeline ({args.device})", args.append)


if __name__ == "__main__":
    main()
