"""Per-image contingency tables: what scoring needs, kept so that a run can be scored again under
any rule without the model or the images (``python -m eval.analysis.rescore``).

An image's table counts its pixels by (ground-truth class, predicted segment) at the scoring
resolution, for the prediction exactly as it was scored (after the protocol's downsampling,
background merge and PAMR). Four layers (:data:`LAYERS`) count the pixel pairs overall and inside
the Boundary IoU bands (``eval.scoring.granularity``: within ``d`` pixels of the ground truth's contour,
of the prediction's contour, of both), so Boundary IoU too can be recomputed under a one-to-one
matching. Besides the ``n_class`` classes, one more row (stored as class ``-1``) counts the pixels
whose label is ignored: the matching never sees them, but the widest segment id among *all*
pixels sets the width of the official histogram, which breaks the assignment's ties
(``eval.scoring.matching.confusion_histogram``); with that row the stored table gives it back exactly.

Storage: long format (one line per non-zero (class, segment) pair) in Parquet parts,
``contingency/part-<rank>-<first index>.parquet``, one per finished batch of a process, written
atomically *before* the batch's records reach ``per_image.jsonl``; each record names its part
(``contingency``), so the records alone say which tables are finished. A part of a batch killed
before its records were appended is never read (its images are done again, into another part, or
into the same name, replaced).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import numpy as np

from eval.atomic import atomic_open
from eval.scoring.protocol import clusters_kept

PART_DIR = "contingency"
# Pixel pairs counted: all, inside the ground truth's boundary band, inside the prediction's, both.
LAYERS = ("count", "gt_band", "pred_band", "both_band")
COLUMNS = ("index", "class", "segment", *LAYERS)
IGNORED = -1  # the stored class of the ignored-pixel row
BOUNDARY_RATIO = 0.02  # Boundary IoU's d as a share of the image diagonal (Cheng et al. 2021)


class ContingencyError(ValueError):
    """Stored tables that cannot be read back, with the file named."""


# ----------------------------------------------------------------------------------------------
# One image


def boundary_width(height: int, width: int, ratio: float = BOUNDARY_RATIO) -> int:
    """Boundary IoU's ``d``: ``round(ratio * diagonal)``, at least 1 (Cheng et al.'s
    ``mask_to_boundary``)."""
    return max(1, round(ratio * float(np.hypot(height, width))))


def boundary_band(labels: np.ndarray, d: int) -> np.ndarray:
    """``(H, W)`` bool: the pixels of each region of ``labels`` ``(H, W)`` within ``d`` pixels
    (chessboard distance) of its contour, the image border counting as contour.

    For a binary mask this is Cheng et al.'s ``mask - erode(mask, 3x3, d iterations)`` with the
    image zero-padded: a pixel stays in the eroded mask iff every pixel of the ``(2d + 1)`` square
    around it is in the mask. Here for every region at once: the square holds another value iff
    it holds two 4-neighbours with different values (it is a box, so a 4-path inside it joins any
    two of its pixels), and it lies partly outside the image iff the pixel is within ``d`` of the
    border. So the band is the border frame plus the changes between horizontal and vertical
    neighbours dilated by the square, as running ORs: several times faster than the maximum and
    minimum filters it equals (``tests/eval/scoring/test_host_scoring.py``).
    """
    h, w = labels.shape
    band = np.ones((h, w), dtype=bool)
    if h <= 2 * d or w <= 2 * d:
        return band
    # A change between columns j and j + 1 lies in the squares of the pixels of columns
    # j + 1 - d .. j + d: 2d pairs wide, 2d + 1 rows high (vertical changes likewise). The
    # horizontal pairs are taken on the flat image (contiguous), the pairs across rows dropped.
    flat = labels.reshape(-1)
    horizontal = np.zeros(h * w + 2 * d - 1, dtype=bool)
    np.not_equal(flat[1:], flat[:-1], out=horizontal[: h * w - 1])
    horizontal[w - 1 : h * w : w] = False
    inner = running_any(running_any(horizontal, 2 * d).reshape(h, w)[:, : w - 2 * d], 2 * d + 1)
    inner |= running_any_across(running_any(labels[1:] != labels[:-1], 2 * d), 2 * d + 1)
    band[d : h - d, d : w - d] = inner
    return band


def running_any(a: np.ndarray, width: int) -> np.ndarray:
    """``out[k] = a[k : k + width].any(axis=0)`` for every full window along the first axis of a
    bool ``a``: ``a.shape[0] - width + 1`` of them, by doubling spans."""
    n, out, span = a.shape[0], a, 1
    while span < width:
        step = min(span, width - span)
        n -= step
        out = out[:n] | out[step : n + step]
        span += step
    return out


def running_any_across(a: np.ndarray, width: int) -> np.ndarray:
    """:func:`running_any` along the second axis of a 2-D bool ``a``, ``(H, W - width + 1)``: on
    the flat array (contiguous), where no full window of a row reaches the next row."""
    h, w = a.shape
    flat = np.zeros(h * w + width - 1, dtype=bool)
    flat[: h * w] = a.reshape(-1)
    return running_any(flat, width).reshape(h, w)[:, : w - width + 1]


def pixel_counts(pred: Any, label: Any, n_class: int) -> np.ndarray:
    """Layer 0 of :func:`image_table` alone, ``(n_class + 1, pred.max() + 1)`` int64: all the
    scoring needs (the boundary layers are for the stored table)."""
    p, y = _maps(pred, label)
    n_seg = int(p.max()) + 1
    cell = _rows(y, n_class)
    cell *= n_seg
    cell += p
    return np.bincount(cell.reshape(-1), minlength=(n_class + 1) * n_seg).reshape(-1, n_seg)


def image_table(pred: Any, label: Any, n_class: int) -> np.ndarray:
    """One image's table ``(len(LAYERS), n_class + 1, pred.max() + 1)`` int64.

    Args:
        pred: ``(H, W)`` non-negative segment ids as scored (torch or numpy).
        label: ``(H, W)`` class ids; values outside ``[0, n_class)`` are ignored (last row).
        n_class: number of classes.
    """
    p, y = _maps(pred, label)
    d = boundary_width(*y.shape)
    # One bincount of (cell, band code): code bit 0 = in the ground truth's band, bit 1 = in
    # the prediction's; each layer is then a sum of codes.
    n_seg = int(p.max()) + 1
    cell = _rows(y, n_class)
    cell *= 4 * n_seg
    cell += 4 * p
    cell += boundary_band(y, d)
    cell += 2 * boundary_band(p, d).view(np.uint8)
    size = (n_class + 1) * n_seg
    by_code = np.bincount(cell.reshape(-1), minlength=4 * size)
    by_code = by_code.reshape(size, 4)
    layers = [by_code.sum(axis=1), by_code[:, 1] + by_code[:, 3], by_code[:, 2] + by_code[:, 3]]
    return np.stack([*layers, by_code[:, 3]]).reshape(len(LAYERS), n_class + 1, n_seg)


def _maps(pred: Any, label: Any) -> tuple[np.ndarray, np.ndarray]:
    """``pred`` and ``label`` (torch or numpy) as int64 arrays, checked."""
    p = np.asarray(pred.cpu() if hasattr(pred, "cpu") else pred)
    y = np.asarray(label.cpu() if hasattr(label, "cpu") else label)
    if p.dtype.kind not in "iu" or y.dtype.kind not in "iu":
        raise ValueError(
            f"pred and label must hold integer ids, got {p.dtype} and {y.dtype}; pass the argmax "
            "labels (e.g. pred.long()), not scores"
        )
    p, y = p.astype(np.int64, copy=False), y.astype(np.int64, copy=False)
    if p.shape != y.shape or p.ndim != 2 or p.size == 0 or p.min() < 0:
        raise ValueError(
            f"pred and label must be non-empty (H, W) maps of the same shape with segment ids "
            f">= 0, got pred {p.shape} and label {y.shape}"
        )
    return p, y


def _rows(y: np.ndarray, n_class: int) -> np.ndarray:
    """A new int64 copy of the labels ``y``, ignored ones (outside ``[0, n_class)``) as
    ``n_class``: negative ones are huge as unsigned."""
    return np.minimum(y.view(np.uint64), n_class).view(np.int64)


def n_segments(counts: np.ndarray) -> int:
    """The segment ids with a pixel (ignored pixels included): the distinct values of the
    prediction. ``counts``: an image's table or its :func:`pixel_counts`."""
    return int((counts[0] if counts.ndim == 3 else counts).any(axis=0).sum())


