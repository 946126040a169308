"""Evaluation harness for DiffSeg: datasets, the official Hungarian scoring, runs and paper tables.

Sub-modules are imported on demand (``eval.scoring.matching``, ``eval.scoring.metrics``, ``eval.report.tables``...), so
importing the package itself stays cheap and pulls in neither torch nor pandas.

``${diffseg_home:}`` in ``conf/*.yaml`` is :func:`home`: default paths (``data/``, ``outputs/``)
resolve against it, not against the current directory.
"""

import os
from pathlib import Path

from omegaconf import OmegaConf

PROJECT_ROOT = Path(__file__).resolve().parents[1]
CONFIG_DIR = str(PROJECT_ROOT / "conf")


def home() -> Path:
    """``$DIFFSEG_HOME`` when set, else the project root (the folder holding ``conf/``)."""
    return Path(os.environ.get("DIFFSEG_HOME") or PROJECT_ROOT).expanduser().resolve()


OmegaConf.register_new_resolver("diffseg_home", lambda: str(home()), replace=True)
# Files shipped with the code (the toy model), wherever $DIFFSEG_HOME points.
OmegaConf.register_new_resolver("project_root", lambda: str(PROJECT_ROOT), replace=True)


def description(doc: str | None) -> str:
    """A module docstring's first paragraph as one line: a command's ``--help`` description (its
    first line alone can stop mid-sentence)."""
    return " ".join((doc or "").strip().split("\n\n")[0].split())
