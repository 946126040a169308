"""Scoring protocols (``conf/protocol/*.yaml``): what the model sees and what is scored.

* ``diffseg`` (default): the official DiffSeg notebook. The dataset's own preprocessing (square
  centre crop of side ``min(H, W)``, resize to ``dataset.resolution``), labels scored at that size
  with the per-image Hungarian matching of ``eval.scoring.matching``. Every step here is the identity.
* ``diffcut``: the protocol under which DiffCut (Couairon et al., NeurIPS 2024; code
  ``PaulCouairon/DiffCut``: ``dataloader/iterator.py``, ``eval_diffcut.py``, ``tools/utils.py``)
  re-evaluated DiffSeg on six datasets. As read from that code:

  1. Crop (:func:`crop_min_minus_one`): torchvision ``CenterCrop`` to a square of side
     ``c = min(H, W) - 1``, offsets ``round((H - c) / 2)``, ``round((W - c) / 2)`` (Python's
     round, half to even).
  2. Resize to ``resolution`` (1024): the image bilinearly (half-pixel centres, no antialiasing:
     ``antialias=None`` on a tensor), the label with ``NEAREST_EXACT`` (source pixel
     ``floor((i + 0.5) * c / R)``).
  3. Score at ``score_resolution`` (128): the label is downsampled with ``F.interpolate``'s
     default ``nearest`` (source pixel ``floor(i * R / S)``, the top-left pixel of each 8x8 block
     at 1024 -> 128). DiffCut predicts its masks directly at 128 (its features upsampled
     bilinearly to 128), and so does ``segmenter=diffcut`` here
     (``SegmenterSpec.score_size``); the other segmenters predict at the input resolution, so
     their labels are downsampled with the *same* rule as the ground truth (the two then sample
     the same pixels). The image is downsampled bilinearly (half-pixel centres, no
     antialiasing) for PAMR and the pictures.
  4. On datasets with a background class (:func:`merge_unmatched_into_background`): clusters left
     unmatched to a foreground class become one background cluster, then the usual matching.
  5. Optionally PAMR (:func:`refine_labels`), then the per-image Hungarian matching and the
     summed counts of ``eval.scoring.metrics``.

  Known defects of that code, reproduced only with ``compat=True`` (:func:`compat_label`): its
  VOC labels (detectron2's ``annotations_pascal20``) merge the object boundaries (255) with the
  background, so boundary pixels are scored as background instead of ignored; its COCO-Object
  mapping sends every fine id >= 91 to background, unlabelled pixels (255) included; its ADE20K
  labels are the raw ``annotations`` PNGs scored with 150 classes, so "other" (0) counts as class
  0 and the last class (150, "flag") is never scored. By default labels keep the datasets'
  correct conventions (ignore is ignored; ADE20K classes 1..150). With ``compat=True`` the final
  matching also sees DiffCut's class order (background last, :meth:`Scoring.match`), so that
  ``linear_sum_assignment`` breaks ties (which absent class takes a leftover cluster's pixels as
  false positives) exactly as in DiffCut's code; the counts are reported in the dataset's order.
  The corrected rules keep the dataset's order (background first): ties then break otherwise,
  which moves counts between classes (mostly false positives between absent classes) and so
  per-class IoUs slightly.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from scipy.ndimage import median_filter
from scipy.optimize import linear_sum_assignment
from torch.utils.data import Dataset

from diffseg.pamr import pamr
from diffseg.preprocess import center_crop, resize_image, resize_label
from eval.datasets import registry
from eval.datasets.base import IGNORE
from eval.schema import validate
from eval.scoring.matching import confusion_histogram, match_per_image

CROPS = ("dataset", "min_minus_one")
ADE_OTHER = "other (compat: ADE20K label 0)"


@dataclass(frozen=True)
class Protocol:
    """A protocol's parameters (the keys of ``conf/protocol/*.yaml``).

    ``resolution``: model input side (None: the dataset's). ``crop``: ``dataset`` (the loader's own
    crop and resize) or ``min_minus_one`` (DiffCut's). ``score_resolution``: side at which
    predictions and labels are scored (None: the label's). ``background``: dataset name -> name of
    its background class, for the background merge. ``compat``: reproduce DiffCut's label defects.
    ``pamr``: PAMR + 3x3 median filter before scoring. What a protocol changes in a dataset's
    settings (split, keep_size, JPEG decoder) is composed into ``cfg.dataset`` by Hydra
    (``conf/dataset/protocol*/``), never set here.
    (DiffCut scores Pascal Context with its background class: ``background: true``).
    """

    name: str = "diffseg"
    resolution: int | None = None
    model_resolution: int | None = None
    crop: str = "dataset"
    score_resolution: int | None = None
    background: dict[str, str] = field(default_factory=dict)
    compat: bool = False
    pamr: bool = False
    pamr_iterations: int = 10
    pamr_dilations: tuple[int, ...] = (1, 2, 4, 8)

    def __post_init__(self) -> None:
        # One form whatever the source (a config gives lists): equal protocols compare equal.
        object.__setattr__(self, "background", dict(self.background or {}))
        object.__setattr__(self, "pamr_dilations", tuple(self.pamr_dilations or (1, 2, 4, 8)))
        if self.crop not in CROPS:
            raise ValueError(f"protocol.crop must be one of {CROPS}, got {self.crop!r}")
        for key in ("resolution", "model_resolution", "score_resolution"):
            value = getattr(self, key)
            if value is not None and (
                isinstance(value, bool) or not isinstance(value, int) or value < 1
            ):
                raise ValueError(f"protocol.{key} must be a positive int or null, got {value!r}")
        if self.crop != "dataset" and self.resolution is None:
            raise ValueError(
                f"protocol.crop={self.crop} needs protocol.resolution (the model input side)"
            )
        if self.model_resolution is not None and self.crop == "dataset":
            raise ValueError(
                "protocol.model_resolution needs a protocol that crops for itself "
                "(crop=min_minus_one); with crop=dataset set dataset.resolution instead"
            )

    @property
    def input_resolution(self) -> int | None:
        """The side of the images the model sees (None: the dataset's)."""
        return self.model_resolution or self.resolution

    @classmethod
    def from_config(cls, cfg: Mapping[str, Any]) -> Protocol:
        """From ``cfg.protocol`` (a mapping), this class being its schema
        (:func:`eval.schema.validate`): unknown keys and bad values are errors naming them."""
        return validate(cls, cfg, "protocol")

    @property
    def transforms_data(self) -> bool:
        """Whether the items must be re-cropped, resized or relabelled (see :class:`ProtocolData`)."""
        return self.crop != "dataset" or self.compat

    def background_index(self, dataset_name: str, class_names: Sequence[str]) -> int | None:
        """The background class of ``dataset_name`` for the merge, or None (no merge)."""
        name = self.background.get(dataset_name)
        if name is None:
            return None
        if name not in class_names:
            warnings.warn(
                f"protocol {self.name}: {dataset_name} has no class {name!r} (its classes here "
                "have no background), so unmatched clusters are not merged; numbers are not "
                "comparable with a with-background evaluation",
                stacklevel=2,
            )
            return None
        return list(class_names).index(name)


# ----------------------------------------------------------------------------------------------
# Data: crop, resize, compat labels


def crop_min_minus_one(x: torch.Tensor) -> torch.Tensor:
    """torchvision ``CenterCrop(min(H, W) - 1)`` of ``(..., H, W)`` (DiffCut's crop).

    Offsets ``round((H - c) / 2)`` with Python's round (half to even), as torchvision.
    """
    h, w = x.shape[-2:]
    if min(h, w) < 2:
        raise ValueError(f"cannot crop min(H, W) - 1 from a {h}x{w} image")
    return center_crop(x, min(h, w) - 1, rounding="round")


def compat_label(label: torch.Tensor, dataset_name: str, n_class: int) -> torch.Tensor:
    """DiffCut's label defects on our labels ``(H, W)`` (``-1`` ignored).

    ``voc``, ``coco_object``: ignored pixels (VOC object boundaries; COCO unlabelled) become
    background (class 0). ``ade20k``: our ``-1`` (ADE "other", 0) becomes class 0, our classes
    0..148 (ADE 1..149) become 1..149, our 149 (ADE 150, "flag") becomes ignored.
    Other datasets: unchanged.
    """
    if dataset_name in ("voc", "coco_object"):
        return torch.where(label == IGNORE, torch.zeros_like(label), label)
    if dataset_name == "ade20k":
        shifted = torch.where(label == n_class - 1, torch.full_like(label, IGNORE), label + 1)
        return torch.where(label == IGNORE, torch.zeros_like(label), shifted)
    return label


def compat_class_names(class_names: Sequence[str], dataset_name: str) -> list[str]:
    """Class names matching :func:`compat_label` (ADE20K: "other" first, "flag" dropped)."""
    if dataset_name == "ade20k":
        return [ADE_OTHER, *class_names[:-1]]
    return list(class_names)


class ProtocolData(Dataset):
    """A dataset seen through a protocol: items cropped and resized to ``protocol.resolution`` (the
    label with nearest-exact), labels relabelled with ``compat``. Other attributes pass through.

    With ``crop="min_minus_one"`` the file datasets must be loaded with ``keep_size=True`` (their
    own crop would come first otherwise); the synthetic dataset is generated square at its own
    resolution and cropped from there.
    """

    def __init__(self, dataset: Dataset, protocol: Protocol, dataset_name: str) -> None:
        self.dataset, self.protocol, self.dataset_name = dataset, protocol, dataset_name
        names = list(dataset.class_names)
        self.class_names = compat_class_names(names, dataset_name) if protocol.compat else names
        self.n_class = len(self.class_names)

    def __len__(self) -> int:
        return len(self.dataset)

    def __getattr__(self, name: str) -> Any:
        # Only reached for attributes not set here (skipped, resolution, ...); "dataset" itself is
        # absent only while unpickling (DataLoader workers), where AttributeError is expected.
        if name == "dataset":
            raise AttributeError(name)
        return getattr(self.dataset, name)

    def __getitem__(self, index: int) -> dict | None:
        item = self.dataset[index]
        if item is None:
            return None
        image, label = item["image"], item["label"]
        p = self.protocol
        if p.crop == "min_minus_one":
            image, label = crop_min_minus_one(image), crop_min_minus_one(label)
            # model_resolution: the model sees its own side, the labels keep the protocol's
            # sampling (prediction and label sample the same relative pixels when scored).
            image = resize_image(image, p.input_resolution).clamp(0.0, 1.0)
            label = resize_label(label, p.resolution)
        if p.compat:
            label = compat_label(label, self.dataset_name, self.dataset.n_class)
        return {**item, "image": image, "label": label}


# ----------------------------------------------------------------------------------------------
# Scoring: downsample, background merge, PAMR


def merge_unmatched_into_background(
    pred: torch.Tensor, label: torch.Tensor, n_class: int, background: int
) -> torch.Tensor:
    """DiffCut's "many-to-one matching for background" on one image.

    1. Hungarian matching (``eval.scoring.matching.confusion_histogram`` + ``linear_sum_assignment``)
       of the clusters to the ``n_class - 1`` foreground classes only, in their dataset order;
       background and ignored pixels take no part.
    2. A foreground class counts as assigned when some pixel of it lies in any matched cluster
       (DiffCut: ``hist[:, col_ind].max(axis=1) > 0``); the clusters matched to assigned classes
       are kept.
    3. Every other cluster of ``pred`` becomes one new cluster ``pred.max() + 1`` (the background
       cluster). The final scoring then matches all ``n_class`` classes, background included.

    Args:
        pred: ``(H, W)`` non-negative cluster ids.
        label: ``(H, W)`` class ids in ``[0, n_class)``, other values ignored.
        n_class: number of classes, background included.
        background: index of the background class.

    Returns:
        ``(H, W)`` int64 cluster ids.
    """
    if not 0 <= background < n_class or n_class < 2:
        raise ValueError(f"background must be in [0, n_class={n_class}), got {background}")
    to_fg = torch.full((n_class + 1,), -1, dtype=torch.long)
    fg = [c for c in range(n_class) if c != background]
    to_fg[fg] = torch.arange(n_class - 1)
    valid = (label >= 0) & (label < n_class)
    # Index n_class (-> -1) for the ignored pixels.
    fg_label = to_fg[torch.where(valid, label, torch.full_like(label, n_class))]
    hist = confusion_histogram(pred, fg_label, n_class - 1)
    keep = torch.as_tensor(clusters_kept(hist), dtype=torch.long)
    out = pred.long().clone()
    out[~torch.isin(out, keep)] = int(pred.max()) + 1
    return out


def clusters_kept(fg_hist: np.ndarray) -> np.ndarray:
    """Steps 1-2 of :func:`merge_unmatched_into_background` on its foreground histogram
    ``(n_class - 1, max(n_class - 1, pred.max() + 1))`` (classes in dataset order, background
    left out): the ids of the clusters kept. Shared with ``eval.scoring.contingency``, which merges a
    stored histogram without the image."""
    _, cols = linear_sum_assignment(fg_hist, maximize=True)
    assigned = fg_hist[:, cols].max(axis=1) > 0
    return np.asarray(cols)[assigned]


def refine_labels(
    pred: torch.Tensor, image: torch.Tensor, num_iter: int, dilations: Sequence[int]
) -> torch.Tensor:
    """DiffCut's PAMR step: one-hot masks of ``pred``'s clusters ``(H, W)`` refined with
    :func:`diffseg.pamr.pamr` on ``image`` ``(3, H, W)``, argmax, then a 3x3 median filter
    (``scipy.ndimage.median_filter``, reflected borders). Clusters come back renumbered
    ``0..K-1`` in the order of their ids."""
    ids = torch.unique(pred)
    masks = (pred[None] == ids[:, None, None]).float()[None]
    refined = pamr(masks, image[None].float(), num_iter, dilations)[0].argmax(dim=0)
    return torch.from_numpy(median_filter(refined.numpy(), size=3)).long()


def background_last(n_class: int, background: int) -> np.ndarray:
    """DiffCut's class order: ``order[k]`` is the class at DiffCut's index ``k``, the foreground
    classes in dataset order, then the background (DiffCut relabels its ignored/background pixels
    ``N_CLASS - 1`` before the final matching)."""
    return np.array([*(c for c in range(n_class) if c != background), background])


@dataclass
class Scoring:
    """The per-image scoring step of a protocol for one dataset (see :meth:`__call__`)."""

    protocol: Protocol
    n_class: int
    background: int | None

    @property
    def identity(self) -> bool:
        p = self.protocol
        return p.score_resolution is None and self.background is None and not p.pamr

    def at_score_size(self, pred: torch.Tensor) -> bool:
        """Whether ``pred (H, W)`` was made at the scoring side (DiffCut's labels), so that it is
        scored as it is, not resampled."""
        s = self.protocol.score_resolution
        return s is not None and tuple(pred.shape) == (s, s)

    def __call__(self, item: Mapping[str, Any], pred: torch.Tensor) -> tuple[dict, torch.Tensor]:
        """``item`` (image, label at the input size) and ``pred (H, W)`` (at the label's size, or
        already at the scoring size: :meth:`at_score_size`) -> the item at the scoring size and
        the prediction to score: downsampled, background merged, PAMR."""
        if self.identity:
            return dict(item), pred
        p = self.protocol
        image, label = item["image"], item["label"]
        if p.score_resolution is not None:
            # Labels and prediction with F.interpolate's default nearest, DiffCut's rule.
            image = resize_image(image, p.score_resolution)
            label = resize_label(label, p.score_resolution, mode="nearest")
            pred = resize_label(pred, p.score_resolution, mode="nearest")
        if self.background is not None:
            pred = merge_unmatched_into_background(pred, label, self.n_class, self.background)
        if p.pamr:
            pred = refine_labels(pred, image, p.pamr_iterations, p.pamr_dilations)
        return {**item, "image": image, "label": label}, pred

    @property
    def order(self) -> np.ndarray | None:
        """The class order :meth:`match` solves the assignment in, as
        ``eval.scoring.matching.assign_histogram`` takes it: DiffCut's under ``compat`` with a background
        class, else None (the dataset's)."""
        if not (self.protocol.compat and self.background is not None):
            return None
        return background_last(self.n_class, self.background)

    def match(
        self, pred: torch.Tensor, label: torch.Tensor
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray, int]:
        """``eval.scoring.matching.match_per_image`` of ``pred (H, W)`` against ``label (H, W)``: per-class
        ``(tp, fp, fn)`` in the dataset's class order, and the labelled pixel count.

        Under ``compat`` with a background class the matching runs on the classes in DiffCut's
        order (:func:`background_last`), so its ties break as in DiffCut's code.
        """
        if not (self.protocol.compat and self.background is not None):
            return match_per_image(pred, label, self.n_class)
        position = torch.from_numpy(np.argsort(background_last(self.n_class, self.background)))
        valid = (label >= 0) & (label < self.n_class)
        moved = torch.where(valid, position[label.clamp(0, self.n_class - 1)], label)
        tp, fp, fn, total = match_per_image(pred, moved, self.n_class)
        return tp[position], fp[position], fn[position], total

    def batch(
        self, items: Sequence[Mapping[str, Any]], preds: Sequence[torch.Tensor]
    ) -> tuple[list[dict], list[torch.Tensor]]:
        """:meth:`__call__` on each ``(item, pred)`` pair."""
        pairs = [self(item, pred) for item, pred in zip(items, preds, strict=True)]
        return [item for item, _ in pairs], [pred for _, pred in pairs]


def scoring(protocol: Protocol, dataset: Dataset, dataset_name: str) -> Scoring:
    """The scoring step of ``protocol`` for ``dataset`` (its classes decide the background)."""
    background = protocol.background_index(dataset_name, dataset.class_names)
    return Scoring(protocol, dataset.n_class, background)


def check_dataset(protocol: Protocol, options: Mapping[str, Any]) -> None:
    """The dataset settings (``cfg.dataset``) fit the protocol: when it crops for itself the file
    loaders keep the original size (``conf/dataset/protocol/`` sets it), and no cache (which holds
    the loader's crop) is read. A generated dataset (no files) has no original size to keep."""
    if protocol.crop == "dataset" or not registry.get(options["name"]).files:
        return
    if options.get("cache"):
        raise ValueError(
            f"protocol {protocol.name} crops the original images itself (crop={protocol.crop}), "
            "but dataset.cache=true holds the loader's crop; set dataset.cache=false"
        )
    if not options.get("keep_size"):
        raise ValueError(
            f"protocol {protocol.name} crops the original images itself (crop={protocol.crop}), "
            "so the loader must keep their size: set dataset.keep_size=true"
        )


def check_resolution_pair(protocol: Protocol, input_resolution: int) -> None:
    """The scoring side must not exceed the input side (labels would be upsampled)."""
    s = protocol.score_resolution
    if s is not None and s > input_resolution:
        raise ValueError(
            f"protocol.score_resolution={s} exceeds the model input {input_resolution}; lower "
            "protocol.score_resolution or raise protocol.resolution"
        )