def histogram(table: np.ndarray) -> np.ndarray:
    """The official histogram of the image (``eval.scoring.matching.confusion_histogram``): the labelled
    rows of the pixel counts, ``(n_class, max(n_class, n_seg))``. ``table``: an image's table or
    its :func:`pixel_counts`."""
    counts = (table[0] if table.ndim == 3 else table)[:-1]
    n_class, n_seg = counts.shape
    return np.pad(counts, ((0, 0), (0, max(0, n_class - n_seg))))


def merge_background(table: np.ndarray, background: int) -> np.ndarray:
    """``eval.scoring.protocol.merge_unmatched_into_background`` on a table: the clusters it does not
    keep become one new cluster ``n_seg``. Only the pixel counts survive (layer 0; the boundary
    layers are zero): the merged cluster's contour is not the union of its parts'.

    Returns:
        ``(len(LAYERS), n_class + 1, n_seg')`` with ``n_seg'`` the merged prediction's max + 1.
    """
    counts = table[0]
    n_class, n_seg = counts.shape[0] - 1, counts.shape[1]
    if not 0 <= background < n_class or n_class < 2:
        raise ValueError(f"background must be in [0, n_class={n_class}), got {background}")
    foreground = [c for c in range(n_class) if c != background]
    fg_hist = np.pad(counts[foreground], ((0, 0), (0, max(0, n_class - 1 - n_seg))))
    keep = np.zeros(n_seg, dtype=bool)
    kept = clusters_kept(fg_hist)
    keep[kept[kept < n_seg]] = True  # ids past n_seg have no pixel
    merged = np.zeros((n_class + 1, n_seg + 1), dtype=np.int64)
    merged[:, :n_seg][:, keep] = counts[:, keep]
    merged[:, n_seg] = counts[:, ~keep].sum(axis=1)
    used = np.flatnonzero(merged.any(axis=0))
    out = np.zeros((len(LAYERS), n_class + 1, int(used[-1]) + 1), dtype=np.int64)
    out[0] = merged[:, : out.shape[2]]
    return out


