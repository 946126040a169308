"""The scoring rules of ``eval.analysis.rescore`` on contingency tables (``eval.scoring.contingency``): the
official per-image Hungarian matching, many-to-one majority voting, DiffCut's background merge;
counts summed over the dataset as the live run does. See ``eval.analysis.rescore`` for the rules' meaning."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from eval.datasets.classes import THING_CLASSES
from eval.scoring import contingency
from eval.scoring.matching import assign_histogram, match_histogram
from eval.scoring.metrics import scores_from_counts
from eval.scoring.protocol import Protocol, background_last

RULES = ("hungarian", "majority", "background_merge")
RESCORE_DIR = "rescore"
PER_CLASS_COLUMNS = ("class", "kind", "iou", "tp", "fp", "fn", "boundary_iou")
# Columns that depend on the rule; the rest of a rescoring's row is the run's.
RULE_COLUMNS = ("pixel_accuracy", "miou", "miou_things", "miou_stuff", "boundary_iou")


class RescoreError(ValueError):
    """A run folder that cannot be rescored, or a rule that does not apply, said in one line."""


def majority_counts(hist: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, int]:
    """Many-to-one counts of one image's histogram ``(n_class, n_col)``: each segment (column) goes
    to its most overlapped class (the first on ties); ``(tp, fp, fn)`` ``(n_class,)`` and the
    labelled pixel count, as ``eval.scoring.matching.match_histogram``."""
    n_class = hist.shape[0]
    owner = hist.argmax(axis=0)  # a segment on ignored pixels only adds zeros
    columns = np.arange(hist.shape[1])
    tp = np.zeros(n_class, dtype=np.int64)
    claimed = np.zeros(n_class, dtype=np.int64)
    np.add.at(tp, owner, hist[owner, columns])
    np.add.at(claimed, owner, hist.sum(axis=0))
    return tp, claimed - tp, hist.sum(axis=1) - tp, int(hist.sum())


def boundary_counts(table: np.ndarray, cols: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Boundary IoU's intersection and union ``(n_class,)`` of one image, class ``c`` against
    segment ``cols[c]`` (a one-to-one matching), over the labelled pixels of the table's bands."""
    n_class, n_seg = table.shape[1] - 1, table.shape[2]
    gt = table[1, :n_class].sum(axis=1)
    pred = np.pad(table[2, :n_class].sum(axis=0), (0, max(0, int(cols.max()) + 1 - n_seg)))
    both = np.pad(table[3, :n_class], ((0, 0), (0, max(0, int(cols.max()) + 1 - n_seg))))
    inter = both[np.arange(n_class), cols]
    return inter, gt + pred[cols] - inter


