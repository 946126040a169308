"""The evaluation run behind ``python -m eval``: dataset -> DiffSeg pipeline -> Hungarian scoring ->
tables, pictures, W&B and the ledger.

Resumable: each finished image is appended to ``per_image.jsonl`` (flushed and fsynced) with its
integer TP/FP/FN counts from ``eval.matching``; the metric adds those counts (``update(counts=)``),
the stored ones of a resumed run's finished images as the new ones. It only sums integers, so the
numbers are exactly those of a run that never stopped. ``run.json`` pins the
settings that decide the numbers; resuming with different ones is refused. It also holds the
run's ``status`` (``eval.jobs``).
"""

from __future__ import annotations

import json
import math
import os
import random
import re
import time
import uuid
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from omegaconf import DictConfig, OmegaConf
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from eval import attention_cache, distributed, paper, record, visualize
from eval import ledger as ledger_io
from eval.atomic import (
    JsonlAppender,
    read_json_or_none,
    write_csv_atomic,
    write_json_atomic,
    write_text_atomic,
)
from eval.columns import PER_CLASS_COLUMNS, PER_IMAGE_COLUMNS, RESULT_COLUMNS
from eval.datasets.base import DataFileError
from eval.jobs import set_status
from eval.matching import match_per_image
from eval.metrics import HungarianIoU, scores_from_counts
from eval.protocol import (
    Protocol,
    ProtocolData,
    Scoring,
    check_dataset,
    check_resolution_pair,
)
from eval.protocol import scoring as protocol_scoring
from eval.schema import NOT_SETTINGS
from eval.segmenters import segment_batch, segmenter_call

# Settings that change the numbers: a resumed run must have the same ones, and the same dataset
# settings except where the files are and where eval.prepare gets them. (Batch size and workers
# do not change the labels.)
PINNED_KEYS = ("protocol", "seed", "limit", "model", "segmenter")
UNPINNED_DATASET_KEYS = NOT_SETTINGS


class RunError(RuntimeError):
    """A run that cannot go on, with a message that says what to do."""


# ----------------------------------------------------------------------------------------------
# Set-up


