"""The loop over a dataset's images: load (DataLoader workers), segment, score, record.

Each finished image's record (its TP/FP/FN counts, the prediction's file) is appended to the rank's
``per_image.jsonl`` as the batch finishes, so a killed run loses at most the batch in flight.
"""

from __future__ import annotations

import re
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from diffseg.preprocess import resize_label
from eval import distributed
from eval.atomic import JsonlAppender
from eval.datasets.base import DataFileError
from eval.results import visualize
from eval.runtime import RunError
from eval.scoring import contingency
from eval.scoring.matching import match_histogram
from eval.scoring.metrics import scores_from_counts
from eval.scoring.protocol import Scoring
from eval.segmenters import segment_all
from eval.writer import Writer

if TYPE_CHECKING:
    from eval.plan import RunPlan
    from eval.tracks import Track, Tracks


class IndexedItems(Dataset):
    """``(index, item)`` pairs of ``dataset`` at ``indices``; the item may be None (skipped file)
    or the :class:`DataFileError` of a bad file, returned for the loop to raise: raised in a
    DataLoader worker, torch would re-raise it wrapped in the worker's traceback text instead of
    its one-line message naming the file."""

    def __init__(self, dataset: Dataset, indices: Sequence[int]) -> None:
        self.dataset, self.indices = dataset, list(indices)

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, k: int) -> tuple[int, dict | DataFileError | None]:
        index = self.indices[k]
        try:
            return index, self.dataset[index]
        except DataFileError as e:
            return index, e


def collate(batch: Sequence[tuple[int, dict | DataFileError | None]]) -> dict[str, Any]:
    """Keeps items as a list (sizes may differ with ``keep_size``) and notes the skipped indices
    and the first :class:`DataFileError` (``error``, else None).

    ``images``: when the images share a size they are moved out of the items into one stack
    ``(B, 3, H, W)`` (else None). Stacking here, in the loader's workers, lets ``pin_memory`` pin
    the batch the model gets, so its copy to the GPU can overlap with compute; moving (not
    copying) them keeps each image from crossing to the main process and being pinned twice.
    ``restore_images`` puts views of the stack back into the items.
    """
    items = [item for _, item in batch if isinstance(item, dict)]
    errors = [item for _, item in batch if isinstance(item, DataFileError)]
    same_size = len({tuple(it["image"].shape) for it in items}) == 1
    return {
        "index": [i for i, item in batch if isinstance(item, dict)],
        "items": items,
        "images": torch.stack([it.pop("image") for it in items]) if same_size else None,
        "skipped": [i for i, item in batch if item is None],
        "error": errors[0] if errors else None,
    }


def restore_images(batch: dict[str, Any]) -> None:
    """Give each item of a ``collate`` batch its image again, as a view of the stack."""
    if batch["images"] is not None:
        for item, image in zip(batch["items"], batch["images"], strict=True):
            item["image"] = image


def item_id(dataset: Dataset, index: int) -> str:
    """The id of a skipped item, which never reached the main process (``#index`` if unknown)."""
    item_id = getattr(dataset, "item_id", None)
    return item_id(index) if item_id is not None else f"#{index}"


def safe_name(index: int, image_id: str) -> str:
    return f"{index:06d}_{re.sub(r'[^A-Za-z0-9._-]+', '_', image_id)[:80]}"


def to_label_size(pred: torch.Tensor, label: torch.Tensor) -> torch.Tensor:
    """Only with ``dataset.keep_size``: labels keep the image's size, the model predicts a square."""
    return resize_label(pred, tuple(label.shape))


def score_item(
    index: int, item: Mapping[str, Any], counts: np.ndarray, order: np.ndarray | None
) -> dict[str, Any]:
    """One image's record for ``per_image.jsonl``, from its pixel ``counts``
    (``contingency.pixel_counts`` of the prediction and the label as scored): the protocol's
    matching on their histogram (``order``: ``Scoring.order``; counts in the dataset's class
    order) and the segments."""
    tp, fp, fn, total = match_histogram(contingency.histogram(counts), order)
    scores = scores_from_counts(
        torch.from_numpy(tp), torch.from_numpy(fp), torch.from_numpy(fn), total
    )
    return {
        "index": index,
        "id": item["id"],
        "segments": contingency.n_segments(counts),
        "accuracy": float(scores["pixel_accuracy"]),
        "miou": float(scores["miou"]),
        "tp": tp.tolist(),
        "fp": fp.tolist(),
        "fn": fn.tolist(),
        "total": int(total),
    }


