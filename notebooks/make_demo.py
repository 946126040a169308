"""Writes ``notebooks/diffseg_demo.ipynb`` (without outputs): ``python notebooks/make_demo.py``.

The notebook is generated so that its source stays reviewable as Python; edit the cells here and
re-run this script. ``tests/notebooks/test_notebook.py`` executes the written notebook.
"""

from __future__ import annotations

from pathlib import Path

import nbformat
from nbformat.v4 import new_code_cell, new_markdown_cell, new_notebook

CELLS = [
    (
        "md",
        """# DiffSeg step by step

DiffSeg (Tian et al., CVPR 2024) segments an image without training: one UNet pass of Stable
Diffusion, the self-attention maps of every layer aggregated to 64x64 (here 16x16), then maps
merged iteratively by KL divergence into proposals, whose argmax gives the segments.

This notebook walks through those steps on a hard synthetic scene with the **toy trained model**
(`models/tiny_trained`, `model=tiny_trained`: the SD-shaped tiny model trained for 20 CPU minutes
on other such scenes; a toy, not Stable Diffusion), then scores runs and shows a table from a
ledger. It runs offline in seconds. For real segments replace the pipeline
with `DiffSegPipeline.from_pretrained("CompVis/stable-diffusion-v1-4")` (a GPU helps) and the
image with your own.""",
    ),
    (
        "code",
        """import sys
import tempfile
import warnings
from pathlib import Path

# tqdm's notebook bars (imported with diffusers) would ask for ipywidgets; no bar is shown here.
warnings.filterwarnings("ignore", "IProgress not found")

import matplotlib.pyplot as plt
import torch
from diffusers.utils import logging as diffusers_logging
from IPython.display import Markdown, display
from omegaconf import OmegaConf

# Run from the repository root or from notebooks/.
ROOT = Path.cwd().parent if Path.cwd().name == "notebooks" else Path.cwd()
sys.path.insert(0, str(ROOT))

from diffseg.merge import merge_attention, proposals_to_labels
from diffseg.pipeline import DiffSegPipeline
from eval.datasets.synthetic import SyntheticScenes
from eval.scoring.metrics import HungarianIoU, image_scores
from eval.results.visualize import colorize

torch.manual_seed(0)
RES = 128  # the toy model's input side; SD 1.4 uses 512
# Loading the model's three local parts takes a second: no progress bar.
diffusers_logging.disable_progress_bar()""",
    ),
    (
        "md",
        "## An image\n\nA hard procedural scene (regions share colours, differ by texture) with exact masks.",
    ),
    (
        "code",
        """scenes = SyntheticScenes(length=2, resolution=RES, seed=7, noise=0.05, hard=True)
item = scenes[0]
fig, axes = plt.subplots(1, 2, figsize=(6, 3))
axes[0].imshow(item["image"].permute(1, 2, 0))
axes[0].set_title(item["id"])
axes[1].imshow(colorize(item["label"]))
axes[1].set_title("ground truth")
for ax in axes:
    ax.axis("off")
plt.show()""",
    ),
    (
        "md",
        """## Self-attention

One UNet pass at timestep 300; `return_intermediates=True` keeps the head- and block-averaged
self-attention of every resolution `r`: a `(B, r*r, r*r)` tensor whose row `q` is where query
pixel `q` attends. Below, three query pixels (the white dots) at every resolution.""",
    ),
    (
        "code",
        """pipe = DiffSegPipeline.from_pretrained(ROOT / "models" / "tiny_trained", dtype="float32")
out = pipe(item["image"][None], resolution=RES, num_points=8, return_intermediates=True)
print({r: tuple(a.shape) for r, a in out.attention.items()})

queries = [(0.25, 0.25), (0.5, 0.7), (0.8, 0.4)]  # (y, x) as fractions of the side
resolutions = sorted(out.attention, reverse=True)
fig, axes = plt.subplots(len(resolutions), len(queries), figsize=(7, 2.2 * len(resolutions)))
for row, r in enumerate(resolutions):
    for col, (fy, fx) in enumerate(queries):
        y, x = int(fy * r), int(fx * r)
        ax = axes[row, col]
        ax.imshow(out.attention[r][0, y * r + x].reshape(r, r).cpu())
        ax.scatter([x], [y], c="white", s=12)
        ax.set_title(f"{r}x{r}, query ({y}, {x})", fontsize=8)
        ax.axis("off")
plt.tight_layout()
plt.show()""",
    ),
    (
        "md",
        """## Aggregation

All resolutions are upsampled to the largest one `S` and summed with weights proportional to
resolution: `aggregated[b, i, j]` is the `(S, S)` attention map of pixel `(i, j)`.""",
    ),
    (
        "code",
        """agg = out.aggregated[0]
s = agg.shape[0]
fig, axes = plt.subplots(1, len(queries), figsize=(7, 2.4))
for ax, (fy, fx) in zip(axes, queries):
    y, x = int(fy * s), int(fx * s)
    ax.imshow(agg[y, x].cpu())
    ax.scatter([x], [y], c="white", s=12)
    ax.set_title(f"aggregated, pixel ({y}, {x})", fontsize=8)
    ax.axis("off")
plt.show()""",
    ),
    (
        "md",
        """## Merging, iteration by iteration

Iteration 1 takes `num_points**2` anchors on a grid and averages, for each, every map whose
symmetric KL to it is below the threshold; later iterations merge those proposals among
themselves. `merge_attention` with the first `n` thresholds stops after iteration `n`.

The toy model's attention is still nearly uniform by SD's standards, so the paper's threshold
1.1 merges everything into one segment; its own threshold, chosen on its training scenes, is 0.02.
(With SD 1.4 use 1.1, or 0.9 on Cityscapes; the random `from_tiny()` model gives one segment at
any threshold.)""",
    ),
    (
        "code",
        """# Its own threshold, from the config `python -m eval model=tiny_trained` uses.
KL = tuple(OmegaConf.load(ROOT / "conf/segmenter/tuned/model/diffseg_tiny_trained.yaml").kl_threshold)
fig, axes = plt.subplots(1, 3, figsize=(8, 2.8))
for n, ax in zip((1, 2, 3), axes):
    proposals = merge_attention(out.aggregated, KL[:n], num_points=8)[0]
    labels = proposals_to_labels(proposals, RES)
    ax.imshow(colorize(labels))
    ax.set_title(f"after iteration {n}: {proposals.shape[0]} proposals", fontsize=8)
    ax.axis("off")
plt.show()""",
    ),
    (
        "md",
        """## Proposals and segments

Each proposal is an `(S, S)` attention map; the segments are the argmax over proposals after
bilinear upsampling to the image size (`proposals_to_labels`).""",
    ),
    (
        "code",
        """proposals = merge_attention(out.aggregated, KL, num_points=8)[0]
labels = proposals_to_labels(proposals, RES)
shown = min(len(proposals), 6)
fig, axes = plt.subplots(1, shown + 1, figsize=(2 * (shown + 1), 2.2))
for k in range(shown):
    axes[k].imshow(proposals[k].cpu())
    axes[k].set_title(f"proposal {k}", fontsize=8)
    axes[k].axis("off")
axes[-1].imshow(colorize(labels))
axes[-1].set_title("segments", fontsize=8)
axes[-1].axis("off")
plt.show()
print(image_scores(labels, item["label"], scenes.n_class))""",
    ),
    (
        "md",
        """## Scoring and the ledger

`eval.scoring.metrics.HungarianIoU` matches each image's segments to classes (Hungarian) and sums the
counts over the dataset. Every `python -m eval ...` run appends one row to `outputs/ledger.csv`;
`eval.report.tables` turns the ledger into the paper tables. Here we score both scenes and write a row
with the ledger's columns into a temporary ledger (the command line does the same, e.g.
`make demo`, or `python -m eval model=tiny_trained dataset.hard=true logger=csv`).""",
    ),
    (
        "code",
        """from datetime import datetime, timezone

from eval.results import ledger as ledger_io

metric = HungarianIoU(scenes.n_class)
for i in range(len(scenes)):
    scene = scenes[i]
    pred = pipe(scene["image"][None], resolution=RES, kl_threshold=KL, num_points=8)
    metric.update(pred, scene["label"][None])
scores = metric.compute()

# A few of the ledger's columns; a command-line run records every setting (eval/results/record.py).
row = {
    "run_id": "notebook-demo",
    "timestamp": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    "protocol": "diffseg",
    "dataset": "synthetic",
    "split": "val",
    "model": "tiny_trained",
    "dtype": "float32",
    "segmenter": "diffseg",
    "segmenter_settings": {"name": "diffseg", "kl_threshold": list(KL), "num_points": 8},
    "kl_threshold": list(KL),
    "resolution": RES,
    "n_images": len(scenes),
    "pixel_accuracy": float(scores["pixel_accuracy"]),
    "miou": float(scores["miou"]),
}
ledger = Path(tempfile.mkdtemp()) / "ledger.csv"
ledger_io.append(ledger, ledger_io.encode_row(row))
print(ledger.read_text())""",
    ),
    (
        "md",
        """The paper tables with `eval.report.tables`: a cell is filled only by a run whose every setting matches
the published one, so the toy model on synthetic scenes fills none (the cells say `not run`), and
`explain` says why for each ledger row.""",
    ),
    (
        "code",
        """from eval.report import tables

rendered = tables.render_tables(ledger)
display(Markdown(rendered["table1"][".md"]))
print("\\n".join(tables.explain(tables.read_ledger(ledger))))""",
    ),
]


def build() -> nbformat.NotebookNode:
    cells = [
        new_markdown_cell(text) if kind == "md" else new_code_cell(text) for kind, text in CELLS
    ]
    nb = new_notebook(cells=cells)
    nb.metadata["kernelspec"] = {
        "name": "python3",
        "display_name": "Python 3",
        "language": "python",
    }
    nb.metadata["language_info"] = {"name": "python"}
    return nb


def main() -> None:
    path = Path(__file__).with_name("diffseg_demo.ipynb")
    nbformat.write(build(), path)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
