"""Get a benchmark dataset into the layout its loader reads.

    python -m eval.tools.prepare dataset=NAME [dataset.root=PATH] [cache=true]

Composes the same Hydra config as ``python -m eval`` (``conf/config.yaml``), then for each entry of
``dataset.sources`` (``conf/dataset/NAME.yaml``, the one registry of URLs, sizes and checksums):
downloads it into ``ROOT/downloads/`` (progress bar, resumes a partial download, verifies the
recorded size and md5/sha256), extracts it (or, for a plain file, copies it to ``dest``), and
writes a marker under ``ROOT/.prepared/`` so that a second run does nothing.  Sources marked
``manual`` (Cityscapes needs a login) are never downloaded: the exact steps are printed and the
files the user put in ``ROOT`` (or ``ROOT/downloads``) are verified and extracted.  Finally the
loader indexes the split and the image count is reported; with ``cache=true`` (short for
``dataset.cache=true``) the preprocessed Arrow cache of ``eval.datasets.cache`` is built as well.
"""

from __future__ import annotations

import json
import os
import sys
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from eval.tools.download import download, extract, place, verify

if TYPE_CHECKING:
    from omegaconf import DictConfig

CONF_DIR = Path(__file__).resolve().parents[2] / "conf"


@dataclass
class PrepareReport:
    """What one ``prepare`` call did, per source file name."""

    done: list[str] = field(default_factory=list)
    already: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)
    n_images: int | None = None
    nothing_to_do: bool = False  # a generated dataset

    @property
    def complete(self) -> bool:
        return not self.missing and self.n_images is not None


def _marker(root: Path, file: str) -> Path:
    return root / ".prepared" / f"{file}.done"


def prepare_source(src: Mapping, root: Path, progress: bool = True) -> bool:
    """Fetch (or find), verify and unpack one source; False when a manual file is absent."""
    file = src["file"]
    checks = {k: src.get(k) for k in ("size", "md5", "sha256")}
    if src.get("manual"):
        found = [p for p in (root / file, root / "downloads" / file) if p.is_file()]
        if not found:
            return False
        archive = found[0]
        verify(archive, **checks)
    else:
        archive = download(src["url"], root / "downloads" / file, checks, progress)
    if src.get("dest"):
        place(archive, root / src["dest"])
    else:
        extract(archive, root / src.get("extract_to", "."), src.get("include"), progress)
    marker = _marker(root, file)
    marker.parent.mkdir(parents=True, exist_ok=True)
    marker.write_text(json.dumps({k: src.get(k) for k in ("url", *checks)}) + "\n")
    return True


def fetch_sources(
    sources: Sequence[Mapping],
    root: Path,
    report: PrepareReport,
    progress: bool,
    echo: Callable[[str], None],
) -> None:
    """Prepare each source not prepared yet, noting in ``report`` what was done or is missing."""
    for src in sources:
        file = src["file"]
        if _marker(root, file).exists():
            echo(f"{file}: already prepared")
            report.already.append(file)
        elif prepare_source(src, root, progress):
            echo(f"{file}: downloaded, verified and unpacked into {root}")
            report.done.append(file)
        else:
            report.missing.append(file)


def prepare(
    dataset: Mapping, progress: bool = True, echo: Callable[[str], None] = print
) -> PrepareReport:
    """Prepare the dataset described by ``dataset`` (a resolved ``cfg.dataset`` mapping)."""
    from eval.datasets import build, registry

    name = dataset["name"]
    report = PrepareReport()
    if not registry.get(name).files:
        echo(f"{name}: generated on the fly, nothing to prepare")
        report.nothing_to_do = True
        return report
    if dataset.get("root") in (None, ""):
        raise ValueError(f"{name}: dataset.root is not set; pass dataset.root=PATH")
    root = Path(dataset["root"]).expanduser().resolve()
    root.mkdir(parents=True, exist_ok=True)
    # A Parquet/hub source replaces the files: nothing to download.
    fetch_sources(
        [] if dataset.get("source") else dataset.get("sources") or [], root, report, progress, echo
    )
    steps = (dataset.get("manual_steps") or "").format(root=root)
    if report.missing:
        echo(f"{name}: {', '.join(report.missing)} not found in {root}. Manual steps:\n{steps}")
        return report
    options = {**dataset, "root": root}
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            data = build(options)
    except FileNotFoundError as e:
        echo(f"{name}: the files are in place but the split is not readable yet: {e}")
        if steps:
            echo(f"Remaining manual steps:\n{steps}")
        return report
    for w in caught:
        echo(f"warning: {w.message}")
    report.n_images = len(data)
    echo(f"{name} ({options.get('split')}): {len(data)} images ready in {root}")
    if options.get("cache"):
        from eval.datasets.cache import cache_root

        where = cache_root(name, root, options.get("cache_dir"))
        echo(f"{name}: preprocessed cache ready under {where}")
    return report


def compose_config(overrides: list[str]) -> DictConfig:
    """``conf/config.yaml`` with ``overrides``, resolved as ``python -m eval`` would see it.

    The logger group is left out: preparing data needs none. The model stays (its config only, not
    loaded): the defaults list chooses the segmenter's tuned values by dataset and model."""
    from hydra import compose, initialize_config_dir
    from hydra.core.hydra_config import HydraConfig
    from omegaconf import OmegaConf, open_dict

    drop = ["~logger"]
    drop = [d for d in drop if not any(o.lstrip("+~").startswith(d[1:]) for o in overrides)]
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base=None):
        cfg = compose("config", overrides=[*drop, *overrides], return_hydra_config=True)
    with open_dict(cfg):
        # compose() leaves the run-time fields empty; the paths in config.yaml use them.
        for key in ("cwd", "output_dir"):
            if OmegaConf.is_missing(cfg.hydra.runtime, key) or not cfg.hydra.runtime[key]:
                cfg.hydra.runtime[key] = os.getcwd()
    HydraConfig.instance().set_config(cfg)
    return cfg


def main(argv: list[str] | None = None) -> int:
    from omegaconf import OmegaConf

    argv = sys.argv[1:] if argv is None else argv
    if any(a in ("-h", "--help") for a in argv):
        print(__doc__)
        return 0
    bad = [a for a in argv if "=" not in a]
    if bad:
        print(f"arguments must be key=value Hydra overrides, got {bad}", file=sys.stderr)
        return 2
    # `cache=true` is short for dataset.cache=true: build the preprocessed cache too.
    argv = [f"dataset.{a}" if a.split("=")[0] == "cache" else a for a in argv]
    cfg = compose_config(argv)
    dataset = OmegaConf.to_container(cfg.dataset, resolve=True)
    try:
        report = prepare(dataset)
    except (OSError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0 if report.complete or report.nothing_to_do else 1


if __name__ == "__main__":
    sys.exit(main())
