"""``python -m eval [overrides]``: compose ``conf/config.yaml`` with Hydra and run the evaluation.

Kept thin so that ``--cfg job``, ``--help`` and composition errors (an unknown dataset, a bad
override) answer before torch or any model is imported (except under torchrun, where the
process group starts first: see ``eval.distributed``); a bad setting is refused by
``eval.preflight`` before the run folder is made and before the model's stack is imported.
"""

from __future__ import annotations

import contextlib
import os
import sys
from pathlib import Path
from typing import NoReturn

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig

from eval import CONFIG_DIR, jobs
from eval.jobs import fail

# Under torchrun only rank 0 records the run's state.
IS_MAIN_RANK = os.environ.get("RANK", "0") in ("", "0")


def job_failed(cfg: DictConfig, error: Exception) -> jobs.FailedRun:
    """A single run stops (one line, exit 1); a sweep's job reports its failure and returns, so
    that the other jobs run (``jobs.SweepSummary`` lists the failures at the end)."""
    hydra_cfg = HydraConfig.get()
    overrides = list(hydra_cfg.overrides.task)
    run_dir = Path(cfg.paths.output_dir).resolve()
    from eval.runtime import RunRefused  # torch is loaded by now (kept out of --help and --cfg)

    # A refused run leaves the folder as it found it (it may be another process's, running); a
    # sweep keeps the refusal in its own folder.
    refused = isinstance(error, RunRefused)
    log = jobs.record_failure(run_dir, error, overrides) if IS_MAIN_RANK and not refused else None
    if hydra_cfg.mode != RunMode.MULTIRUN:
        fail(error, log)
    if IS_MAIN_RANK and refused:
        jobs.record_refusal(hydra_cfg.sweep.dir, run_dir, hydra_cfg.job.num, error, overrides)
    where = (
        "refused: nothing in its folder was changed"
        if refused
        else f"traceback in {log or 'no log: it could not be written'}"
    )
    print(
        f"\nError in job {hydra_cfg.job.num} ({' '.join(overrides)}): {jobs.error_text(error)}"
        f"\n({where}; the sweep goes on)",
        file=sys.stderr,
    )
    return jobs.FailedRun(jobs.error_text(error), str(log))


def interrupted(cfg: DictConfig) -> NoReturn:
    """Ctrl-C: one line with what was kept and the command that resumes; exit status 130."""
    if IS_MAIN_RANK:
        overrides = list(HydraConfig.get().overrides.task)
        print("\n" + jobs.record_interrupt(Path(cfg.paths.output_dir), overrides), file=sys.stderr)
    sys.exit(130)


@hydra.main(config_path=CONFIG_DIR, config_name="config", version_base="1.3")
def main(cfg: DictConfig) -> float | jobs.FailedRun:
    """Returns the run's mIoU (a fraction), the objective Hydra sweepers such as Optuna read
    (a failed job of a sweep: :class:`eval.jobs.FailedRun`)."""
    from eval.preflight import check_config
    from eval.state import run_lock

    try:
        # A single run was checked before its folder was made (eval.preflight.Preflight); a
        # sweep's job here, before the model's stack is imported.
        if HydraConfig.get().mode == RunMode.MULTIRUN:
            check_config(cfg)
        from eval.run import evaluate

        # One process per run folder (rank 0 holds it for all ranks of a torchrun).
        lock = run_lock(cfg.paths.output_dir) if IS_MAIN_RANK else contextlib.nullcontext()
        with lock:
            outputs = evaluate(cfg)
        # Under torchrun only rank 0 has the results; the other ranks return nan.
        return float(outputs.results["miou"]) if outputs is not None else float("nan")
    except KeyboardInterrupt:
        interrupted(cfg)
    except Exception as e:
        return job_failed(cfg, e)


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
    from eval.preflight import check_override_keys

    try:
        check_override_keys(sys.argv[1:])
    except ValueError as e:
        fail(e)
    start_distributed()
    try:
        main()
    finally:
        if "eval.distributed" in sys.modules:
            sys.modules["eval.distributed"].shutdown()
