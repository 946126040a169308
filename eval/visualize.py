"""Pictures of segmentations: colour maps with segment boundaries, side-by-side comparisons and the
per-class IoU chart. Matplotlib through its object API on the Agg canvas (no pyplot state, no
display needed), so it runs headless and inside DataLoader workers alike.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from matplotlib import colormaps
from matplotlib.figure import Figure
from PIL import Image

from eval.atomic import atomic_open

BOUNDARY_COLOR = (255, 255, 255)  # white: visible on every jet colour
IGNORE_COLOR = (0, 0, 0)


def _numpy(x: np.ndarray | torch.Tensor) -> np.ndarray:
    return x.detach().cpu().numpy() if isinstance(x, torch.Tensor) else np.asarray(x)


def find_edges(labels: np.ndarray | torch.Tensor) -> np.ndarray:
    """Segment boundaries as the official ``find_edges``: a pixel whose label differs from any of
    its four neighbours. As there, the one-pixel frame of the image is never a boundary.

    Args:
        labels: ``(H, W)`` integer labels.

    Returns:
        bool ``(H, W)``.
    """
    m = _numpy(labels)
    if m.ndim != 2:
        raise ValueError(f"labels must be (H, W), got shape {m.shape}")
    edges = np.zeros(m.shape, dtype=bool)
    c = m[1:-1, 1:-1]
    edges[1:-1, 1:-1] = (
        (c != m[:-2, 1:-1]) | (c != m[2:, 1:-1]) | (c != m[1:-1, :-2]) | (c != m[1:-1, 2:])
    )
    return edges


def to_uint8_image(image: np.ndarray | torch.Tensor) -> np.ndarray:
    """``(3, H, W)`` float in [0, 1] (a dataset item's image) -> ``(H, W, 3)`` uint8."""
    a = _numpy(image)
    if a.ndim != 3 or a.shape[0] != 3:
        raise ValueError(f"image must be (3, H, W) in [0, 1], got shape {a.shape}")
    return (np.clip(a.transpose(1, 2, 0), 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)


def colorize(labels: np.ndarray | torch.Tensor, n_colors: int | None = None) -> np.ndarray:
    """``(H, W)`` labels -> ``(H, W, 3)`` uint8 colours; negative labels (ignored) are black.

    Colours come from matplotlib's ``jet`` spread over ``n_colors`` (default: the largest label + 1),
    like the official pictures.
    """
    m = _numpy(labels).astype(np.int64)
    n = int(n_colors if n_colors is not None else max(int(m.max(initial=0)) + 1, 1))
    palette = (colormaps["jet"](np.linspace(0.0, 1.0, max(n, 2)))[:, :3] * 255).astype(np.uint8)
    out = palette[np.clip(m, 0, len(palette) - 1)]
    out[m < 0] = IGNORE_COLOR
    return out


def overlay(
    image: np.ndarray,
    labels: np.ndarray | torch.Tensor,
    alpha: float = 0.5,
    n_colors: int | None = None,
) -> np.ndarray:
    """Blend ``colorize(labels)`` over ``image (H, W, 3) uint8`` and draw the boundaries."""
    m = _numpy(labels)
    blended = (1 - alpha) * image.astype(np.float32) + alpha * colorize(m, n_colors)
    out = blended.round().astype(np.uint8)
    out[find_edges(m)] = BOUNDARY_COLOR
    return out


def segments_text(n: int) -> str:
    """``"1 segment"``, ``"3 segments"``."""
    return f"{n} segment" + ("" if n == 1 else "s")


def _save(fig: Figure, path: Path) -> None:
    with atomic_open(path, "wb") as f:
        fig.savefig(f, format="png", bbox_inches="tight", dpi=100)


def _panels(pictures: Sequence[tuple[str, np.ndarray]], title: str | None) -> Figure:
    fig = Figure(figsize=(4 * len(pictures), 4.4))
    for i, (name, picture) in enumerate(pictures):
        ax = fig.add_subplot(1, len(pictures), i + 1)
        ax.imshow(picture, interpolation="nearest")
        ax.set_title(name)
        ax.axis("off")
    if title:
        fig.suptitle(title)
    return fig


def save_comparison(
    image: np.ndarray | torch.Tensor,
    label: np.ndarray | torch.Tensor,
    pred: np.ndarray | torch.Tensor,
    path: str | Path,
    n_class: int,
    title: str | None = None,
) -> None:
    """Write ``image | ground truth | prediction`` (both with boundaries) to ``path`` (PNG).

    Args:
        image: ``(3, H, W)`` float in [0, 1].
        label: ``(H, W)`` class ids, ``-1`` ignored (drawn black).
        pred: ``(H, W)`` segment ids.
        n_class: number of classes (fixes the ground truth's colours across images).
    """
    rgb = to_uint8_image(image)
    truth = colorize(label, n_class)
    truth[find_edges(label)] = BOUNDARY_COLOR
    n_seg = len(np.unique(_numpy(pred)))
    fig = _panels(
        [
            ("image", rgb),
            ("ground truth", truth),
            (f"prediction ({segments_text(n_seg)})", overlay(rgb, pred)),
        ],
        title,
    )
    _save(fig, Path(path))


def save_segmentation(
    image: np.ndarray, labels: np.ndarray | torch.Tensor, path: str | Path
) -> None:
    """Write ``image | overlay with boundaries`` to ``path`` (PNG); ``image`` is ``(H, W, 3)`` uint8."""
    n_seg = len(np.unique(_numpy(labels)))
    fig = _panels([("image", image), (segments_text(n_seg), overlay(image, labels))], None)
    _save(fig, Path(path))


def plot_class_iou(
    class_names: Sequence[str], iou: Sequence[float], path: str | Path, title: str | None = None
) -> None:
    """Horizontal bar chart of per-class IoU (in %), classes in dataset order; nan shown as "n/a"."""
    values = np.asarray(iou, dtype=np.float64) * 100
    n = len(class_names)
    fig = Figure(figsize=(7, max(2.5, 0.22 * n + 1.2)))
    ax = fig.add_subplot(1, 1, 1)
    y = np.arange(n)
    ax.barh(y, np.nan_to_num(values), color="tab:blue")
    for i in np.flatnonzero(np.isnan(values)):
        ax.text(0.5, i, "n/a", va="center", fontsize=7, color="grey")
    ax.set_yticks(y, labels=list(class_names), fontsize=7 if n > 30 else 9)
    ax.invert_yaxis()
    ax.set_xlim(0, 100)
    ax.set_xlabel("IoU (%)")
    ax.grid(axis="x", alpha=0.3)
    if title:
        ax.set_title(title)
    _save(fig, Path(path))


def save_label_png(labels: np.ndarray | torch.Tensor, path: str | Path) -> str:
    """Write ``(H, W)`` non-negative labels as a grey PNG: 8-bit when every label is below 256,
    else 16-bit. The pixel values are the labels. Returns the bit depth used ("8-bit"/"16-bit")."""
    m = _numpy(labels)
    if m.ndim != 2 or m.min(initial=0) < 0 or m.max(initial=0) >= 2**16:
        raise ValueError(f"labels must be (H, W) in [0, 65535], got shape {m.shape}")
    depth = "8-bit" if m.max(initial=0) < 256 else "16-bit"
    with atomic_open(path, "wb") as f:
        Image.fromarray(m.astype(np.uint8 if depth == "8-bit" else np.uint16)).save(f, format="PNG")
    return depth