def write_tables(
    run_dir: Path,
    rank: int,
    index: Sequence[int],
    preds: Sequence[torch.Tensor],
    labels: Sequence[torch.Tensor],
    n_class: int,
) -> None:
    """The contingency part of a batch's images ``index`` (predictions and labels as scored)."""
    tables = {
        i: contingency.image_table(pred, label, n_class)
        for i, pred, label in zip(index, preds, labels, strict=True)
    }
    contingency.write_part(run_dir, rank, tables)


def save_qualitative(
    index: int,
    item: Mapping[str, Any],
    pred: torch.Tensor,
    class_names: Sequence[str],
    run_dir: Path,
    segmenter: str,
) -> None:
    path = run_dir / "qualitative" / f"{safe_name(index, item['id'])}.png"
    title = f"{item['id']}: {segmenter}"
    visualize.save_comparison(item["image"], item["label"], pred, path, class_names, title)


def predict(
    pipeline: Any,
    items: Sequence[Mapping[str, Any]],
    device: torch.device,
    calls: Sequence[Mapping[str, Any]],
    batch_size: int,
    images: torch.Tensor | None = None,
) -> list[list[torch.Tensor]]:
    """Per call (segmenter), ``(H, W)`` labels for each item, all calls on one UNet pass per pass
    setting (``segment_all``): one batched pass on ``images`` (the items' images stacked, as
    ``collate`` makes them), or one per image when there is no stack (sizes differ).
    Images stay on the CPU: the pipeline's preprocessing moves them to ``device`` (non-blocking
    from pinned memory), after the attention cache has hashed them where they are."""
    try:
        if images is not None:
            return [list(x.cpu()) for x in segment_all(pipeline, images, items, calls)]
        per_image = [segment_all(pipeline, it["image"][None], [it], calls) for it in items]
        return [[labels[k][0].cpu() for labels in per_image] for k in range(len(calls))]
    except torch.OutOfMemoryError as e:
        lower = (
            f"lower it, e.g. batch_size={max(1, batch_size // 2)}"
            if batch_size > 1
            else "it is already 1: lower dataset.resolution or use a half-precision model.dtype"
        )
        raise RunError(
            f"out of GPU memory on {device} with batch_size={batch_size}; {lower}. Finished images "
            "are kept: rerun with the same hydra.run.dir to resume."
        ) from e


