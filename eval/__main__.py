"""``python -m eval [overrides]``: compose ``conf/config.yaml`` with Hydra and run the evaluation.

Kept thin so that ``--cfg job``, ``--help`` and composition errors (an unknown dataset, a bad
override) answer before torch or any model is imported (except under torchrun, where the
process group starts first: see ``eval.distributed``).
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
def main(cfg: DictConfig) -> float:
    """Returns the run's mIoU (a fraction), the objective Hydra sweepers such as Optuna read."""
    from eval.run import evaluate

    try:
        outputs = evaluate(cfg)
        # Under torchrun only rank 0 has the results; the other ranks return nan.
        return float(outputs.results["miou"]) if outputs is not None else float("nan")
    except Exception as e:
        fail(e)


def start_distributed() -> None:
    """Under torchrun (``WORLD_SIZE > 1``): start the process group and give every rank rank 0's
    clock (``DIFFSEG_RUN_TIME``, read by ``hydra.run.dir``), so all ranks share one run directory;
    ranks other than 0 leave ``.hydra/`` to rank 0."""
    if os.environ.get("WORLD_SIZE", "1") in ("", "0", "1"):
        return
    from eval import distributed

    rank = distributed.init()
    distributed.shared_run_time()
    if not rank.is_main and not any(a.startswith("hydra.output_subdir=") for a in sys.argv):
        sys.argv.append("hydra.output_subdir=null")


if __name__ == "__main__":
    start_distributed()
    try:
        main()
    finally:
        if "eval.distributed" in sys.modules:
            sys.modules["eval.distributed"].shutdown()
