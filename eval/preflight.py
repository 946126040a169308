"""The checks a run's config gets before anything heavy is imported and before Hydra makes its run
folder: every setting the schemas know (``eval.schema``), the keys, where the run will write.

:class:`Preflight` (a Hydra callback, ``conf/config.yaml``) runs them at the start of a single run,
before Hydra creates the run folder, so a mistake is one line in about the time Hydra takes and
leaves no folder behind. A sweep's jobs run them first thing (``eval.__main__``), each failure
recorded in its job folder so that the sweep's summary lists it.

The keys and the run's scalars are checked before torch is imported; the rest imports torch (the
segmenter and protocol schemas live beside their torch code) but neither diffusers nor
torchmetrics, which come with ``eval.run`` once the checks pass.
"""

from __future__ import annotations

import difflib
import os
from pathlib import Path
from typing import Any

from hydra.core.hydra_config import HydraConfig
from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf, open_dict

from eval import CONFIG_DIR
from eval.jobs import fail


def config_keys() -> set[str]:
    """The top-level keys ``conf/config.yaml`` composes: its own keys and its config groups'
    packages (``segmenter/tuned/protocol@segmenter`` -> ``segmenter``)."""
    raw = OmegaConf.to_container(OmegaConf.load(Path(CONFIG_DIR) / "config.yaml"))
    keys = set(raw) - {"defaults"}
    for entry in raw.get("defaults", []):
        if isinstance(entry, dict):
            (group,) = entry
            path = group.removeprefix("optional ").removeprefix("override ")
            keys.add(path.split("@")[-1] if "@" in path else path.split("/")[0])
    return keys - {"hydra"}


def check_keys(cfg: DictConfig) -> None:
    """No top-level key outside :func:`config_keys`: ``+bach_size=2`` is a typo, not a setting."""
    known = config_keys()
    extra = sorted(set(cfg) - known - {"hydra"})
    if extra:
        raise ValueError(
            f"unknown setting(s) {extra} (added with +KEY=...); conf/config.yaml's settings are "
            f"{sorted(known)}: check the spelling (python -m eval --cfg job lists them all)"
        )


def check_override_keys(args: list[str]) -> None:
    """Command-line overrides of a top-level key :func:`config_keys` does not know, before Hydra
    reads them: Hydra's answer to ``bach_size=2`` is to append it with ``+``, which adds the typo.
    Keys that are config groups (``experiment``) are left to Hydra, as are flags and their
    values and ``+``/``~`` overrides (:func:`check_keys` checks the added keys)."""
    known = config_keys()
    groups = {p.name for p in Path(CONFIG_DIR).iterdir() if p.is_dir()}
    for arg in args:
        key = arg.split("=", 1)[0]
        if "=" not in arg or arg.startswith(("-", "+", "~")) or "@" in key:
            continue
        top = key.split(".")[0]
        if top not in known | groups | {"hydra"}:
            close = difflib.get_close_matches(top, sorted(known), n=1)
            hint = f"did you mean {close[0]}? " if close else ""
            raise ValueError(
                f"unknown setting {top!r} in {arg}: {hint}conf/config.yaml's settings are "
                f"{sorted(known)} (python -m eval --cfg job lists them all)"
            )


def check_home() -> None:
    """``$DIFFSEG_HOME``, when set, is a folder (or does not exist yet)."""
    value = os.environ.get("DIFFSEG_HOME")
    if value and Path(value).expanduser().exists() and not Path(value).expanduser().is_dir():
        raise ValueError(
            f"DIFFSEG_HOME={value} is a file, not a folder; point DIFFSEG_HOME at a folder "
            "(outputs/ and data/ go there) or unset it (the project root)"
        )


GIB = 2**30


def available_memory(device: Any) -> int:
    """Bytes free for a run on ``device`` (a ``torch.device``): the GPU's free memory, else the
    host's available memory (``MemAvailable``; the physical memory where that is unknown)."""
    import torch

    if device.type == "cuda":
        return int(torch.cuda.mem_get_info(device)[0])
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def attention_bytes(resolution: int, batch_size: int) -> int:
    """A lower bound of the memory a batch's segmentation needs with SD 1.x/2.x (8 input pixels per
    position of the largest attention map; the model is not loaded yet): DiffSeg's aggregated
    attention, ``(resolution / 8)^4`` float32 values an image (the UNet's attention itself comes
    on top; SDXL's maps are 4x smaller per side-pair, so this overstates it)."""
    return batch_size * (resolution // 8) ** 4 * 4


def check_memory(resolution: int, batch_size: int, device: Any, where: str) -> None:
    """Refuse a model input side whose attention cannot fit on ``device`` (``where``: the setting
    that chose the side, named in the message)."""
    need, have = attention_bytes(resolution, batch_size), available_memory(device)
    if need > have:
        raise ValueError(
            f"{where}={resolution} with batch_size={batch_size} needs more than "
            f"{need / GIB:.1f} GiB (the aggregated self-attention, ({resolution // 8}^2)^2 "
            f"float32 values an image), but {device.type} has {have / GIB:.1f} GiB available; "
            f"lower {where} (the paper: 512) or batch_size"
        )


def check_config(cfg: DictConfig) -> None:
    """Every check of the composed ``cfg`` (without ``hydra``) that needs neither data nor model:
    the keys, the run's scalars, the protocol, the dataset's options, each segmenter's settings
    for the input side, the device and whether the input side's attention fits in its memory. Raises ``ValueError`` (or ``eval.runtime.RunError``) with
    one line naming the setting."""
    from eval.schema import check_run

    # Torch-free first: these answer in about the time Hydra takes.
    check_home()
    check_keys(cfg)
    check_run(cfg)
    from eval.datasets import check_options
    from eval.runtime import resolve_device
    from eval.scoring.protocol import Protocol, check_dataset, check_resolution_pair
    from eval.segmenters import extra_segmenters, segmenter_call

    protocol = Protocol.from_config(OmegaConf.to_container(cfg.protocol, resolve=True))
    resolution = protocol.input_resolution or cfg.dataset.get("resolution") or 512
    check_resolution_pair(protocol, resolution)
    options = OmegaConf.to_container(cfg.dataset, resolve=True)
    check_options(options)
    check_dataset(protocol, options)
    segmenter_call(OmegaConf.to_container(cfg.segmenter, resolve=True), resolution, cfg.seed)
    for key, extra in extra_segmenters(cfg.get("segmenters")).items():
        segmenter_call(extra, resolution, cfg.seed, f"segmenters.{key}")
    where = "protocol.resolution" if protocol.input_resolution else "dataset.resolution"
    check_memory(resolution, cfg.batch_size, resolve_device(cfg.device), where)


class Preflight(Callback):
    """At the start of a single run, before Hydra creates the run folder: :func:`check_config`
    and that the run folder and the ledger can be written. A failure is one line, exit 1."""

    def on_run_start(self, config: DictConfig, **kwargs: Any) -> None:
        # The run folder's name and ${hydra:...} in the task's config need Hydra's config set
        # (Hydra sets it again when the job starts).
        HydraConfig.instance().set_config(config)
        try:
            check_home()
            run_dir = Path(str(config.hydra.run.dir)).absolute()
            task = OmegaConf.masked_copy(config, [k for k in config if k != "hydra"])
            with open_dict(task):
                task.paths.output_dir = str(run_dir)
            check_config(task)
            from eval.state import check_writable

            check_writable(run_dir, Path(task.paths.ledger))
        except (ValueError, RuntimeError) as e:
            fail(e)
