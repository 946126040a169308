"""The command line on a first run and with bad input: what `make setup` installs, `--help`,
where outputs go, sweeps that go on past a failed job, Ctrl-C, and settings checked before the
model loads.

End-to-end runs use the tiny model at 64x64 with 8x8 anchors on two images, as test_harness.
"""

from __future__ import annotations

import json
import shlex
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

import eval as harness
from eval.atomic import read_csv_rows
from eval.state import LOCK_FILE
from tests.helpers import offline_env, run_module

ROOT = Path(__file__).resolve().parents[2]
FAST = (
    "model=tiny",
    "dataset.resolution=64",
    "n_qualitative=0",
    "num_workers=0",
    "logger=csv",
    "save_predictions=false",
)


# --------------------------------------------------------------------------------------------
# make setup


def make_setup(tmp_path: Path, nvidia_smi: bool) -> str:
    """The commands `make -n setup` prints on a PATH with or without an `nvidia-smi`."""
    make = shutil.which("make")
    if make is None:
        pytest.skip("make is not installed")
    bin_dir = tmp_path / ("gpu" if nvidia_smi else "cpu")
    bin_dir.mkdir()
    if nvidia_smi:
        (bin_dir / "nvidia-smi").write_text("#!/bin/sh\nexit 0\n")
        (bin_dir / "nvidia-smi").chmod(0o755)
    (bin_dir / "uname").symlink_to(shutil.which("uname"))  # Linux, whatever runs the test
    out = subprocess.run(
        [make, "-n", "setup", "VENV=/venv"],
        cwd=ROOT,
        env={"PATH": str(bin_dir)},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 0, out.stderr
    return out.stdout


def test_make_setup_installs_the_cpu_build_of_torch_without_nvidia_smi(tmp_path: Path) -> None:
    commands = make_setup(tmp_path, nvidia_smi=False)
    torch_lines = [line for line in commands.splitlines() if "torch==" in line]
    # The plain requirement would resolve to the package index's CUDA wheel (GBs).
    assert torch_lines and all("torch==2.13.0+cpu" in line for line in torch_lines), commands
    # A local +cpu wheel first (this machine), else PyTorch's documented CPU index.
    assert '/venv/bin/python -m pip install "torch==2.13.0+cpu" 2>/dev/null ||' in commands
    assert "--index-url https://download.pytorch.org/whl/cpu" in commands
    assert commands.index("torch==") < commands.index('pip install -e ".[dev]"')


def test_make_setup_installs_the_cuda_build_with_nvidia_smi(tmp_path: Path) -> None:
    commands = make_setup(tmp_path, nvidia_smi=True)
    assert '/venv/bin/python -m pip install "torch==2.13.0"\n' in commands
    assert "+cpu" not in commands and "whl/cpu" not in commands


# --------------------------------------------------------------------------------------------
# --help and where things go


def test_help_describes_the_tool(tmp_path: Path) -> None:
    out = run_module("eval", tmp_path, "--help")
    assert out.returncode == 0, out.stderr
    assert "powered by hydra" not in out.stdout.lower()
    assert "python -m eval: evaluate DiffSeg" in out.stdout
    for group in (
        "dataset: ade20k, cityscapes",
        "model: sd14, sd15, sd21base, ssd1b, tiny",
        "segmenter:",
    ):
        assert group in out.stdout
    # The offline example uses the toy trained model (the random `tiny` gives one segment).
    assert "python -m eval model=tiny_trained dataset.hard=true logger=csv" in out.stdout
    assert not (tmp_path / "outputs").exists()


def test_make_demo_is_the_readmes_command_on_16_scenes_at_the_models_own_threshold() -> None:
    from eval.tools.prepare import compose_config

    root = Path(harness.CONFIG_DIR).parent
    recipe = (root / "Makefile").read_text().split("\ndemo:\n")[1].split("\n\n")[0]
    args = shlex.split(recipe.replace("\\\n", " "))
    overrides = args[args.index("eval") + 1 :]
    readme = (root / "README.md").read_text()
    quoted = readme.split("# = WANDB_MODE=offline python -m eval ")[1].split("\n```")[0]
    assert shlex.split(quoted.replace("\\\n#", " ")) == overrides
    assert not [o for o in overrides if "kl_threshold" in o]  # the model brings its own
    cfg = compose_config(overrides)
    assert cfg.dataset.length >= 16 and list(cfg.segmenter.kl_threshold) == [0.02] * 3


def test_loading_the_model_stack_warns_of_nothing_a_user_can_act_on(tmp_path: Path) -> None:
    out = run_module("diffseg.pipeline", tmp_path)  # imports diffusers and transformers
    assert out.returncode == 0, out.stderr
    assert "torchvision" not in out.stderr, out.stderr


def test_default_paths_are_under_the_project_root_or_diffseg_home(monkeypatch) -> None:
    from eval.tools.prepare import compose_config

    monkeypatch.chdir(ROOT / "notebooks")
    monkeypatch.delenv("DIFFSEG_HOME", raising=False)
    assert harness.home() == ROOT and (ROOT / "conf" / "config.yaml").exists()
    cfg = compose_config(["dataset=voc"])
    assert cfg.paths.data_dir == str(ROOT / "data") and cfg.dataset.root == str(ROOT / "data/voc")
    assert cfg.paths.ledger == str(ROOT / "outputs" / "ledger.csv")
    monkeypatch.setenv("DIFFSEG_HOME", "elsewhere")  # relative: against the current directory
    assert compose_config([]).paths.ledger == str(ROOT / "notebooks/elsewhere/outputs/ledger.csv")


# --------------------------------------------------------------------------------------------
# Bad settings fail before the model loads


@pytest.mark.parametrize(
    ("override", "match"),
    [
        ("segmenter.num_points=1", r"num_points must be an int in \[2, S=8\].*got 1"),
        ("segmenter.num_points=9", r"num_points must be an int in \[2, S=8\].*got 9"),
        ("segmenter.kl_threshold=[1.1,0]", "positive"),
    ],
)
def test_bad_merge_settings_fail_before_the_model_is_instantiated(
    tmp_path: Path, monkeypatch, override: str, match: str
) -> None:
    import hydra.utils

    from eval.run import evaluate
    from eval.tools.prepare import compose_config

    def no_model(*args, **kwargs):
        raise AssertionError("the model was instantiated before the settings were checked")

    monkeypatch.setattr(hydra.utils, "instantiate", no_model)
    monkeypatch.chdir(tmp_path)  # the run directory (compose_config: the current directory)
    monkeypatch.setenv("DIFFSEG_HOME", str(tmp_path))
    cfg = compose_config(
        [
            "dataset=synthetic",
            "segmenter=diffseg",
            "limit=2",
            "segmenter.num_points=8",
            *FAST,
            override,
        ]
    )
    with pytest.raises(ValueError, match=match):
        evaluate(cfg)
    assert not (tmp_path / "run.json").exists()  # and before the run started


# --------------------------------------------------------------------------------------------
# Sweeps go on past a failed job


def test_run_status_through_failure_resume_and_finish(tmp_path: Path) -> None:
    from eval.jobs import record_failure, set_status
    from eval.state import open_run_state

    def state() -> dict:
        return json.loads((tmp_path / "run.json").read_text())

    boom = ValueError("boom")
    # Failed before it started (e.g. missing data): a stub that the next run there replaces.
    record_failure(tmp_path, boom, ["dataset=voc"])
    assert state() == {
        "status": "failed",
        "error": "ValueError: boom",
        "overrides": ["dataset=voc"],
    }
    run_id = open_run_state(tmp_path, {"seed": 0})["run_id"]
    assert state()["status"] == "running" and state()["pinned"] == {"seed": 0}
    record_failure(tmp_path, boom, [])
    assert (state()["status"], state()["run_id"]) == ("failed", run_id)
    open_run_state(tmp_path, {"seed": 0})  # a resume
    assert state()["status"] == "running" and "error" not in state()
    set_status(tmp_path, "finished")
    record_failure(tmp_path, boom, [])  # e.g. a resume refused for other settings
    assert state()["status"] == "finished" and "error" not in state()
    assert (tmp_path / "error.log").read_text().count("ValueError: boom") == 3


@pytest.mark.slow
def test_sweep_runs_every_job_and_lists_the_failed_one(tmp_path: Path) -> None:
    # From a subdirectory, with the default places: all under DIFFSEG_HOME, voc (absent) too.
    home, cwd = tmp_path / "home", tmp_path / "somewhere" / "else"
    cwd.mkdir(parents=True)
    args = ("-m", "dataset=voc,synthetic", "limit=2", "segmenter.num_points=8", *FAST)
    out = run_module("eval", cwd, *args, DIFFSEG_HOME=str(home))
    assert out.returncode == 1, out.stdout[-2000:] + out.stderr[-2000:]
    assert not list(cwd.iterdir())
    (sweep,) = (home / "outputs" / "multirun").iterdir()
    # The second job ran although the first failed: its results and its ledger row.
    (row,) = read_csv_rows(sweep / "1" / "results.csv")
    assert row["dataset"] == "synthetic"
    assert [r["run_id"] for r in read_csv_rows(home / "outputs" / "ledger.csv")] == [row["run_id"]]
    assert json.loads((sweep / "1" / "run.json").read_text())["status"] == "finished"
    failed = json.loads((sweep / "0" / "run.json").read_text())
    assert failed["status"] == "failed" and "dataset=voc" in failed["overrides"]
    assert failed["error"].startswith(f"FileNotFoundError: voc: dataset not found at {home}/data")
    assert "Traceback" in (sweep / "0" / "error.log").read_text()
    # Reported when it failed and in the summary at the end: overrides, error, log.
    summary = out.stderr[out.stderr.index("1 of 2 jobs failed") :]
    assert "job 0 (dataset=voc limit=2 " in summary and "FileNotFoundError: voc" in summary
    assert str(sweep / "0" / "error.log") in summary and "Traceback" not in out.stderr


@pytest.mark.slow
def test_a_sweeps_refused_resume_is_listed_and_fails_the_sweep(tmp_path: Path) -> None:
    # Launched again into its folder with job 1's setting changed: job 1 would resume a run made
    # with another num_points, is refused (its folder untouched) and must not pass unseen.
    sweep = tmp_path / "sweep"
    common = ("-m", "dataset=synthetic", "limit=2", f"hydra.sweep.dir={sweep}", *FAST)
    first = run_module("eval", tmp_path, *common, "segmenter.num_points=8,6")
    assert first.returncode == 0, first.stdout[-2000:] + first.stderr[-2000:]

    def files() -> dict[Path, bytes]:  # but the lock's, which names its last holder
        return {
            p: p.read_bytes()
            for p in (sweep / "1").rglob("*")
            if p.is_file() and p.name != LOCK_FILE
        }

    before = files()
    again = run_module("eval", tmp_path, *common, "segmenter.num_points=8,4")
    assert again.returncode == 1, again.stdout[-2000:] + again.stderr[-2000:]
    summary = again.stderr[again.stderr.index("1 of 2 jobs failed") :]
    assert "job 1 (" in summary and "segmenter.num_points=4" in summary
    assert "RunRefused" in summary and "nothing in its folder was changed" in summary
    assert files() == before
    # The next launch lists its own refusals only: with the settings of the first, none.
    third = run_module("eval", tmp_path, *common, "segmenter.num_points=8,6")
    assert third.returncode == 0, third.stderr[-2000:]


@pytest.mark.slow
def test_optuna_search_goes_on_after_a_failed_trial(tmp_path: Path) -> None:
    # TPE seed 10 draws num_points=1 (refused) first, then 4.
    out = run_module(
        "eval",
        tmp_path,
        "-m",
        "+experiment=optuna_search",
        "hydra.sweeper.n_trials=2",
        "hydra.sweeper.sampler.seed=10",
        "segmenter.num_points=choice(1,4)",
        "segmenter.kl_threshold=1.0",
        "segmenter.timestep=300",
        "dataset=synthetic",
        "dataset.split=val",
        "limit=2",
        *FAST,
    )
    assert out.returncode == 1, out.stdout[-2000:] + out.stderr[-2000:]
    (sweep,) = (tmp_path / "outputs" / "multirun").iterdir()
    states = [json.loads((sweep / job / "run.json").read_text()) for job in ("0", "1")]
    assert [s["status"] for s in states] == ["failed", "finished"]
    assert "segmenter.num_points=1" in states[0]["overrides"]
    (row,) = read_csv_rows(sweep / "1" / "results.csv")
    result = yaml.safe_load((sweep / "optimization_results.yaml").read_text())
    assert result["best_params"]["segmenter.num_points"] == 4
    assert result["best_value"] == pytest.approx(float(row["miou"]))
    assert "1 of 2 jobs failed" in out.stderr and "job 0 (segmenter.num_points=1" in out.stderr


# --------------------------------------------------------------------------------------------
# Ctrl-C


@pytest.mark.slow
def test_ctrl_c_says_what_was_kept_and_how_to_resume(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    args = [
        "dataset=synthetic",
        "segmenter.num_points=8",
        *FAST,
        "limit=6",
        f"hydra.run.dir={run_dir}",
        f"paths.ledger={tmp_path / 'ledger.csv'}",
    ]
    proc = subprocess.Popen(
        [sys.executable, "-m", "eval", *args],
        cwd=tmp_path,
        env=offline_env(DIFFSEG_HOME=str(tmp_path)),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    log = run_dir / "per_image.jsonl"
    deadline = time.monotonic() + 240
    while not (log.exists() and log.read_bytes().count(b"\n") >= 1) and proc.poll() is None:
        assert time.monotonic() < deadline
        time.sleep(0.01)
    proc.send_signal(signal.SIGINT)
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 130, stderr[-3000:]
    assert "Traceback" not in stderr
    (line,) = [x for x in stderr.splitlines() if x.startswith("Interrupted: ")]
    done = log.read_bytes().count(b"\n")
    assert 1 <= done < 6, "the run finished before it could be interrupted"
    assert f"Interrupted: {done} finished image(s) kept in {log}; resume with: " in line
    assert json.loads((run_dir / "run.json").read_text())["status"] == "interrupted"

    # The printed command, run as printed (with this interpreter), finishes the run.
    command = line.split("resume with: ")[1]
    assert command.startswith("python -m eval ") and f"hydra.run.dir={run_dir}" in command
    resumed = subprocess.run(
        command.replace("python", shlex.quote(sys.executable), 1),
        shell=True,
        cwd=tmp_path,
        env=offline_env(DIFFSEG_HOME=str(tmp_path)),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"{done}/6" in resumed.stderr  # started from the kept images
    assert read_csv_rows(run_dir / "results.csv")[0]["n_images"] == "6"
    assert json.loads((run_dir / "run.json").read_text())["status"] == "finished"
