"""What a run records about itself: the resolved settings behind its numbers, and provenance.

``settings`` turns the composed config (after the protocol and the model resolved it) into the
ledger's setting columns: model (hub id or path, revision, a fingerprint of its weights' index,
dtype), attention-cache storage, input resolution, every segmenter, protocol and dataset
parameter, split and its published size, limit, seed, batch size. Torch is imported lazily so the
tables can use the column names without it.
"""

from __future__ import annotations

import importlib.metadata
import platform
import subprocess
from collections.abc import Mapping
from dataclasses import asdict
from pathlib import Path
from typing import Any

from eval.models.digests import weights_fingerprint
from eval.schema import NOT_SETTINGS

VERSION_PACKAGES = ("torch", "diffusers", "transformers", "numpy", "scipy", "simplejpeg")


def versions() -> dict[str, str]:
    """Python's and the numeric packages' versions (and the CUDA build when there is one)."""
    import torch

    out = {"python": platform.python_version()}
    for name in VERSION_PACKAGES:
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            out[name] = "missing"
    if torch.version.cuda:
        out["cuda"] = torch.version.cuda
    return out


def git_commit() -> str:
    """The checkout's commit, with ``-dirty`` when tracked files changed; ``unknown`` outside git."""
    root = Path(__file__).resolve().parents[2]

    def git(*args: str) -> str:
        out = subprocess.run(
            ["git", "-C", str(root), *args], capture_output=True, text=True, timeout=10
        )
        if out.returncode != 0:
            raise OSError(out.stderr)
        return out.stdout.strip()

    try:
        commit = git("rev-parse", "HEAD")
        dirty = git("status", "--porcelain", "--untracked-files=no")
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return commit + ("-dirty" if dirty else "")


def model_dtype(model: Mapping[str, Any], device: Any) -> str:
    """The dtype the model config runs in on ``device`` (``float32``, ``float16``, ``bfloat16``)."""
    from diffseg.devices import resolve_dtype

    return str(resolve_dtype(model.get("dtype"), device)).removeprefix("torch.")


def settings(  # noqa: PLR0913 (the ledger's inputs; the segmenter's when checked)
    cfg: Mapping[str, Any],
    model_choice: str,
    protocol: Any,
    resolution: int,
    device: Any,
    split_size: int | None,
    segmenter: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """The ledger's setting columns for the resolved config ``cfg`` (a plain dict).

    ``protocol``: the resolved :class:`eval.scoring.protocol.Protocol`; ``resolution``: the model input
    side; ``split_size``: the published size of the split (None when unknown). The segmenter's
    settings are recorded as its call gets them (``eval.segmenters.settings``: a scalar KL
    threshold as its three values); ``segmenter``: those settings when already checked
    (``eval.plan.SegmenterPlan.settings``), else ``cfg["segmenter"]``'s are.
    """
    if segmenter is None:
        from eval.segmenters import settings as segmenter_settings

        segmenter = segmenter_settings(cfg["segmenter"])
    model, dataset = cfg["model"], cfg["dataset"]
    cache = cfg.get("cache") or {}
    return {
        "experiment": cfg.get("experiment") or "",
        "protocol": protocol.name,
        "protocol_settings": {k: v for k, v in asdict(protocol).items() if k != "name"},
        "dataset": dataset["name"],
        "split": dataset.get("split") or "",
        "split_size": "" if split_size is None else split_size,
        "dataset_settings": {
            k: v for k, v in dataset.items() if k not in ("name", "split", *NOT_SETTINGS)
        },
        "model": model_choice,
        "model_id": str(model.get("model") or ""),
        "model_revision": model.get("revision") or "",
        "model_hash": weights_fingerprint(model),
        "dtype": model_dtype(model, device),
        "attention_cache": cache.get("dtype", "") if cache.get("attention") else "",
        "resolution": resolution,
        "segmenter": segmenter["name"],
        "segmenter_settings": dict(segmenter),
        "timestep": segmenter.get("timestep", ""),
        "kl_threshold": segmenter.get("kl_threshold"),
        "num_points": segmenter.get("num_points", ""),
        "refine": segmenter.get("refine", ""),
        "weights": segmenter.get("weights"),
        "limit": cfg.get("limit"),
        "seed": cfg["seed"],
        "batch_size": cfg["batch_size"],
    }
