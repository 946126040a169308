"""``python -m eval [overrides]``: compose ``conf/config.yaml`` with Hydra and run the evaluation.

Kept thin so that ``--cfg job``, ``--help`` and composition errors (an unknown dataset, a bad
override) answer before torch or any model is imported.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import hydra
from omegaconf import DictConfig

CONFIG_DIR = str(Path(__file__).resolve().parents[1] / "conf")


def fail(error: BaseException) -> None:
    """One clear line for an error that stops a run (the traceback with HYDRA_FULL_ERROR=1)."""
    if os.environ.get("HYDRA_FULL_ERROR") == "1":
        raise error
    print(f"\nError: {type(error).__name__}: {error}", file=sys.stderr)
    print("(set HYDRA_FULL_ERROR=1 for the full traceback)", file=sys.stderr)
    sys.exit(1)


@hydra.main(config_path=CONFIG_DIR, config_name="config", version_base="1.3")
def main(cfg: DictConfig) -> None:
    from eval.run import evaluate

    try:
        evaluate(cfg)
    except Exception as e:
        fail(e)


if __name__ == "__main__":
    main()