def resolve_device(device: str) -> torch.device:
    """``auto`` -> CUDA when available, else CPU; an explicit CUDA device must exist."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except RuntimeError as e:
        raise ValueError(
            f"device={device!r} is not a torch device; use auto, cpu or cuda[:N]"
        ) from e
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise RunError(
                f"device={device} but CUDA is not available (torch {torch.__version__}, "
                f"built for CUDA: {torch.version.cuda or 'no'}); use device=cpu or device=auto"
            )
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise RunError(
                f"device={device} but only {torch.cuda.device_count()} CUDA device(s) are visible"
            )
    return dev


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def _check_config(cfg: DictConfig) -> None:
    """Values Hydra cannot type-check, checked before any data or model is touched."""

    def positive_int(name: str, value: Any, allow_none: bool = False) -> None:
        if value is None and allow_none:
            return
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            extra = " or null (all)" if allow_none else ""
            raise ValueError(f"{name} must be a positive integer{extra}, got {value!r}")

    positive_int("limit", cfg.limit, allow_none=True)
    positive_int("batch_size", cfg.batch_size)
    if (
        isinstance(cfg.num_workers, bool)
        or not isinstance(cfg.num_workers, int)
        or cfg.num_workers < 0
    ):
        raise ValueError(f"num_workers must be an integer >= 0, got {cfg.num_workers!r}")
    if not isinstance(cfg.n_qualitative, int) or cfg.n_qualitative < 0:
        raise ValueError(f"n_qualitative must be an integer >= 0, got {cfg.n_qualitative!r}")
    if not isinstance(cfg.seed, int):
        raise ValueError(f"seed must be an integer, got {cfg.seed!r}")


def check_writable(run_dir: Path, ledger: Path) -> None:
    """Before any data or model is touched: the run folder and the ledger can be written (a run
    that finds out at its end has lost its compute)."""
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        probe = run_dir / f".write-test-{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as e:
        raise RunError(
            f"cannot write the run folder {run_dir} ({e.strerror or e}); make it writable or "
            "choose another with hydra.run.dir=PATH"
        ) from e
    ledger_io.check_writable(ledger)


# ----------------------------------------------------------------------------------------------
# Run state


def _pinned(cfg: DictConfig, device: torch.device) -> dict[str, Any]:
    pinned = {
        k: OmegaConf.to_container(cfg[k], resolve=True) if OmegaConf.is_config(cfg[k]) else cfg[k]
        for k in PINNED_KEYS
    }
    pinned["dataset"] = {
        k: v
        for k, v in OmegaConf.to_container(cfg.dataset, resolve=True).items()
        if k not in UNPINNED_DATASET_KEYS
    }
    pinned["device_type"] = device.type
    if cfg.get("cache") and cfg.cache.attention:
        # Segmenting stored (rounded) attention can change labels; absent when off, as before.
        pinned["attention_cache"] = cfg.cache.dtype
    return pinned


def open_run_state(
    run_dir: Path, pinned: dict[str, Any], config: DictConfig | None = None
) -> dict[str, Any]:
    """Create ``run.json`` (run id + pinned settings) and ``config.yaml`` (the composed config,
    resolved) for a new run, or check the settings of the existing run on resume.

    Hydra rewrites ``.hydra/`` on every launch, refused ones included; these two files keep what
    the run was started with.
    """
    path = run_dir / "run.json"
    state = read_json_or_none(path)
    if state is None or "pinned" not in state:  # none, or a run that failed before it started
        state = {
            "run_id": uuid.uuid4().hex[:12],
            "created": _now(),
            "pinned": pinned,
            "status": "running",
        }
        if config is not None:
            write_text_atomic(run_dir / "config.yaml", OmegaConf.to_yaml(config, resolve=True))
        write_json_atomic(path, state)
        return state
    old = state["pinned"]
    diffs = [
        f"{k}: {old.get(k)!r} (run) vs {pinned.get(k)!r} (now)"
        for k in sorted(set(old) | set(pinned))
        if old.get(k) != pinned.get(k)
    ]
    if diffs:
        raise RunError(
            f"{run_dir} holds a run with other settings, so it cannot be resumed with these:\n  "
            + "\n  ".join(diffs)
            + "\nRun again with the original settings, or drop hydra.run.dir to start a new run."
        )
    set_status(run_dir, "running")
    return state


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


class _Indexed(Dataset):
    """``(index, item)`` pairs of ``dataset`` at ``indices``; the item may be None (skipped file)
    or the :class:`DataFileError` of a bad file, returned for ``_loop`` to raise: raised in a
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