# ----------------------------------------------------------------------------------------------
# Storage


def part_name(rank: int, first_index: int) -> str:
    """A part's path relative to the run folder (what each record keeps)."""
    return f"{PART_DIR}/part-{rank}-{first_index:06d}.parquet"


def part_path(run_dir: Path, rank: int, first_index: int) -> Path:
    return run_dir / part_name(rank, first_index)


def to_columns(index: int, table: np.ndarray) -> dict[str, np.ndarray]:
    """One image's table in long format (its non-zero pairs), the ignored row as class -1."""
    n_class = table.shape[1] - 1
    rows, segs = np.nonzero(table[0])
    return {
        "index": np.full(rows.size, index, dtype=np.int32),
        "class": np.where(rows == n_class, IGNORED, rows).astype(np.int16),
        "segment": segs.astype(np.int32),
        **{name: table[k, rows, segs].astype(np.int32) for k, name in enumerate(LAYERS)},
    }


def write_part(run_dir: Path, rank: int, tables: Mapping[int, np.ndarray]) -> str:
    """Write one batch's tables (image index -> table) as a part; returns its path relative to
    ``run_dir`` (what each record keeps). Atomic: a killed write leaves no part."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    columns = [to_columns(i, tables[i]) for i in sorted(tables)]
    data = {c: np.concatenate([col[c] for col in columns]) for c in COLUMNS}
    path = part_path(run_dir, rank, min(tables))
    with atomic_open(path, "wb") as f:
        pq.write_table(pa.table(data), f)
    return path.relative_to(run_dir).as_posix()


def from_columns(
    classes: np.ndarray, segments: np.ndarray, layers: np.ndarray, n_class: int
) -> np.ndarray:
    """The table back from one image's long-format lines (``layers``: ``(len(LAYERS), lines)``)."""
    if classes.size and (classes.max() >= n_class or classes.min() < IGNORED):
        raise ContingencyError(f"class ids {classes.min()}..{classes.max()} for {n_class} classes")
    table = np.zeros((len(LAYERS), n_class + 1, int(segments.max()) + 1), dtype=np.int64)
    table[:, np.where(classes == IGNORED, n_class, classes), segments] = layers
    return table


def read_tables(
    run_dir: Path, records: Iterable[Mapping[str, Any]], n_class: int
) -> dict[int, np.ndarray]:
    """The tables of the scored ``records`` (per_image.jsonl lines), by image index, each from
    the part its record names (another part may hold a stale copy of a redone image)."""
    import pyarrow.parquet as pq

    wanted: dict[str, set[int]] = {}
    for r in records:
        if "contingency" not in r:
            raise ContingencyError(
                f"{run_dir / 'per_image.jsonl'}: image {r.get('id')} (index {r['index']}) has no "
                "contingency table (a run made before they were stored); run it again in a new "
                "folder to rescore it"
            )
        wanted.setdefault(r["contingency"], set()).add(int(r["index"]))
    out: dict[int, np.ndarray] = {}
    for name, indices in sorted(wanted.items()):
        path = run_dir / name
        try:
            data = pq.read_table(path, columns=list(COLUMNS)).to_pydict()
        except (OSError, ValueError) as e:
            raise ContingencyError(
                f"cannot read the contingency part {path} ({e}); the run folder is incomplete"
            ) from e
        cols = {c: np.asarray(data[c], dtype=np.int64) for c in COLUMNS}
        order = np.argsort(cols["index"], kind="stable")
        cols = {c: v[order] for c, v in cols.items()}
        starts = np.searchsorted(cols["index"], sorted(indices))
        ends = np.searchsorted(cols["index"], sorted(indices), side="right")
        for index, a, b in zip(sorted(indices), starts, ends, strict=True):
            if a == b:
                raise ContingencyError(f"{path} holds no table for image index {index}")
            layers = np.stack([cols[name][a:b] for name in LAYERS])
            out[index] = from_columns(cols["class"][a:b], cols["segment"][a:b], layers, n_class)
    return out
