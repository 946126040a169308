"""The checks a run's config gets before anything heavy is imported and before Hydra makes its run
folder: every setting the schemas know (``eval.schema``), the keys, where the run will write.

:class:`Preflight` (a Hydra callback, ``conf/config.yaml``) runs them at the start of a single run,
before Hydra creates the run folder, so a mistake is one line in about the time Hydra takes and
leaves no folder behind. A sweep's jobs run them first thing (``eval.__main__``), each failure
recorded in its job folder so that the sweep's summary lists it.

Imports torch (the segmenter and protocol schemas live beside their torch code) but neither
diffusers nor torchmetrics; those come with ``eval.run`` once the checks pass.
"""

from __future__ import annotations

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


def check_home() -> None:
    """``$DIFFSEG_HOME``, when set, is a folder (or does not exist yet)."""
    value = os.environ.get("DIFFSEG_HOME")
    if value and Path(value).expanduser().exists() and not Path(value).expanduser().is_dir():
        raise ValueError(
            f"DIFFSEG_HOME={value} is a file, not a folder; point DIFFSEG_HOME at a folder "
            "(outputs/ and data/ go there) or unset it (the project root)"
        )


def check_config(cfg: DictConfig) -> None:
    """Every check of the composed ``cfg`` (without ``hydra``) that needs neither data nor model:
    the keys, the run's scalars, the protocol, the dataset's options, each segmenter's settings
    for the input side, the device. Raises ``ValueError`` (or ``eval.runtime.RunError``) with
    one line naming the setting."""
    from eval.datasets import check_options
    from eval.protocol import Protocol, check_dataset, check_resolution_pair
    from eval.runtime import resolve_device
    from eval.schema import check_run
    from eval.segmenters import extra_segmenters, segmenter_call

    check_home()
    check_keys(cfg)
    check_run(cfg)
    protocol = Protocol.from_config(OmegaConf.to_container(cfg.protocol, resolve=True))
    resolution = protocol.input_resolution or cfg.dataset.get("resolution") or 512
    check_resolution_pair(protocol, resolution)
    options = OmegaConf.to_container(cfg.dataset, resolve=True)
    check_options(options)
    check_dataset(protocol, options)
    segmenter_call(OmegaConf.to_container(cfg.segmenter, resolve=True), resolution, cfg.seed)
    for key, extra in extra_segmenters(cfg.get("segmenters")).items():
        segmenter_call(extra, resolution, cfg.seed, f"segmenters.{key}")
    resolve_device(cfg.device)


class Preflight(Callback):
    """At the start of a single run, before Hydra creates the run folder: :func:`check_config`
    and that the run folder and the ledger can be written. A failure is one line, exit 1."""

    def on_run_start(self, config: DictConfig, **kwargs: Any) -> None:
        from eval.state import check_writable

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
            check_writable(run_dir, Path(task.paths.ledger))
        except (ValueError, RuntimeError) as e:
            fail(e)
