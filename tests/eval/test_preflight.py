"""Config mistakes are refused before the model's stack is imported and before Hydra makes a run
folder (``eval.preflight``), in one line."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.helpers import run_module

HEAVY = ("diffusers", "torchmetrics", "transformers")


def imported(stderr: str) -> set[str]:
    """The top-level packages ``python -X importtime`` reports in ``stderr``."""
    return {
        line.split("|")[-1].strip().split(".")[0]
        for line in stderr.splitlines()
        if line.startswith("import time:")
    }


@pytest.mark.parametrize(
    "override, message",
    [
        ("batch_size=0", "batch_size must be a positive integer, got 0"),
        ("+bach_size=2", "unknown setting(s) ['bach_size']"),
        # Without +: refused before Hydra, whose answer would be to append it with +.
        ("bach_size=2", "unknown setting 'bach_size' in bach_size=2: did you mean batch_size?"),
        (
            "modle.dtype=float16",
            "unknown setting 'modle' in modle.dtype=float16: did you mean model?",
        ),
    ],
)
def test_a_config_mistake_is_one_line_before_the_model_stack_and_leaves_no_folder(
    tmp_path: Path, override: str, message: str
) -> None:
    out = run_module("eval", tmp_path, override)
    assert out.returncode == 1
    assert message in out.stderr
    assert not (tmp_path / "outputs").exists(), list(tmp_path.rglob("*"))
    lines = [line for line in out.stderr.splitlines() if line.strip()]
    assert lines[0].startswith("Error: ValueError: ") and len(lines) == 2, out.stderr


def test_config_checks_import_no_heavy_library(tmp_path: Path) -> None:
    out = run_module("eval", tmp_path, "segmenter.kl_threshold=-1", PYTHONPROFILEIMPORTTIME="1")
    assert out.returncode == 1 and "kl_threshold" in out.stderr
    assert not imported(out.stderr) & set(HEAVY)
    # The run's own scalars and the keys are checked before torch.
    out = run_module("eval", tmp_path, "batch_size=0", PYTHONPROFILEIMPORTTIME="1")
    assert out.returncode == 1 and "batch_size" in out.stderr
    assert not imported(out.stderr) & {"torch", *HEAVY}


def test_diffseg_home_pointing_at_a_file_is_one_line(tmp_path: Path) -> None:
    home = tmp_path / "home"
    home.write_text("")
    out = run_module("eval", tmp_path, DIFFSEG_HOME=str(home))
    assert out.returncode == 1
    lines = [line for line in out.stderr.splitlines() if line.strip()]
    assert lines[0] == (
        f"Error: ValueError: DIFFSEG_HOME={home} is a file, not a folder; point DIFFSEG_HOME at a "
        "folder (outputs/ and data/ go there) or unset it (the project root)"
    )
    assert len(lines) == 2


def test_an_unwritable_run_folder_is_one_line(tmp_path: Path) -> None:
    # A path under a file cannot be made (root ignores read-only modes; this it cannot).
    (tmp_path / "file").write_text("")
    out = run_module("eval", tmp_path, f"hydra.run.dir={tmp_path / 'file' / 'run'}")
    assert out.returncode == 1
    lines = [line for line in out.stderr.splitlines() if line.strip()]
    assert lines[0].startswith(f"Error: RunError: cannot write the run folder {tmp_path}/file/run")
    assert "hydra.run.dir=PATH" in lines[0] and len(lines) == 2


@pytest.mark.parametrize(
    "overrides, match",
    [
        (["+bach_size=2"], r"unknown setting\(s\) \['bach_size'\]"),
        (["dataset.resolution=63"], "resolution must be a positive multiple of 8"),
        (["segmenter.kl_threshold=[0.5,-1,1]"], r"got \[0.5, -1, 1\], where -1.0 is not"),
        (["+segmenter@segmenters.cut=diffcut", "segmenters.cut.tau=-1"], "segmenters.cut"),
        (["device=cuda:99"], "cuda"),
    ],
)
def test_check_config_refuses(
    tmp_path: Path, monkeypatch, overrides: list[str], match: str
) -> None:
    from eval.preflight import check_config
    from eval.tools.prepare import compose_config

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("DIFFSEG_HOME", str(tmp_path))
    cfg = compose_config(overrides)
    with pytest.raises((ValueError, RuntimeError), match=match):
        check_config(cfg)


def test_check_config_accepts_every_experiment_and_the_defaults(
    tmp_path: Path, monkeypatch
) -> None:
    from eval.preflight import check_config, config_keys
    from eval.tools.prepare import compose_config

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("DIFFSEG_HOME", str(tmp_path))
    check_config(compose_config(["device=cpu"]))
    experiments = sorted(p.stem for p in (Path(__file__).parents[2] / "conf/experiment").glob("*"))
    for name in experiments:
        cfg = compose_config([f"+experiment={name}", "device=cpu"])
        assert set(cfg) - {"hydra"} <= config_keys(), name


def test_an_empty_dataset_folder_names_the_root_the_layout_and_the_fix(
    tmp_path: Path, monkeypatch
) -> None:
    from omegaconf import open_dict

    from eval.plan import plan_run
    from eval.run import load_data
    from eval.runtime import RunError
    from eval.tools.prepare import compose_config

    root = tmp_path / "cityscapes"
    for folder in ("leftImg8bit/val", "gtFine/val"):
        (root / folder).mkdir(parents=True)
    monkeypatch.chdir(tmp_path)
    cfg = compose_config(["dataset=cityscapes", f"dataset.root={root}", "logger=csv"])
    with open_dict(cfg):
        del cfg["hydra"]  # as python -m eval gets it
    with pytest.warns(UserWarning), pytest.raises(RunError) as e:
        load_data(plan_run(cfg, {}))
    assert str(e.value) == (
        f"dataset cityscapes (split val) has no images under dataset.root={root}: check "
        "dataset.root and dataset.split (the layout: README, Datasets), or fill it with "
        f"python -m eval.tools.prepare dataset=cityscapes dataset.root={root}"
    )


def test_a_full_disk_marks_the_run_failed_and_says_so_in_one_line(
    tmp_path: Path, monkeypatch, capsys
) -> None:
    import builtins
    import errno
    import json

    from eval import jobs

    jobs.set_status(tmp_path, "running")
    full = OSError(errno.ENOSPC, "No space left on device")

    def no_space(*args, **kwargs):
        raise full

    real_open = builtins.open

    def open_(path, *args, **kwargs):
        return (
            no_space() if str(path).endswith(jobs.ERROR_LOG) else real_open(path, *args, **kwargs)
        )

    with monkeypatch.context() as m:  # no new file, no room in the log
        m.setattr(jobs, "write_json_atomic", no_space)
        m.setattr(builtins, "open", open_)
        assert jobs.record_failure(tmp_path, full, ["limit=2"]) is None
    state = json.loads((tmp_path / jobs.STATE_FILE).read_text())
    assert state["status"] == "failed" and "No space left" in state["error"]
    with pytest.raises(SystemExit):
        jobs.fail(full, None)
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert lines[0].startswith(
        "Error: OSError: [Errno 28] No space left on device (the disk is full"
    )
    assert len(lines) == 2


def test_an_input_side_whose_attention_cannot_fit_is_refused_before_the_model_loads(
    tmp_path: Path, monkeypatch
) -> None:
    from eval import preflight
    from eval.tools.prepare import compose_config

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(preflight, "available_memory", lambda device: 8 * preflight.GIB)
    cfg = compose_config(["dataset.resolution=2048", "device=cpu"])
    with pytest.raises(ValueError) as e:
        preflight.check_config(cfg)
    assert str(e.value).startswith(
        "dataset.resolution=2048 with batch_size=1 needs more than 16.0 GiB"
    )
    assert str(e.value).endswith("lower dataset.resolution (the paper: 512) or batch_size")
    preflight.check_config(compose_config(["dataset.resolution=512", "device=cpu"]))