@dataclass
class Loop:
    """The loop's context: the run's plan, its data, model, segmenters (``tracks``, all fed by
    one UNet pass per batch and pass setting) and logger; ``score`` is the protocol's scoring
    step (eval/scoring/protocol.py: size, background, PAMR)."""

    plan: RunPlan
    dataset: Dataset
    pipeline: Any
    device: torch.device
    tracks: Tracks
    logger: Any
    rank: distributed.Rank = distributed.SINGLE
    score: Scoring | None = None
    writer: Writer = field(init=False, repr=False)  # :meth:`run`'s files and records in flight

    def run(self, todo: Sequence[int]) -> None:
        """Evaluate the images ``todo`` (those some track has not finished), adding their
        records to each track's ``records`` and metric; the bar shows the run's own
        segmenter's."""
        plan, rank, own = self.plan, self.rank, self.tracks.own
        loader = DataLoader(
            IndexedItems(self.dataset, todo),
            batch_size=plan.batch_size,
            num_workers=plan.num_workers,
            collate_fn=collate,
            pin_memory=self.device.type == "cuda",
        )
        self.writer = Writer()
        appenders = [
            JsonlAppender(distributed.records_file(t.run_dir, rank.rank)) for t in self.tracks
        ]
        # Under torchrun only rank 0 shows a bar, for its own share (and the running metrics).
        desc = str(plan.dataset_name) + (
            f" (rank 0 of {rank.world_size})" if rank.distributed else ""
        )
        bar = tqdm(
            total=len(own.records) + len(todo),
            initial=len(own.records),
            desc=desc,
            unit="img",
            disable=not rank.is_main,
        )
        try:
            start = time.perf_counter()
            for batch in loader:
                news = self.batch(batch, start)
                for track, appender, new in zip(self.tracks, appenders, news, strict=True):
                    self.writer.submit(appender.append, new)  # after the files they name
                    track.records.update({r["index"]: r for r in new})
                running = self.tracks.running()
                bar.set_postfix(
                    acc=f"{running['pixel_accuracy']:.3f}", miou=f"{running['miou']:.3f}"
                )
                bar.update(len(batch["index"]) + len(batch["skipped"]))
                self.logger.log_running(len(own.records), running)
                start = time.perf_counter()
        finally:
            bar.close()
            try:
                self.writer.close()  # the last batches' files and records; a failed write raises
            finally:
                for appender in appenders:
                    appender.close()

    def batch(self, batch: dict[str, Any], start: float) -> list[list[dict[str, Any]]]:
        """Per track, the new records of one ``collate`` batch (skipped items included; images
        the track has finished, on a resume, left out); each track's metric adds its scored ones.
        ``start``: when the batch began loading (for the per-image time)."""
        if batch["error"] is not None:
            raise batch["error"]
        restore_images(batch)
        dataset = self.dataset
        skipped = [
            {"index": i, "skipped": True, "id": item_id(dataset, i)} for i in batch["skipped"]
        ]
        news = [[r for r in skipped if r["index"] not in t.records] for t in self.tracks]
        if not batch["items"]:
            return news
        preds = predict(
            self.pipeline,
            batch["items"],
            self.device,
            self.tracks.calls,
            self.plan.batch_size,
            batch["images"],
        )
        # Wall time per image with data loading, every segmenter and the scoring, without the
        # pictures (all segmenters share the UNet pass, so it is not split between them).
        scored = [self.score_track(t, batch, p) for t, p in zip(self.tracks, preds, strict=True)]
        seconds = (time.perf_counter() - start) / len(batch["items"])
        for track, new, records in zip(self.tracks, news, scored, strict=True):
            for index, item, pred, rec in records:
                rec["seconds"] = seconds
                if index < self.plan.n_qualitative:
                    self.writer.submit(
                        save_qualitative,
                        index,
                        item,
                        pred,
                        dataset.class_names,
                        track.run_dir,
                        track.call["name"],
                    )
                track.metric.update(counts=rec)  # the counts the matching just made
                new.append(rec)
        return news

    def score_track(
        self, track: Track, batch: dict[str, Any], preds: list[torch.Tensor]
    ) -> list[tuple[int, dict[str, Any], torch.Tensor, dict[str, Any]]]:
        """``(index, item, prediction, record)`` of the batch's images ``track`` has not
        finished: scored (protocol, matching), prediction and contingency tables written."""
        todo = [
            (i, it, p)
            for i, it, p in zip(batch["index"], batch["items"], preds, strict=True)
            if i not in track.records
        ]
        if not todo:
            return []
        index = [i for i, _, _ in todo]
        items = [it for _, it, _ in todo]
        preds = [
            p
            if self.score is not None and self.score.at_score_size(p)
            else to_label_size(p, it["label"])
            for _, it, p in todo
        ]
        if self.score is not None:
            items, preds = self.score.batch(items, preds)
        order = self.score.order if self.score is not None else None
        n_class = self.dataset.n_class
        records = [
            score_item(i, item, contingency.pixel_counts(pred, item["label"], n_class), order)
            for i, item, pred in zip(index, items, preds, strict=True)
        ]
        if self.plan.save_predictions:
            for rec, pred in zip(records, preds, strict=True):
                rec["prediction"] = f"predictions/{safe_name(rec['index'], rec['id'])}.png"
                self.writer.submit(
                    visualize.save_label_png, pred, track.run_dir / rec["prediction"]
                )
        # The part eval.analysis.rescore and the granularity read: computed (the boundary bands are most
        # of the work) and written by the writer, before the records that name it.
        part = contingency.part_name(self.rank.rank, min(index))
        labels = [item["label"] for item in items]
        self.writer.submit(
            write_tables, track.run_dir, self.rank.rank, index, preds, labels, n_class
        )
        for rec in records:
            rec["contingency"] = part
        return list(zip(index, items, preds, records, strict=True))
