"""The evaluation run behind ``python -m eval``, as a recipe: check the settings once into a plan
(``eval.plan``), load the data, open (or resume) the run, load the model, loop over the images
(``eval.loop``), write each segmenter's outputs (``eval.tracks``, ``eval.outputs``) and append
the ledger rows (``eval.results.ledger``). Nothing below the recipe reads the config: it gets the plan.

Errors that stop the run (missing data, a model that cannot be loaded, out of memory) leave no
ledger row; finished images stay in ``per_image.jsonl`` for a resume (``eval.state``). Under
``torchrun`` (``eval.distributed``) every rank evaluates its share of the images; rank 0 scores
them all and writes the outputs.
"""

from __future__ import annotations

import contextlib
from typing import Any

import hydra
import torch
from omegaconf import DictConfig
from torch.utils.data import Dataset

from eval import distributed
from eval.jobs import set_status
from eval.loop import Loop
from eval.models import attention_cache
from eval.models.model import load_model
from eval.outputs import Outputs, append_to_ledger, comparison_table, print_summary
from eval.plan import RunPlan, plan_run
from eval.results import record
from eval.results.loggers import RunInfo
from eval.runtime import RunError, resolve_device, seed_everything
from eval.scoring.protocol import ProtocolData, check_dataset, scoring
from eval.state import check_writable, open_run
from eval.tracks import make_tracks


def load_data(plan: RunPlan) -> Dataset:
    """The dataset as the protocol sees it."""
    from eval.datasets import build

    check_dataset(plan.protocol, plan.dataset)
    dataset = build(plan.dataset)
    if plan.protocol.transforms_data:
        dataset = ProtocolData(dataset, plan.protocol, plan.dataset_name)
    if len(dataset) == 0:
        raise RunError(empty_dataset_message(plan.dataset))
    return dataset


def empty_dataset_message(options: dict[str, Any]) -> str:
    """One line for a dataset that loaded no image: where it looked and how to fill it."""
    name, split, root = options["name"], options.get("split"), options.get("root")
    source = options.get("source")
    if root is None and source is None:  # generated: its own settings
        return f"dataset {name} has no images: check its settings (conf/dataset/{name}.yaml)"
    where = f"under dataset.root={root}" if source is None else f"in dataset.source={source}"
    return (
        f"dataset {name} (split {split}) has no images {where}: check dataset.root and "
        f"dataset.split (the layout: README, Datasets), or fill it with python -m eval.tools.prepare "
        f"dataset={name} dataset.root={root}"
    )


def load_pipeline(plan: RunPlan, device: torch.device, n_todo: int) -> Any:
    """The model (compiled, behind the attention cache, as planned); None with nothing to do.
    Checks every segmenter's settings again for this model's attention grid (SDXL: resolution
    / 16)."""
    if not n_todo:
        return None
    pipeline = load_model(plan.model, device)
    for segmenter in plan.segmenters:
        segmenter.check_model(pipeline.attention_scale_factor)
    if plan.compile:
        pipeline.compile_unet()
    if plan.cache is not None:
        pipeline = attention_cache.from_config(
            pipeline, plan.cache, plan.model, device, plan.resolution, n_todo
        )
    return pipeline


def make_logger(plan: RunPlan, run_id: str, rank: distributed.Rank) -> Any:
    """The configured logger on rank 0; the other ranks log nothing."""
    if not rank.is_main:
        return distributed.NullLogger()
    # Not recursive: the config holds `_target_` keys of its own (model, logger).
    run = RunInfo(plan.run_dir, run_id, plan.resolved)
    # "object": the RunInfo argument arrives as itself (Hydra would turn it into a dict).
    return hydra.utils.instantiate(plan.logger, run=run, _recursive_=False, _convert_="object")


def ledger_settings(
    plan: RunPlan, device: torch.device, dataset: Dataset
) -> dict[str, dict[str, Any]]:
    """Per segmenter (by config key), the ledger's setting columns (``eval.results.record.settings``)."""
    split_size = getattr(dataset, "split_size", None)
    return {
        s.key: record.settings(
            plan.resolved,
            plan.model_choice,
            plan.protocol,
            plan.resolution,
            device,
            split_size,
            segmenter=s.settings,
        )
        for s in plan.segmenters
    }


def evaluate(cfg: DictConfig) -> Outputs | None:
    """Run the evaluation that ``cfg`` (the composed ``conf/config.yaml``) describes; rank 0
    returns the outputs of the run's own segmenter, the other ranks of a torchrun None.

    The segmenters of ``segmenters:`` (``eval.segmenters.extra_segmenters``) are scored on the
    same UNet passes, each in its sub-folder with its own outputs and ledger row."""
    from hydra.core.hydra_config import HydraConfig

    plan = plan_run(cfg, HydraConfig.get().runtime.choices)
    check_writable(plan.run_dir, plan.ledger)
    rank = distributed.current()
    device = distributed.device_for(resolve_device(plan.device), rank)
    seed_everything(plan.seed)
    for segmenter in plan.segmenters:
        segmenter.folder.mkdir(parents=True, exist_ok=True)
    dataset = load_data(plan)
    n_total = len(dataset) if plan.limit is None else min(plan.limit, len(dataset))
    run_id, records, todo = open_run(plan, device, n_total, rank, dataset)
    settings = ledger_settings(plan, device, dataset)
    pipeline = load_pipeline(plan, device, len(todo))
    logger = make_logger(plan, run_id, rank)
    tracks = make_tracks(plan.segmenters, run_id, settings, records, dataset.n_class, logger)
    loop = Loop(plan, dataset, pipeline, device, tracks, logger, rank)
    loop.score = scoring(plan.protocol, dataset, plan.dataset_name)
    try:
        if todo:
            loop.run(todo)
            if isinstance(pipeline, attention_cache.CachedAttentionPipeline):
                prefix = f"rank {rank.rank}: " if rank.distributed else ""
                print(prefix + pipeline.cache.summary())
        if rank.distributed and not tracks.gather(rank):
            logger.finish()
            return None
        device_name = torch.cuda.get_device_name(device) if device.type == "cuda" else device.type
        outputs = tracks.finish(dataset, plan.ledger, device_name)
    except BaseException:
        with contextlib.suppress(OSError):  # a full disk: the run's own error is the one to show
            logger.finish(exit_code=1)
        raise
    logger.finish()
    # Last, so that a run failing anywhere before leaves no row.
    for out in outputs.values():
        append_to_ledger(out)
    set_status(plan.run_dir, "finished")
    for out in outputs.values():
        print_summary(out, plan.save_predictions)
    if len(outputs) > 1:
        print("\nThe segmenters side by side:\n" + comparison_table(outputs))
    return outputs[tracks.own.plan.key]
