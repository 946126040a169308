"""DiffSeg's dataset-level pixel accuracy and mIoU as a ``torchmetrics.Metric``.

Why not ``torchmetrics.segmentation.MeanIoU``: it compares predicted ids with class ids directly,
while unsupervised segments carry arbitrary ids that must first be matched to classes per image
(``eval.scoring.matching``); it averages per-image scores, while the paper sums TP/FP/FN over the whole
dataset and divides once; and it has no ignore label. It would not reproduce the paper's numbers.

Here the per-image counts are sum-reduced states, so ``torchmetrics``' distributed sync (or
``merge_state``) yields exactly the single-process result.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch
from torchmetrics import Metric

from eval.scoring.matching import ArrayLike, match_per_image


def scores_from_counts(
    tp: torch.Tensor, fp: torch.Tensor, fn: torch.Tensor, total: torch.Tensor | int
) -> dict[str, torch.Tensor]:
    """Pixel accuracy, per-class IoU and mIoU from summed counts, as the official notebook.

    Args:
        tp, fp, fn: ``(n_class,)`` counts.
        total: number of labelled pixels.

    Returns:
        float64 tensors: ``pixel_accuracy = sum(tp) / total`` (nan when ``total == 0``),
        ``per_class_iou (n_class,) = tp / (tp + fp + fn)`` (nan where the denominator is 0: a class
        never labelled and never matched to a predicted pixel), ``miou`` = nan-mean of it.
    """
    tp, fp, fn = (torch.as_tensor(t, dtype=torch.float64) for t in (tp, fp, fn))
    total = torch.as_tensor(total, dtype=torch.float64)
    iou = tp / (tp + fp + fn)
    return {
        "pixel_accuracy": tp.sum() / total,
        "miou": torch.nanmean(iou),
        "per_class_iou": iou,
    }


def image_scores(pred: ArrayLike, label: ArrayLike, n_class: int) -> dict[str, float]:
    """One image's pixel accuracy and mIoU (for ``per_image.csv``).

    The dataset formulas applied to this image's counts alone; a diagnostic, not the paper's
    metric (averaging these over images is not the dataset mIoU). nan for an all-ignore image.

    Args:
        pred: ``(H, W)`` non-negative integer segment ids.
        label: ``(H, W)`` integer class ids, values outside ``[0, n_class)`` ignored.
        n_class: number of classes.
    """
    tp, fp, fn, total = match_per_image(pred, label, n_class)
    scores = scores_from_counts(
        torch.from_numpy(tp), torch.from_numpy(fp), torch.from_numpy(fn), total
    )
    return {"pixel_accuracy": float(scores["pixel_accuracy"]), "miou": float(scores["miou"])}


class HungarianIoU(Metric):
    """Per-image Hungarian matching, counts summed over the dataset (the DiffSeg protocol).

    States (all ``dist_reduce_fx="sum"``, int64 so they stay exact): ``tp``, ``fp``, ``fn``
    ``(n_class,)`` and ``total`` (labelled pixels).

    ``update(pred (B, H, W), label (B, H, W))``: integer segment ids and class ids (``-1`` or any id
    outside ``[0, n_class)`` ignored). The matching runs on the CPU with scipy, image by image.

    ``compute()`` returns a dict of CPU tensors: ``pixel_accuracy``, ``miou``, ``per_class_iou``
    (float64) and the summed ``tp``, ``fp``, ``fn``, ``total``.
    """

    is_differentiable = False
    higher_is_better = True
    full_state_update = False

    tp: torch.Tensor
    fp: torch.Tensor
    fn: torch.Tensor
    total: torch.Tensor

    def __init__(self, n_class: int, **kwargs) -> None:
        super().__init__(**kwargs)
        if isinstance(n_class, bool) or not isinstance(n_class, int) or n_class < 1:
            raise ValueError(f"n_class must be a positive integer, got {n_class!r}")
        self.n_class = n_class
        for name in ("tp", "fp", "fn"):
            self.add_state(
                name, default=torch.zeros(n_class, dtype=torch.int64), dist_reduce_fx="sum"
            )
        self.add_state("total", default=torch.zeros((), dtype=torch.int64), dist_reduce_fx="sum")

    def update(
        self,
        pred: torch.Tensor | None = None,
        label: torch.Tensor | None = None,
        *,
        counts: Mapping[str, Any] | None = None,
    ) -> None:
        """Match and add ``pred``/``label`` ``(B, H, W)``; or add ``counts``, one image's matching
        already done (``tp``, ``fp``, ``fn`` per class and ``total``, as ``match_per_image``
        returns them, e.g. from a stored record), without matching it again."""
        if counts is not None:
            for name in ("tp", "fp", "fn", "total"):
                state = getattr(self, name)
                state += torch.as_tensor(counts[name], dtype=torch.int64, device=state.device)
            return
        if pred is None or label is None:
            raise ValueError("update takes pred and label, or counts=")
        if pred.ndim != 3 or tuple(pred.shape) != tuple(label.shape):
            raise ValueError(
                f"pred and label must both be (B, H, W) with the same shape, got pred "
                f"{tuple(pred.shape)} and label {tuple(label.shape)}"
            )
        pred_np = pred.detach().cpu().numpy()
        label_np = label.detach().cpu().numpy()
        sums = np.zeros((3, self.n_class), dtype=np.int64)
        total = 0
        for p, y in zip(pred_np, label_np, strict=True):
            tp, fp, fn, n = match_per_image(p, y, self.n_class)
            sums += np.stack([tp, fp, fn])
            total += n
        sums_t = torch.from_numpy(sums).to(self.tp.device)
        self.tp += sums_t[0]
        self.fp += sums_t[1]
        self.fn += sums_t[2]
        self.total += total

    def compute(self) -> dict[str, torch.Tensor]:
        tp, fp, fn, total = (t.detach().cpu() for t in (self.tp, self.fp, self.fn, self.total))
        return {
            **scores_from_counts(tp, fp, fn, total),
            "tp": tp,
            "fp": fp,
            "fn": fn,
            "total": total,
        }


def compute_scores(metric: HungarianIoU) -> dict[str, torch.Tensor]:
    with warnings.catch_warnings():
        # A rank with no images of its own (torchrun, more ranks than images) never updates.
        warnings.filterwarnings("ignore", message=".*was called before the ``update``")
        return metric.compute()


def running_scores(metric: HungarianIoU) -> dict[str, float]:
    """This process's scores so far, read from the metric's states: ``compute()`` would cache
    them, and a cached value outlives the states' reduction across ranks after the loop."""
    scores = scores_from_counts(metric.tp, metric.fp, metric.fn, metric.total)
    return {"pixel_accuracy": float(scores["pixel_accuracy"]), "miou": float(scores["miou"])}
