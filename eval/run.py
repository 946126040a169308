"""The evaluation run behind ``python -m eval``, as a recipe: check the settings, load the data,
open (or resume) the run, load the model, loop over the images (``eval.loop``), write the outputs
(``eval.outputs``) and append the ledger row (``eval.ledger``).

Errors that stop the run (missing data, a model that cannot be loaded, out of memory) leave no
ledger row; finished images stay in ``per_image.jsonl`` for a resume (``eval.state``). Under
``torchrun`` (``eval.distributed``) every rank evaluates its share of the images; rank 0 scores
them all and writes the outputs.
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any

import hydra
import torch
from omegaconf import DictConfig, OmegaConf
from torch.utils.data import Dataset

from eval import attention_cache, distributed, record
from eval.jobs import set_status
from eval.loggers import RunInfo, SegmenterLogger
from eval.loop import Loop, Track
from eval.metrics import HungarianIoU
from eval.model import load_model
from eval.outputs import Outputs, append_to_ledger, comparison_table, finish, print_summary
from eval.protocol import Protocol, ProtocolData, check_dataset, check_resolution_pair, scoring
from eval.runtime import RunError, resolve_device, seed_everything
from eval.schema import check_run
from eval.segmenters import EXTRA_DIR, extra_segmenters, segmenter_call
from eval.segmenters import get as segmenter_spec
from eval.state import check_writable, open_run


def load_data(cfg: DictConfig, protocol: Protocol) -> Dataset:
    """The dataset as the protocol sees it."""
    from eval.datasets import build

    options = OmegaConf.to_container(cfg.dataset, resolve=True)
    check_dataset(protocol, options)
    dataset = build(options)
    if protocol.transforms_data:
        dataset = ProtocolData(dataset, protocol, cfg.dataset.name)
    if len(dataset) == 0:
        raise RunError(empty_dataset_message(options))
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
        f"dataset.split (the layout: README, Datasets), or fill it with python -m eval.prepare "
        f"dataset={name} dataset.root={root}"
    )


def segmenter_calls(
    segmenters: dict[str, dict[str, Any]],
    resolution: int,
    seed: int,
    scale_factor: int = 8,
    score_resolution: int | None = None,
) -> list[dict[str, Any]]:
    """The call settings of each segmenter (config key -> config), checked for a model with
    ``scale_factor`` input pixels per position of its largest attention map (8: SD 1.x's, the
    smallest; the loaded model's is known only once it is loaded). The segmenters that make
    their labels at the scoring side (``SegmenterSpec.score_size``: DiffCut) get the protocol's
    ``score_resolution`` when it has one."""
    calls = []
    for key, segmenter in segmenters.items():
        call = segmenter_call(segmenter, resolution, seed, key, scale_factor)
        if score_resolution is not None and segmenter_spec(call.get("name", "diffseg")).score_size:
            call["score_resolution"] = score_resolution
        calls.append(call)
    return calls


def load_pipeline(cfg: DictConfig, device: torch.device, resolution: int, n_todo: int) -> Any:
    """The model (compiled, behind the attention cache, as configured); None with nothing to do."""
    if not n_todo:
        return None
    pipeline = load_model(cfg.model, device)
    if cfg.get("compile"):
        pipeline.compile_unet()
    if cfg.get("cache") and cfg.cache.attention:
        model = OmegaConf.to_container(cfg.model, resolve=True)
        pipeline = attention_cache.from_config(
            pipeline, cfg.cache, model, device, resolution, n_todo
        )
    return pipeline


def make_logger(cfg: DictConfig, resolved: dict, run_id: str, rank: distributed.Rank) -> Any:
    """The configured logger on rank 0; the other ranks log nothing."""
    if not rank.is_main:
        return distributed.NullLogger()
    # Not recursive: the config holds `_target_` keys of its own (model, logger).
    run = RunInfo(Path(cfg.paths.output_dir), run_id, resolved)
    # "object": the RunInfo argument arrives as itself (Hydra would turn it into a dict).
    return hydra.utils.instantiate(cfg.logger, run=run, _recursive_=False, _convert_="object")


def run_settings(
    cfg: DictConfig,
    protocol: Protocol,
    resolution: int,
    device: torch.device,
    dataset: Dataset,
    segmenters: list[dict[str, Any]],
) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """The resolved config and, per segmenter config of ``segmenters`` (the run's own first), the
    ledger's setting columns (``eval.record.settings``)."""
    from hydra.core.hydra_config import HydraConfig

    choices = HydraConfig.get().runtime.choices
    resolved = OmegaConf.to_container(cfg, resolve=True)
    resolved["experiment"] = cfg.experiment or choices.get("experiment") or ""
    model = choices.get("model") or "custom"
    split_size = getattr(dataset, "split_size", None)
    return resolved, [
        record.settings(
            {**resolved, "segmenter": segmenter}, model, protocol, resolution, device, split_size
        )
        for segmenter in segmenters
    ]


def make_tracks(
    calls: list[dict[str, Any]],
    dirs: list[Path],
    records: list[dict],
    n_class: int,
    keys: list[str],
) -> list[Track]:
    """One track per segmenter, its metric holding the counts of its finished images (running
    values stay per process; the states are reduced once, after the loop)."""
    tracks = []
    for call, folder, done, key in zip(calls, dirs, records, keys, strict=True):
        metric = HungarianIoU(n_class, sync_on_compute=False)
        for rec in done.values():
            if not rec.get("skipped"):
                metric.update(counts=rec)
        tracks.append(Track(call, folder, metric, done, key))
    return tracks


def evaluate(cfg: DictConfig) -> Outputs | None:
    """Run the evaluation that ``cfg`` (the composed ``conf/config.yaml``) describes; rank 0
    returns the outputs (of the run's own segmenter), the other ranks of a torchrun None.

    The segmenters of ``segmenters:`` (``eval.segmenters.extra_segmenters``) are scored on the
    same UNet passes, each in its sub-folder with its own outputs and ledger row."""
    check_run(cfg)
    run_dir = Path(cfg.paths.output_dir)
    check_writable(run_dir, Path(cfg.paths.ledger))
    rank = distributed.current()
    device = distributed.device_for(resolve_device(cfg.device), rank)
    seed_everything(cfg.seed)
    protocol = Protocol.from_config(OmegaConf.to_container(cfg.protocol, resolve=True))
    # Settings checked before the data and the model load.
    resolution = protocol.input_resolution or cfg.dataset.get("resolution") or 512
    check_resolution_pair(protocol, resolution)
    extras = extra_segmenters(cfg.get("segmenters"))
    by_key = {
        "segmenter": OmegaConf.to_container(cfg.segmenter, resolve=True),
        **{f"segmenters.{key}": segmenter for key, segmenter in extras.items()},
    }
    segmenters = list(by_key.values())
    calls = segmenter_calls(
        by_key, resolution, cfg.seed, score_resolution=protocol.score_resolution
    )
    dirs = [run_dir, *(run_dir / EXTRA_DIR / key for key in extras)]
    for folder in dirs[1:]:
        folder.mkdir(parents=True, exist_ok=True)
    dataset = load_data(cfg, protocol)
    n_total = len(dataset) if cfg.limit is None else min(cfg.limit, len(dataset))
    run_id, records, todo = open_run(cfg, device, n_total, rank, dirs, dataset)
    resolved, settings = run_settings(cfg, protocol, resolution, device, dataset, segmenters)
    pipeline = load_pipeline(cfg, device, resolution, len(todo))
    if pipeline is not None:  # again for this model's attention grid (SDXL: resolution / 16)
        segmenter_calls(by_key, resolution, cfg.seed, pipeline.attention_scale_factor)
    tracks = make_tracks(calls, dirs, records, dataset.n_class, ["", *extras])
    logger = make_logger(cfg, resolved, run_id, rank)
    loop = Loop(cfg, dataset, pipeline, device, tracks, logger, rank)
    loop.score = scoring(protocol, dataset, cfg.dataset.name)
    run_ids = [run_id, *(f"{run_id}-{key}" for key in extras)]
    try:
        if todo:
            loop.run(todo)
            if isinstance(pipeline, attention_cache.CachedAttentionPipeline):
                prefix = f"rank {rank.rank}: " if rank.distributed else ""
                print(prefix + pipeline.cache.summary())
        if rank.distributed and not all(
            [distributed.gather_on_main(t.records, t.metric, t.run_dir, rank) for t in tracks]
        ):
            logger.finish()
            return None
        device_name = torch.cuda.get_device_name(device) if device.type == "cuda" else device.type
        outputs = [
            finish(
                cfg,
                dataset,
                track.records,
                track.metric,
                logger if k == 0 else SegmenterLogger(logger, track.key),
                {
                    "run_id": rid,
                    **setting,
                    "device": device_name,
                    "run_dir": str(track.run_dir.resolve()),
                },
            )
            for k, (track, rid, setting) in enumerate(zip(tracks, run_ids, settings, strict=True))
        ]
    except BaseException:
        with contextlib.suppress(OSError):  # a full disk: the run's own error is the one to show
            logger.finish(exit_code=1)
        raise
    logger.finish()
    # Last, so that a run failing anywhere before leaves no row.
    for out in outputs:
        append_to_ledger(out)
    set_status(run_dir, "finished")
    for out in outputs:
        print_summary(out, cfg.save_predictions)
    if extras:
        keys = ["segmenter", *(f"segmenters.{key}" for key in extras)]
        print("\nThe segmenters side by side:\n" + comparison_table(outputs, keys))
    return outputs[0]
