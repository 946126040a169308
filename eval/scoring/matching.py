"""Per-image Hungarian matching of unsupervised segments to ground-truth classes.

This is the scoring of the official DiffSeg benchmark (``diffseg/utils.py``: ``_fast_hist`` and
``hungarian_matching``, itself adapted from PiCIE), restated for one image:

1. Histogram ``hist (n_class, max(n_class, pred.max() + 1))`` of (class, cluster) pairs over the
   pixels whose label is in ``[0, n_class)``; every other label (``-1``, ``255``, ...) is ignored.
   ``pred.max()`` is taken over *all* pixels, ignored ones included, exactly as the official code:
   the histogram's width decides how the assignment breaks ties, so it must match.
2. ``scipy.optimize.linear_sum_assignment(hist, maximize=True)`` pairs each class with a distinct
   cluster, maximising the matched pixels (there are always at least as many columns as rows, so
   every class gets a cluster; a class absent from the image may get one too).
3. ``tp[c] = hist[c, m(c)]``; ``fn[c]`` = pixels of class ``c`` minus ``tp[c]``; ``fp[c]`` =
   labelled pixels of cluster ``m(c)`` minus ``tp[c]``; ``total`` = labelled pixels. Pixels of
   clusters left unmatched count only as false negatives of their true class.

Dataset scores divide sums of these counts (see ``eval.scoring.metrics``).
"""

from __future__ import annotations

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment

ArrayLike = np.ndarray | torch.Tensor


def _as_numpy(x: ArrayLike, name: str) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        return x.detach().cpu().numpy()
    if isinstance(x, np.ndarray):
        return x
    raise ValueError(f"{name} must be a torch.Tensor or numpy.ndarray, got {type(x).__name__}")


def _check_inputs(pred: ArrayLike, label: ArrayLike, n_class: int) -> tuple[np.ndarray, np.ndarray]:
    if isinstance(n_class, bool) or not isinstance(n_class, int | np.integer) or n_class < 1:
        raise ValueError(f"n_class must be a positive integer, got {n_class!r}")
    p = _as_numpy(pred, "pred")
    y = _as_numpy(label, "label")
    if p.shape != y.shape:
        raise ValueError(
            f"pred and label must have the same shape, got pred {tuple(p.shape)} and label "
            f"{tuple(y.shape)}; resize the prediction to the label's size before scoring"
        )
    if p.size == 0:
        raise ValueError(f"pred and label are empty (shape {tuple(p.shape)}); expected an image")
    if p.dtype.kind not in "iu":
        raise ValueError(
            f"pred must hold integer segment ids, got dtype {p.dtype}; pass the argmax labels "
            "(e.g. pred.long()), not scores"
        )
    if y.dtype.kind not in "iu":
        raise ValueError(
            f"label must hold integer class ids (-1 = ignore), got dtype {y.dtype}; cast it to int64"
        )
    if p.min() < 0:
        raise ValueError(
            f"pred must hold non-negative segment ids, got a minimum of {int(p.min())}; "
            "relabel the segments to 0..K-1"
        )
    return p.reshape(-1).astype(np.int64, copy=False), y.reshape(-1).astype(np.int64, copy=False)


def confusion_histogram(pred: ArrayLike, label: ArrayLike, n_class: int) -> np.ndarray:
    """Class-by-cluster pixel counts of one image, as the official ``_fast_hist``.

    Args:
        pred: ``(H, W)`` non-negative integer segment ids (any shape equal to ``label``'s).
        label: ``(H, W)`` integer class ids; values outside ``[0, n_class)`` are ignored.
        n_class: number of ground-truth classes.

    Returns:
        int64 array ``(n_class, max(n_class, pred.max() + 1))``.
    """
    p, y = _check_inputs(pred, label, n_class)
    n_col = max(n_class, int(p.max()) + 1)
    keep = (y >= 0) & (y < n_class)
    counts = np.bincount(n_col * y[keep] + p[keep], minlength=n_class * n_col)
    return counts.reshape(n_class, n_col)


def match_per_image(
    pred: ArrayLike, label: ArrayLike, n_class: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray, int]:
    """Hungarian-match one image's segments to classes and count TP, FP, FN.

    Args:
        pred: ``(H, W)`` non-negative integer segment ids (torch or numpy).
        label: ``(H, W)`` integer class ids; ``-1`` and ids ``>= n_class`` are ignored.
        n_class: number of ground-truth classes.

    Returns:
        ``(tp, fp, fn, total)``: int64 arrays ``(n_class,)`` and the number of labelled pixels.
    """
    return match_histogram(confusion_histogram(pred, label, n_class))


def match_histogram(
    hist: np.ndarray, order: np.ndarray | None = None
) -> tuple[np.ndarray, np.ndarray, np.ndarray, int]:
    """:func:`match_per_image` on an image's histogram ``(n_class, n_col)`` as
    :func:`confusion_histogram` makes it (its width breaks ties, so it must be that one): the same
    ``(tp, fp, fn, total)``, so a stored histogram can be scored again without the image.
    ``order``: see :func:`assign_histogram`; counts stay in ``hist``'s row order."""
    cols = assign_histogram(hist, order)
    tp = hist[np.arange(hist.shape[0]), cols]
    fn = hist.sum(axis=1) - tp
    fp = hist[:, cols].sum(axis=0) - tp
    return tp, fp, fn, int(hist.sum())


def assign_histogram(hist: np.ndarray, order: np.ndarray | None = None) -> np.ndarray:
    """The cluster matched to each class (row) of ``hist`` ``(n_class, n_col)``, ``(n_class,)``.

    ``order``: a permutation of the rows to solve the assignment in (``linear_sum_assignment``
    breaks ties by position, so the order decides them: DiffCut's class order under
    ``protocol.compat``, ``eval.scoring.protocol.background_last``); None: ``hist``'s own order.
    """
    if order is None:
        return _assign(hist)
    cols = np.empty(hist.shape[0], dtype=np.int64)
    cols[order] = _assign(hist[order])
    return cols


def _assign(hist: np.ndarray) -> np.ndarray:
    """The cluster matched to each class (row) of ``hist``, maximising the matched pixels."""
    rows, cols = linear_sum_assignment(hist, maximize=True)
    # With n_class <= n_col every class is assigned, in row order.
    assert np.array_equal(rows, np.arange(hist.shape[0]))
    return cols


def matched_classes(pred: ArrayLike, label: ArrayLike, n_class: int) -> np.ndarray:
    """The class each segment id is matched to by :func:`match_per_image`'s assignment, -1 for
    a segment matched to no class or to one it shares no pixel with (for pictures).

    Returns:
        int64 ``(max(n_class, pred.max() + 1),)``, indexable by every segment id of ``pred``.
    """
    hist = confusion_histogram(pred, label, n_class)
    cols = _assign(hist)
    classes = np.arange(n_class)
    hit = hist[classes, cols] > 0
    out = np.full(hist.shape[1], -1, dtype=np.int64)
    out[cols[hit]] = classes[hit]
    return out