@dataclass(frozen=True)
class Rules:
    """How a run's stored tables score under each rule: its classes, the protocol's class order
    and background (the run's ``Scoring``), and the dataset's background class."""

    dataset: str
    class_names: tuple[str, ...]
    compat: bool
    merged_into: int | None  # the class the run merged unmatched clusters into (stored merged)
    background: int | None  # the class ``background_merge`` merges into
    pamr: bool = False  # the stored segments were refined with PAMR (after any merge)

    @classmethod
    def from_row(cls, row: Mapping[str, Any], class_names: Sequence[str]) -> Rules:
        """From a results row (parsed: ``protocol_settings`` a dict) and the run's class names."""
        settings = row["protocol_settings"]
        protocol = Protocol.from_config({"name": row["protocol"], **settings})
        dataset, names = str(row["dataset"]), tuple(class_names)
        merged = protocol.background_index(dataset, names)
        name = protocol.background.get(dataset, "background")
        background = merged if merged is not None else names.index(name) if name in names else None
        return cls(dataset, names, protocol.compat, merged, background, protocol.pamr)

    @property
    def n_class(self) -> int:
        return len(self.class_names)

    @property
    def own(self) -> str:
        """The rule the run itself scored with."""
        return "background_merge" if self.merged_into is not None else "hungarian"

    def unavailable(self, rule: str) -> str | None:
        """Why ``rule`` cannot be computed from this run's tables (None: it can)."""
        if rule not in RULES:
            return f"unknown rule {rule!r}; rules: {', '.join(RULES)}"
        if rule == "hungarian" and self.merged_into is not None:
            return "the run merged unmatched clusters into background before scoring"
        if rule == "background_merge" and self.background is None:
            return f"{self.dataset} has no background class"
        if rule == "background_merge" and self.merged_into is None and self.pamr:
            # DiffCut merges the raw clusters, then refines with PAMR; the stored segments are
            # already refined, so merging them now would reverse its order.
            return (
                "the run refined its segments with PAMR without the merge; DiffCut merges before "
                "PAMR, so the merge cannot be applied in its order to the refined segments (run "
                "again with the protocol's background merge)"
            )
        return None

    def order(self, background: int | None) -> np.ndarray | None:
        """The class order of the final matching: DiffCut's (background last) under compat with a
        background, as ``eval.scoring.protocol.Scoring.match``."""
        if self.compat and background is not None:
            return background_last(self.n_class, background)
        return None

    def image(self, table: np.ndarray, rule: str) -> dict[str, Any]:
        """One image's counts under ``rule``: ``tp``, ``fp``, ``fn``, ``total``, and Boundary IoU's
        ``b_inter``/``b_union`` (None where the scored segments are not the stored ones)."""
        if rule == "majority":
            tp, fp, fn, total = majority_counts(contingency.histogram(table))
            return {"tp": tp, "fp": fp, "fn": fn, "total": total, "b_inter": None}
        stored = rule == self.own
        if not stored:  # background_merge of a run that did not merge
            table = contingency.merge_background(table, self.background)
        hist = contingency.histogram(table)
        order = self.order(self.background if rule == "background_merge" else None)
        tp, fp, fn, total = match_histogram(hist, order)
        out = {"tp": tp, "fp": fp, "fn": fn, "total": total, "b_inter": None}
        if stored:
            out["b_inter"], out["b_union"] = boundary_counts(table, assign_histogram(hist, order))
        return out

    def kinds(self) -> list[str]:
        """``thing``/``stuff`` per class, or empty strings where the dataset has no split."""
        things = THING_CLASSES.get(self.dataset)
        if things is None:
            return [""] * self.n_class
        return ["thing" if name in things else "stuff" for name in self.class_names]


def _ratio(num: np.ndarray, den: np.ndarray) -> np.ndarray:
    with np.errstate(invalid="ignore", divide="ignore"):
        return num / den


def score(tables: Mapping[int, np.ndarray], rules: Rules, rule: str) -> dict[str, Any]:
    """The dataset's numbers under ``rule``: per-image counts summed, then divided once.

    Returns ``pixel_accuracy``, ``miou``, ``per_class_iou`` ``(n_class,)``, ``tp``/``fp``/``fn``,
    ``total``, ``miou_things``/``miou_stuff`` (nan without a split), ``boundary_iou`` and
    ``per_class_boundary_iou`` (nan where not computable), as float64 numpy values.
    """
    reason = rules.unavailable(rule)
    if reason:
        raise RescoreError(f"scoring={rule} is not available: {reason}")
    n = rules.n_class
    sums = {k: np.zeros(n, dtype=np.int64) for k in ("tp", "fp", "fn", "b_inter", "b_union")}
    total, boundary = 0, True
    for index in sorted(tables):
        counts = rules.image(tables[index], rule)
        for k in ("tp", "fp", "fn"):
            sums[k] += counts[k]
        total += counts["total"]
        if counts["b_inter"] is None:
            boundary = False
        else:
            sums["b_inter"] += counts["b_inter"]
            sums["b_union"] += counts["b_union"]
    # The live run's arithmetic (torch, float64), so the run's own rule gives its numbers bit for bit.
    scores = scores_from_counts(sums["tp"], sums["fp"], sums["fn"], total)
    iou = scores["per_class_iou"]
    kinds = np.array(rules.kinds())
    biou = _ratio(sums["b_inter"].astype(np.float64), sums["b_union"])
    if not boundary:
        biou = np.full(n, np.nan)

    def mean(values: torch.Tensor | np.ndarray) -> float:
        return float(torch.nanmean(torch.as_tensor(values, dtype=torch.float64)))

    return {
        "pixel_accuracy": float(scores["pixel_accuracy"]),
        "miou": float(scores["miou"]),
        "per_class_iou": iou.numpy(),
        "miou_things": mean(iou[torch.from_numpy(kinds == "thing")]),
        "miou_stuff": mean(iou[torch.from_numpy(kinds == "stuff")]),
        "boundary_iou": mean(biou),
        "per_class_boundary_iou": biou,
        "tp": sums["tp"],
        "fp": sums["fp"],
        "fn": sums["fn"],
        "total": total,
    }
