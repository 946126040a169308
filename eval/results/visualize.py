"""Pictures of segmentations: categorical colours with a legend, segment boundaries, side-by-side
comparisons, palette label PNGs and the per-class IoU chart. Matplotlib through its object API on
the Agg canvas (no pyplot state, no display needed), so it runs headless and inside DataLoader
workers alike.

Colours: id ``k`` (a class of the ground truth, or a segment where there is none) always gets
``categorical_palette()[k]``, so a class keeps its colour across pictures; ignored pixels are
black and, in a comparison, predicted segments that the image's Hungarian matching gave no class
are grey (the palette has no grey).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from matplotlib import colormaps
from matplotlib.colors import hsv_to_rgb
from matplotlib.figure import Figure
from matplotlib.patches import Patch
from PIL import Image

from eval.atomic import atomic_open
from eval.scoring.matching import matched_classes

BOUNDARY_COLOR = (255, 255, 255)  # white: visible on every palette colour and on black
IGNORE_COLOR = (0, 0, 0)
UNMATCHED_COLOR = (128, 128, 128)
PANEL_INCHES = 4.0
GOLDEN = (math.sqrt(5) - 1) / 2


def _numpy(x: np.ndarray | torch.Tensor) -> np.ndarray:
    return x.detach().cpu().numpy() if isinstance(x, torch.Tensor) else np.asarray(x)


def categorical_palette(n: int = 256) -> np.ndarray:
    """``(n, 3)`` uint8 colours for ids ``0..n-1``: matplotlib's tab20 without its two greys
    (the ten strong shades first, then the light ones), then hues stepped by the golden ratio
    at alternating saturation and value, so neighbouring ids never look alike."""
    tab = colormaps["tab20"].colors
    base = [tab[i] for i in range(0, 20, 2) if i != 14] + [
        tab[i] for i in range(1, 20, 2) if i != 15
    ]
    extra = [
        hsv_to_rgb(((k * GOLDEN) % 1.0, 0.9 - 0.3 * (k % 2), 0.95 - 0.25 * ((k // 2) % 2)))
        for k in range(max(0, n - len(base)))
    ]
    return (np.array([*base, *extra])[:n] * 255).round().astype(np.uint8)


PALETTE = categorical_palette()


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


def boundaries(labels: np.ndarray | torch.Tensor, width: int = 1) -> np.ndarray:
    """:func:`find_edges` widened to ``width`` pixels (a ``width x width`` square dilation, odd
    widths centred), so the lines survive the picture's downscaling.

    Args:
        labels: ``(H, W)`` integer labels.

    Returns:
        bool ``(H, W)``.
    """
    edges = find_edges(labels)
    if width <= 1:
        return edges
    pooled = torch.nn.functional.max_pool2d(
        torch.from_numpy(edges)[None, None].float(), width, stride=1, padding=width // 2
    )
    return pooled[0, 0, : edges.shape[0], : edges.shape[1]].numpy() > 0


def _edge_width(shape: Sequence[int], dpi: float) -> int:
    """Boundary width in image pixels that shows as about 2 pixels in a panel of ``dpi``."""
    return max(1, round(2 * max(shape) / (PANEL_INCHES * dpi)))


def _dpi(shape: Sequence[int]) -> float:
    """Resolution that shows a 512 image at its own size, within 100..160 dpi."""
    return min(160.0, max(100.0, max(shape) / PANEL_INCHES))


def to_uint8_image(image: np.ndarray | torch.Tensor) -> np.ndarray:
    """``(3, H, W)`` float in [0, 1] (a dataset item's image) -> ``(H, W, 3)`` uint8."""
    a = _numpy(image)
    if a.ndim != 3 or a.shape[0] != 3:
        raise ValueError(f"image must be (3, H, W) in [0, 1], got shape {a.shape}")
    return (np.clip(a.transpose(1, 2, 0), 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)


def colorize(labels: np.ndarray | torch.Tensor) -> np.ndarray:
    """``(H, W)`` labels -> ``(H, W, 3)`` uint8 palette colours; negative labels (ignored) are
    black; ids from 256 on reuse the palette."""
    m = _numpy(labels).astype(np.int64)
    out = PALETTE[m % len(PALETTE)]
    out[m < 0] = IGNORE_COLOR
    return out


def color_prediction(pred: np.ndarray | torch.Tensor, seg_class: np.ndarray) -> np.ndarray:
    """``(H, W)`` segment ids -> ``(H, W, 3)`` uint8: each segment in its matched class's colour
    (``seg_class[id]``, see :func:`eval.scoring.matching.matched_classes`), unmatched ones grey."""
    classes = seg_class[_numpy(pred).astype(np.int64)]
    out = colorize(classes)
    out[classes < 0] = UNMATCHED_COLOR
    return out


def legend_entries(
    label: np.ndarray | torch.Tensor, class_names: Sequence[str], unmatched: bool = False
) -> list[tuple[str, tuple[int, int, int]]]:
    """``(name, colour)`` of each class present in ``label (H, W)``, in class order, then
    "ignored" when some pixel is ignored (negative or not a class) and "unmatched segment" when
    ``unmatched``."""
    m = _numpy(label).astype(np.int64)
    n = len(class_names)
    present = np.unique(m)
    entries = [(class_names[c], tuple(int(v) for v in PALETTE[c % len(PALETTE)]))
               for c in present if 0 <= c < n]  # fmt: skip
    if ((present < 0) | (present >= n)).any():
        entries.append(("ignored", IGNORE_COLOR))
    if unmatched:
        entries.append(("unmatched segment", UNMATCHED_COLOR))
    return entries


def overlay(image: np.ndarray, labels: np.ndarray | torch.Tensor, alpha: float = 0.5) -> np.ndarray:
    """Blend ``colorize(labels)`` over ``image (H, W, 3) uint8`` and draw the boundaries."""
    m = _numpy(labels)
    blended = (1 - alpha) * image.astype(np.float32) + alpha * colorize(m)
    out = blended.round().astype(np.uint8)
    out[boundaries(m, _edge_width(m.shape, _dpi(m.shape)))] = BOUNDARY_COLOR
    return out


def segments_text(n: int) -> str:
    """``"1 segment"``, ``"3 segments"``."""
    return f"{n} segment" + ("" if n == 1 else "s")


def iou_text(percent: float) -> str:
    """A bar's label on the IoU chart: ``"0"`` for a class scored zero, ``"n/a"`` for one that
    was never scored (nan), else one decimal."""
    if math.isnan(percent):
        return "n/a"
    return "0" if percent == 0 else f"{percent:.1f}"


def _save(fig: Figure, path: Path, dpi: float = 100) -> None:
    with atomic_open(path, "wb") as f:
        fig.savefig(f, format="png", bbox_inches="tight", dpi=dpi)


def _panels(pictures: Sequence[tuple[str, np.ndarray]], title: str | None) -> Figure:
    fig = Figure(figsize=(PANEL_INCHES * len(pictures), PANEL_INCHES + 0.4))
    for i, (name, picture) in enumerate(pictures):
        ax = fig.add_subplot(1, len(pictures), i + 1)
        ax.imshow(picture, interpolation="nearest")
        ax.set_title(name)
        ax.axis("off")
    if title:
        fig.suptitle(title)
    return fig


def _legend(fig: Figure, entries: Sequence[tuple[str, tuple[int, int, int]]]) -> None:
    handles = [
        Patch(facecolor=np.array(rgb) / 255, edgecolor="black", linewidth=0.5, label=name)
        for name, rgb in entries
    ]
    fig.legend(handles=handles, loc="upper center", bbox_to_anchor=(0.5, 0.12), frameon=False,
               ncol=min(len(handles), 6), fontsize=9)  # fmt: skip


def save_comparison(
    image: np.ndarray | torch.Tensor,
    label: np.ndarray | torch.Tensor,
    pred: np.ndarray | torch.Tensor,
    path: str | Path,
    class_names: Sequence[str],
    title: str | None = None,
) -> None:
    """Write ``image | ground truth | prediction``, both label panels with boundaries, and a
    legend of the classes present, to ``path`` (PNG). The prediction's segments take the colour
    of the class the image's Hungarian matching gives them (unmatched: grey).

    Args:
        image: ``(3, H, W)`` float in [0, 1].
        label: ``(H, W)`` class ids, ``-1`` ignored (drawn black).
        pred: ``(H, W)`` segment ids.
        class_names: the dataset's classes (ids index it).
    """
    rgb, y, p = to_uint8_image(image), _numpy(label), _numpy(pred)
    dpi = _dpi(y.shape)
    width = _edge_width(y.shape, dpi)
    seg_class = matched_classes(p, y, len(class_names))
    truth = colorize(y)
    truth[boundaries(y, width)] = BOUNDARY_COLOR
    predicted = color_prediction(p, seg_class)
    predicted[boundaries(p, width)] = BOUNDARY_COLOR
    n_seg = len(np.unique(p))
    fig = _panels(
        [
            ("image", rgb),
            ("ground truth", truth),
            (f"prediction ({segments_text(n_seg)})", predicted),
        ],
        title,
    )
    _legend(
        fig, legend_entries(y, class_names, unmatched=bool((seg_class[np.unique(p)] < 0).any()))
    )
    _save(fig, Path(path), dpi)


def save_segmentation(
    image: np.ndarray, labels: np.ndarray | torch.Tensor, path: str | Path
) -> None:
    """Write ``image | overlay with boundaries`` to ``path`` (PNG); ``image`` is ``(H, W, 3)`` uint8."""
    n_seg = len(np.unique(_numpy(labels)))
    fig = _panels([("image", image), (segments_text(n_seg), overlay(image, labels))], None)
    _save(fig, Path(path), _dpi(image.shape[:2]))


def plot_class_iou(
    class_names: Sequence[str], iou: Sequence[float], path: str | Path, title: str | None = None
) -> None:
    """Horizontal bar chart of per-class IoU (in %), classes in dataset order, each bar labelled
    with :func:`iou_text` (so a zero reads "0", a class never scored "n/a")."""
    values = np.asarray(iou, dtype=np.float64) * 100
    n = len(class_names)
    fig = Figure(figsize=(7, max(2.5, 0.22 * n + 1.2)))
    ax = fig.add_subplot(1, 1, 1)
    y = np.arange(n)
    ax.barh(y, np.nan_to_num(values), color="tab:blue")
    fontsize = 7 if n > 30 else 9
    for i, v in enumerate(values):
        ax.text(np.nan_to_num(v) + 0.8, i, iou_text(v), va="center", fontsize=fontsize - 1,
                color="grey" if math.isnan(v) else "black")  # fmt: skip
    ax.set_yticks(y, labels=list(class_names), fontsize=fontsize)
    ax.invert_yaxis()
    ax.set_xlim(0, 105)
    ax.set_xlabel("IoU (%)")
    ax.grid(axis="x", alpha=0.3)
    if title:
        ax.set_title(title)
    _save(fig, Path(path))


def save_label_png(labels: np.ndarray | torch.Tensor, path: str | Path) -> str:
    """Write ``(H, W)`` non-negative labels as a PNG whose pixel values are the labels: a palette
    ("P") PNG in :func:`categorical_palette` colours when every label is below 256 (viewers show
    colours; ``np.array(Image.open(path))`` gives the ids), else 16-bit grey. Returns what was
    written: "8-bit palette" or "16-bit grey"."""
    m = _numpy(labels)
    if m.ndim != 2 or m.min(initial=0) < 0 or m.max(initial=0) >= 2**16:
        raise ValueError(f"labels must be (H, W) in [0, 65535], got shape {m.shape}")
    if m.max(initial=0) < 256:
        im = Image.fromarray(m.astype(np.uint8))
        im.putpalette(PALETTE.tobytes())  # turns the grey image into a palette one, same values
        kind = "8-bit palette"
    else:
        im, kind = Image.fromarray(m.astype(np.uint16)), "16-bit grey"
    with atomic_open(path, "wb") as f:
        im.save(f, format="PNG")
    return kind