def _collate(batch: Sequence[tuple[int, dict | DataFileError | None]]) -> dict[str, Any]:
    """Keeps items as a list (sizes may differ with ``keep_size``) and notes the skipped indices
    and the first :class:`DataFileError` (``error``, else None).

    ``images``: when the images share a size they are moved out of the items into one stack
    ``(B, 3, H, W)`` (else None). Stacking here, in the loader's workers, lets ``pin_memory`` pin
    the batch the model gets, so its copy to the GPU can overlap with compute; moving (not
    copying) them keeps each image from crossing to the main process and being pinned twice.
    ``_restore_images`` puts views of the stack back into the items.
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


def _restore_images(batch: dict[str, Any]) -> None:
    """Give each item of a ``_collate`` batch its image again, as a view of the stack."""
    if batch["images"] is not None:
        for item, image in zip(batch["items"], batch["images"], strict=True):
            item["image"] = image


# ----------------------------------------------------------------------------------------------
# The loop


@dataclass
class Outputs:
    """What a finished run wrote: its directory, the results row and whether the ledger got it."""

    run_dir: Path
    results: dict[str, Any]
    ledger: Path
    ledger_added: bool
    n_skipped: int
    n_pictures: int


def print_summary(out: Outputs, save_predictions: bool) -> None:
    """The results table and where everything is."""
    print("\n" + results_table(out.results, out.n_skipped))
    if out.n_skipped:
        ids = json.loads(out.results["skipped_ids"])
        shown = ", ".join(ids[:10]) + (f", ... ({len(ids)} in all)" if len(ids) > 10 else "")
        print(f"Skipped (dataset.on_error=skip): {shown}")
    deviations = out.results["deviations"]
    if deviations.startswith(paper.NO_CELL):
        print(f"Published cell: none ({deviations})")
    elif deviations:
        print(f"Not comparable with the published cell: {deviations}")
    else:
        print("Comparable with the published cell (no deviation from its setting)")
    print(f"\nRun directory: {out.run_dir}")
    print(
        "  tables:      results.csv, per_class.csv, per_image.csv (per-image log: per_image.jsonl)"
    )
    print(f"  pictures:    per_class_iou.png, qualitative/ ({out.n_pictures} images)")
    if save_predictions:
        print("  predictions: predictions/ (label PNGs: 8-bit palette, 16-bit grey above 255)")
    state = "row added" if out.ledger_added else "row already there, not added again"
    print(f"Ledger: {out.ledger} ({state})")


def _scores(metric: HungarianIoU) -> dict[str, torch.Tensor]:
    with warnings.catch_warnings():
        # A rank with no images of its own (torchrun, more ranks than images) never updates.
        warnings.filterwarnings("ignore", message=".*was called before the ``update``")
        return metric.compute()


def _running(metric: HungarianIoU) -> dict[str, float]:
    scores = _scores(metric)
    return {"pixel_accuracy": float(scores["pixel_accuracy"]), "miou": float(scores["miou"])}


def _item_id(dataset: Dataset, index: int) -> str:
    """The id of a skipped item, which never reached the main process (``#index`` if unknown)."""
    item_id = getattr(dataset, "item_id", None)
    return item_id(index) if item_id is not None else f"#{index}"


def _safe_name(index: int, image_id: str) -> str:
    return f"{index:06d}_{re.sub(r'[^A-Za-z0-9._-]+', '_', image_id)[:80]}"


def _to_label_size(pred: torch.Tensor, label: torch.Tensor) -> torch.Tensor:
    """Only with ``dataset.keep_size``: labels keep the image's size, the model predicts a square."""
    if tuple(pred.shape) == tuple(label.shape):
        return pred
    out = F.interpolate(pred[None, None].float(), size=tuple(label.shape), mode="nearest-exact")
    return out[0, 0].long()


def _score_item(
    index: int,
    item: Mapping[str, Any],
    pred: torch.Tensor,
    match: Callable[[torch.Tensor, torch.Tensor], tuple],
    run_dir: Path,
    cfg: DictConfig,
) -> dict[str, Any]:
    """One image's record for ``per_image.jsonl``; saves its prediction as a label PNG.
    ``match``: the protocol's matching (``Scoring.match``), counts in the dataset's class order."""
    tp, fp, fn, total = match(pred, item["label"])
    scores = scores_from_counts(
        torch.from_numpy(tp), torch.from_numpy(fp), torch.from_numpy(fn), total
    )
    name = _safe_name(index, item["id"])
    record = {
        "index": index,
        "id": item["id"],
        "segments": int(torch.unique(pred).numel()),
        "accuracy": float(scores["pixel_accuracy"]),
        "miou": float(scores["miou"]),
        "tp": tp.tolist(),
        "fp": fp.tolist(),
        "fn": fn.tolist(),
        "total": int(total),
    }
    if cfg.save_predictions:
        visualize.save_label_png(pred, run_dir / "predictions" / f"{name}.png")
        record["prediction"] = f"predictions/{name}.png"
    return record


def _save_qualitative(
    index: int,
    item: Mapping[str, Any],
    pred: torch.Tensor,
    class_names: Sequence[str],
    run_dir: Path,
) -> None:
    path = run_dir / "qualitative" / f"{_safe_name(index, item['id'])}.png"
    visualize.save_comparison(item["image"], item["label"], pred, path, class_names, item["id"])


def _predict(
    pipeline: Any,
    items: Sequence[Mapping[str, Any]],
    device: torch.device,
    call: dict,
    batch_size: int,
    images: torch.Tensor | None = None,
) -> list[torch.Tensor]:
    """``(H, W)`` labels for each item: one batched call on ``images`` (the items' images stacked,
    as ``_collate`` makes them), or one call per image when there is no stack (sizes differ).
    Images stay on the CPU: the pipeline's preprocessing moves them to ``device`` (non-blocking
    from pinned memory), after the attention cache has hashed them where they are."""
    try:
        if images is not None:
            return list(segment_batch(pipeline, images, items, call).cpu())
        return [segment_batch(pipeline, it["image"][None], [it], call)[0].cpu() for it in items]
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


def _loop(
    cfg: DictConfig,
    dataset: Dataset,
    todo: Sequence[int],
    records: dict[int, dict[str, Any]],
    metric: HungarianIoU,
    pipeline: Any,
    device: torch.device,
    call: dict,
    logger: Any,
    n_total: int,
    rank: distributed.Rank = distributed.SINGLE,
    score: Scoring | None = None,
) -> None:
    run_dir = Path(cfg.paths.output_dir)
    loader = DataLoader(
        _Indexed(dataset, todo),
        batch_size=cfg.batch_size,
        num_workers=cfg.num_workers,
        collate_fn=_collate,
        pin_memory=device.type == "cuda",
    )
    appender = JsonlAppender(distributed.records_file(run_dir, rank.rank))
    match = score.match if score is not None else partial(match_per_image, n_class=dataset.n_class)
    # Under torchrun only rank 0 shows a bar, for its own share (and the running metrics of it).
    desc = str(cfg.dataset.name) + (f" (rank 0 of {rank.world_size})" if rank.distributed else "")
    bar = tqdm(
        total=len(records) + len(todo),
        initial=len(records),
        desc=desc,
        unit="img",
        disable=not rank.is_main,
    )
    try:
        start = time.perf_counter()
        for batch in loader:
            if batch["error"] is not None:
                raise batch["error"]
            _restore_images(batch)
            new = [
                {"index": i, "skipped": True, "id": _item_id(dataset, i)} for i in batch["skipped"]
            ]
            if batch["items"]:
                preds = _predict(
                    pipeline, batch["items"], device, call, cfg.batch_size, batch["images"]
                )
                labels = [item["label"] for item in batch["items"]]
                preds = [_to_label_size(p, y) for p, y in zip(preds, labels, strict=True)]
                if score is not None:
                    # The protocol's scoring view (eval/protocol.py): size, background, PAMR.
                    batch["items"], preds = score.batch(batch["items"], preds)
                scored = [
                    _score_item(i, item, pred, match, run_dir, cfg)
                    for i, item, pred in zip(batch["index"], batch["items"], preds, strict=True)
                ]
                # Wall time per image with data loading and scoring, without the pictures.
                seconds = (time.perf_counter() - start) / len(scored)
                for rec in scored:
                    rec["seconds"] = seconds
                for index, item, pred in zip(batch["index"], batch["items"], preds, strict=True):
                    if index < cfg.n_qualitative:
                        _save_qualitative(index, item, pred, dataset.class_names, run_dir)
                for rec in scored:  # the counts the matching just made, not a second matching
                    metric.update(counts=rec)
                new += scored
            appender.append(new)
            records.update({r["index"]: r for r in new})
            running = _running(metric)
            bar.set_postfix(acc=f"{running['pixel_accuracy']:.3f}", miou=f"{running['miou']:.3f}")
            bar.update(len(new))
            logger.log_running(len(records), running)
            start = time.perf_counter()
    finally:
        bar.close()
        appender.close()


def _fmt(value: float, scale: float = 1.0, digits: int = 2) -> str:
    return "nan" if value is None or math.isnan(value) else f"{value * scale:.{digits}f}"


def results_table(row: Mapping[str, Any], n_skipped: int) -> str:
    """The results row as a Markdown table (accuracy and mIoU in %)."""
    cells = {
        "dataset": f"{row['dataset']} ({row['split']})",
        "model": row["model"],
        "segmenter": row["segmenter"],
        "kl_threshold": row["kl_threshold"],
        "images": str(row["n_images"]) + (f" (+{n_skipped} skipped)" if n_skipped else ""),
        "pixel acc %": _fmt(row["pixel_accuracy"], 100),
        "mIoU %": _fmt(row["miou"], 100),
        "segments/img": _fmt(row["mean_segments"], 1, 1),
        "img/s": _fmt(row["images_per_s"], 1, 2),
    }
    widths = {k: max(len(k), len(v)) for k, v in cells.items()}
    head = "|" + "|".join(f" {k:<{widths[k]}} " for k in cells) + "|"
    rule = "|" + "|".join("-" * (widths[k] + 2) for k in cells) + "|"
    body = "|" + "|".join(f" {v:<{widths[k]}} " for k, v in cells.items()) + "|"
    return "\n".join([head, rule, body])


def _finish(
    cfg: DictConfig,
    dataset: Dataset,
    records: dict[int, dict[str, Any]],
    metric: HungarianIoU,
    run_id: str,
    device: torch.device,
    logger: Any,
    settings: Mapping[str, Any],
) -> Outputs:
    run_dir = Path(cfg.paths.output_dir)
    scored = [records[i] for i in sorted(records) if not records[i].get("skipped")]
    skipped_ids = [
        *getattr(dataset, "skipped_ids", []),
        *(records[i]["id"] for i in sorted(records) if records[i].get("skipped")),
    ]
    if not scored:
        raise RunError(
            f"every one of the {len(skipped_ids)} images was skipped (dataset.on_error=skip)"
        )
    final = _scores(metric)
    seconds = float(sum(r["seconds"] for r in scored))
    row = {
        "run_id": run_id,
        "timestamp": _now(),
        **settings,
        "n_images": len(scored),
        "n_skipped": len(skipped_ids),
        "skipped_ids": skipped_ids,
        "pixel_accuracy": float(final["pixel_accuracy"]),
        "miou": float(final["miou"]),
        "mean_segments": float(np.mean([r["segments"] for r in scored])),
        "seconds": round(seconds, 3),
        "images_per_s": round(len(scored) / seconds, 4) if seconds > 0 else float("nan"),
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else device.type,
        "versions": record.versions(),
        "git_commit": record.git_commit(),
        "run_dir": str(run_dir.resolve()),
    }
    row["deviations"] = "; ".join(paper.deviations({**row, "ledger_version": 2}))
    per_class = [
        {"class": name, "iou": float(iou), "tp": int(tp), "fp": int(fp), "fn": int(fn)}
        for name, iou, tp, fp, fn in zip(
            dataset.class_names,
            final["per_class_iou"],
            final["tp"],
            final["fp"],
            final["fn"],
            strict=True,
        )
    ]
    per_image = [{k: r[k] for k in PER_IMAGE_COLUMNS} for r in scored]
    write_csv_atomic(run_dir / "per_image.csv", per_image, PER_IMAGE_COLUMNS)
    write_csv_atomic(run_dir / "per_class.csv", per_class, PER_CLASS_COLUMNS)
    title = f"{row['dataset']} / {row['model']}: mIoU {_fmt(row['miou'], 100)}%"
    visualize.plot_class_iou(
        dataset.class_names, final["per_class_iou"].tolist(), run_dir / "per_class_iou.png", title
    )
    encoded = ledger_io.encode_row(row)
    write_csv_atomic(run_dir / "results.csv", [encoded], RESULT_COLUMNS)
    pictures = sorted((run_dir / "qualitative").glob("*.png"))
    logger.log_final(row, per_class, pictures)
    return Outputs(run_dir, encoded, Path(cfg.paths.ledger), False, len(skipped_ids), len(pictures))


def append_to_ledger(outputs: Outputs) -> None:
    """Append the run's row; when that fails the row stays in the run folder's results.csv and
    the error says the one command that appends it later."""
    try:
        outputs.ledger_added = ledger_io.append(outputs.ledger, outputs.results)
    except (OSError, ledger_io.LedgerError) as e:
        raise RunError(
            f"the run finished, but its row could not be appended to the ledger {outputs.ledger} "
            f"({e}). Its results are kept in {outputs.run_dir / 'results.csv'}; once the ledger "
            f"is fixed, append them with: {ledger_io.append_command(outputs.run_dir, outputs.ledger)}"
        ) from e


def evaluate(cfg: DictConfig) -> Outputs | None:
    """Run the evaluation that ``cfg`` (the composed ``conf/config.yaml``) describes.

    Under ``torchrun`` (``eval.distributed``) every rank evaluates its share of the images; rank 0
    returns the outputs, the other ranks None.

    Errors that stop the run (missing data, a model that cannot be loaded, out of memory) leave no
    ledger row; finished images stay in ``per_image.jsonl`` for a resume.
    """
    import hydra
    from hydra.core.hydra_config import HydraConfig

    from eval.datasets import get_dataset

    _check_config(cfg)
    run_dir = Path(cfg.paths.output_dir)
    check_writable(run_dir, Path(cfg.paths.ledger))
    rank = distributed.current()
    device = distributed.device_for(resolve_device(cfg.device), rank)
    seed_everything(cfg.seed)

    protocol = Protocol.from_config(OmegaConf.to_container(cfg.protocol, resolve=True))
    # Settings checked before the data and the model load.
    resolution = protocol.input_resolution or cfg.dataset.get("resolution") or 512
    check_resolution_pair(protocol, resolution)
    segmenter = OmegaConf.to_container(cfg.segmenter, resolve=True)
    call = segmenter_call(segmenter, resolution, cfg.seed)
    dataset_cfg = OmegaConf.to_container(cfg.dataset, resolve=True)
    check_dataset(protocol, dataset_cfg)
    dataset = get_dataset(**dataset_cfg)
    if protocol.transforms_data:
        dataset = ProtocolData(dataset, protocol, cfg.dataset.name)
    score = protocol_scoring(protocol, dataset, cfg.dataset.name)
    n_total = len(dataset) if cfg.limit is None else min(cfg.limit, len(dataset))
    if n_total == 0:
        raise RunError(f"dataset {cfg.dataset.name} ({cfg.dataset.get('split')}) has no images")

    def open_run() -> tuple[str, dict[int, dict[str, Any]]]:
        run_id = open_run_state(run_dir, _pinned(cfg, device), cfg)["run_id"]
        return run_id, distributed.read_records(run_dir, n_total)

    # Rank 0 reads (and repairs) the per-image logs before any rank appends, so all ranks split
    # the same list of images still to do.
    run_id, records = distributed.on_main(open_run, rank)
    todo = distributed.shard(
        [i for i in range(n_total) if i not in records], rank.rank, rank.world_size
    )
    if not rank.is_main:
        records = {}  # rank 0 holds (and scores) the finished images; this rank only its new ones

    choices = HydraConfig.get().runtime.choices
    resolved = OmegaConf.to_container(cfg, resolve=True)
    resolved["experiment"] = cfg.experiment or choices.get("experiment") or ""
    settings = record.settings(
        resolved,
        choices.get("model") or "custom",
        protocol,
        resolution,
        device,
        getattr(dataset, "split_size", None),
    )
    pipeline = hydra.utils.instantiate(cfg.model, device=device) if todo else None
    if pipeline is not None and cfg.get("compile"):
        pipeline.compile_unet()
    if pipeline is not None and cfg.get("cache") and cfg.cache.attention:
        model_cfg = OmegaConf.to_container(cfg.model, resolve=True)
        pipeline = attention_cache.from_config(
            pipeline, cfg.cache, model_cfg, device, resolution, len(todo)
        )

    # Running values stay per process; the states are reduced once, after the loop.
    metric = HungarianIoU(dataset.n_class, sync_on_compute=False)
    for index in sorted(records):
        if not records[index].get("skipped"):
            metric.update(counts=records[index])

    # Not recursive: the config holds `_target_` keys of its own (model, logger).
    logger = (
        hydra.utils.instantiate(
            cfg.logger,
            run_dir=run_dir,
            run_config=resolved,
            run_id=run_id,
            _recursive_=False,
            _convert_="all",
        )
        if rank.is_main
        else distributed.NullLogger()
    )
    try:
        if todo:
            args = (cfg, dataset, todo, records, metric, pipeline, device, call, logger, n_total)
            _loop(*args, rank, score)
            if isinstance(pipeline, attention_cache.CachedAttentionPipeline):
                prefix = f"rank {rank.rank}: " if rank.distributed else ""
                print(prefix + pipeline.cache.summary())
        if rank.distributed:
            others = distributed.gather_records([] if rank.is_main else records.values(), rank)
            distributed.sync_metric(metric, rank)
            if not rank.is_main:
                logger.finish()
                return None
            records.update({r["index"]: r for r in others})
            distributed.merge_rank_files(run_dir, list(records.values()))
        outputs = _finish(cfg, dataset, records, metric, run_id, device, logger, settings)
    except BaseException:
        logger.finish(exit_code=1)
        raise
    logger.finish()
    # Last, so that a run failing anywhere before leaves no row.
    append_to_ledger(outputs)
    set_status(run_dir, "finished")
    print_summary(outputs, cfg.save_predictions)
    return outputs
