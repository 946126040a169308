"""Experiment configs (conf/experiment/), sweeps and launchers: every experiment composes and every
swept value composes; a two-point Hydra multirun on the tiny model writes two ledger rows and a
sweep plot; the Optuna sweeper runs two trials and maximises what `python -m eval` returns; the
SLURM launcher config composes (not launched: no cluster here)."""

from __future__ import annotations

import csv
import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from hydra import compose, initialize_config_dir
from hydra.core.override_parser.overrides_parser import OverridesParser
from omegaconf import OmegaConf
from PIL import Image

from eval import CONFIG_DIR
from eval.analysis.tune import choose
from eval.segmenters import segmenter_call, settings
from tests.helpers import offline_env

EXPERIMENTS = sorted(p.stem for p in (Path(CONFIG_DIR) / "experiment").glob("*.yaml"))
SWEEPS = {
    "ablation_kl": {"dataset", "segmenter.kl_threshold"},
    "ablation_timestep": {"dataset", "segmenter.timestep"},
    "ablation_points": {"dataset", "segmenter.num_points"},
    "ablation_weights": {"dataset", "segmenter.weights"},
    "ablation_refine": {"dataset", "segmenter.refine"},
    "extra_datasets": {"dataset"},
    "table1_kmeans": {"dataset", "segmenter"},
    "optuna_search": {"segmenter.kl_threshold", "segmenter.timestep", "segmenter.num_points"},
    "diffcut_diffseg": {"dataset"},
    "diffcut_ssd1b": {"dataset"},
    "diffcut_sd14": {"dataset"},
    "tune_kl": {"segmenter.kl_threshold"},
}
MODELS = {"diffcut_ssd1b": "ssd1b"}  # the Hydra model choice where it is not SD 1.4
TABLES_CMD = (sys.executable, "-m", "eval.report.tables")
TINY = (
    "model=tiny",
    "dataset=synthetic",
    "dataset.resolution=64",
    "limit=2",
    "logger=csv",
    "num_workers=0",
    "n_qualitative=0",
    "save_predictions=false",
)


def composed(*overrides: str):
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        return compose("config", overrides=list(overrides), return_hydra_config=True)


def test_the_expected_experiments_exist() -> None:
    assert set(EXPERIMENTS) == {*SWEEPS, "table1_coco", "table1_cityscapes", "tune_kl_val"}


def test_kl_is_tuned_on_training_images_and_evaluated_once_on_val() -> None:
    tune = composed("+experiment=tune_kl")
    assert (tune.dataset.name, tune.dataset.split, tune.limit) == ("cityscapes", "train", 200)
    val = composed("+experiment=tune_kl_val", "segmenter.kl_threshold=0.7")
    assert (val.dataset.split, val.limit) == ("val", None)
    resolved = settings(OmegaConf.to_container(val.segmenter, resolve=True))
    assert resolved["kl_threshold"] == [0.7, 0.7, 0.7]
    # The chosen value: best mIoU among the sweep's rows (latest per threshold, ties to the
    # smaller threshold), rescorings and other experiments left out.
    rows = [
        {"experiment": "tune_kl", "dataset": "cityscapes", "kl_threshold": [kl] * 3, "miou": m,
         "n_images": 200, "split": "train", "ledger_version": "2", "rescored_from": rescored}
        for kl, m, rescored in [(0.9, 0.30, ""), (0.7, 0.31, ""), (1.1, 0.31, ""), (0.7, 0.20, ""),
                                (0.5, 0.90, "abc")]
    ] + [{"experiment": "ablation_kl", "dataset": "cityscapes", "kl_threshold": [1.3] * 3,
          "miou": 0.99, "n_images": 200, "ledger_version": "2"}]  # fmt: skip
    (choice,) = choose(rows)
    assert (choice.dataset, choice.kl, choice.value) == ("cityscapes", 1.1, 0.31)
    assert choice.scores == {0.7: 0.20, 0.9: 0.30, 1.1: 0.31}


@pytest.mark.parametrize("name", EXPERIMENTS)
def test_experiment_composes_and_each_swept_value_composes(name: str) -> None:
    cfg = composed(f"+experiment={name}")
    assert cfg.experiment == name
    assert cfg.hydra.runtime.choices.model == MODELS.get(name, "sd14")
    params = dict(cfg.hydra.sweeper.params or {})
    assert set(params) == SWEEPS.get(name, set())
    if name.startswith("optuna"):
        return  # distributions, not values: run in test_optuna_runs_two_trials
    parser = OverridesParser.create()
    for key, values in params.items():
        (override,) = parser.parse_overrides([f"{key}={values}"])
        for text, value in zip(
            override.sweep_string_iterator(), override.sweep_iterator(), strict=True
        ):
            one = composed(f"+experiment={name}", f"{key}={text}")
            OmegaConf.resolve(one.segmenter)  # interpolations resolve
            got = one[key].name if key in ("dataset", "segmenter") else OmegaConf.select(one, key)
            assert (OmegaConf.to_object(got) if OmegaConf.is_config(got) else got) == value


@pytest.mark.parametrize(
    ("name", "dataset", "kl", "split"),
    [
        ("table1_coco", "coco_stuff27", 1.1, "curated"),
        ("table1_cityscapes", "cityscapes", 0.9, "val"),
    ],
)
def test_table1_settings_are_the_papers(name: str, dataset: str, kl: float, split: str) -> None:
    cfg = composed(f"+experiment={name}")
    assert cfg.dataset.name == dataset and cfg.dataset.split == split
    assert cfg.model.model == "CompVis/stable-diffusion-v1-4"
    seg = cfg.segmenter
    assert (seg.name, seg.timestep, seg.num_points, seg.refine) == ("diffseg", 300, 16, False)
    assert list(seg.kl_threshold) == [kl] * 3 and seg.weights is None
    assert cfg.dataset.resolution == 512 and cfg.protocol.name == "diffseg"


def test_scalar_kl_is_broadcast_to_the_three_iterations() -> None:
    cfg = composed("+experiment=ablation_kl", "segmenter.kl_threshold=0.7")
    segmenter = OmegaConf.to_container(cfg.segmenter, resolve=True)
    assert settings(segmenter)["kl_threshold"] == [0.7] * 3
    assert segmenter_call(segmenter, 512, 0)["kl_threshold"] == [0.7] * 3


def test_a_model_carries_its_tuned_threshold_unless_one_is_set() -> None:
    def kl(*overrides: str) -> list[float]:
        return list(composed(*overrides).segmenter.kl_threshold)

    assert kl("model=tiny_trained", "dataset.hard=true") == [0.02] * 3
    assert kl("model=tiny_trained", "dataset=cityscapes") == [0.02] * 3  # the model's scale wins
    assert kl("model=tiny_trained", "segmenter.kl_threshold=[0.5,0.5,0.5]") == [0.5] * 3
    assert kl("model=tiny") == [1.1] * 3
    assert kl("model=sd14", "dataset=cityscapes") == [0.9] * 3


def test_kmeans_segmenters_compose() -> None:
    c = composed("segmenter=kmeans_c", "seed=3").segmenter
    s = composed("segmenter=kmeans_s").segmenter
    assert (c.name, c.n_clusters, c.seed, c.timestep) == ("kmeans_c", 6, 3, 300)
    assert (s.name, s.n_clusters, s.timestep) == ("kmeans_s", "gt", 300)


def test_slurm_launcher_composes() -> None:
    cfg = composed("hydra/launcher=slurm", "hydra.launcher.partition=gpu")
    launcher = cfg.hydra.launcher
    assert launcher._target_.endswith("submitit_launcher.SlurmLauncher")
    assert (launcher.partition, launcher.gpus_per_node, launcher.timeout_min) == ("gpu", 1, 240)
    assert "${hydra.sweep.dir}" in OmegaConf.to_container(launcher)["submitit_folder"]


@pytest.fixture(scope="module")
def multiruns(tmp_path_factory):
    """The KL sweep and the Optuna search, started together (two processes, one thread each)."""
    tmp = tmp_path_factory.mktemp("multirun")
    runs = {
        "sweep": [
            "+experiment=ablation_kl",
            "segmenter.kl_threshold=0.5,1.5",
            "segmenter.num_points=4",
        ],
        "optuna": [
            "+experiment=optuna_search",
            "hydra.sweeper.n_trials=2",
            "segmenter.num_points=choice(2,4)",
        ],
    }
    procs = {}
    for name, args in runs.items():
        cmd = [
            sys.executable,
            "-m",
            "eval",
            "-m",
            *args,
            *TINY,
            f"paths.ledger={tmp / name / 'ledger.csv'}",
            f"hydra.sweep.dir={tmp / name / 'sweep'}",
        ]
        log = open(tmp / f"{name}.log", "w")  # noqa: SIM115 - closed below
        procs[name] = (
            subprocess.Popen(
                cmd, cwd=tmp, env=offline_env(DIFFSEG_HOME=str(tmp)), stdout=log, stderr=log
            ),
            log,
        )
    for proc, log in procs.values():
        proc.wait(timeout=300)
        log.close()
    for name, (proc, _) in procs.items():
        assert proc.returncode == 0, (tmp / f"{name}.log").read_text()[-3000:]
    return tmp


def ledger_rows(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_two_point_sweep_writes_two_rows_and_a_plot(multiruns: Path) -> None:
    ledger = multiruns / "sweep" / "ledger.csv"
    rows = ledger_rows(ledger)
    assert [(r["experiment"], r["model"], r["kl_threshold"], r["num_points"]) for r in rows] == [
        ("ablation_kl", "tiny", "[0.5, 0.5, 0.5]", "4"),
        ("ablation_kl", "tiny", "[1.5, 1.5, 1.5]", "4"),
    ]
    out = multiruns / "plots"
    done = subprocess.run(
        [*TABLES_CMD, "--sweep", "kl_threshold", "--ledger", str(ledger), "--out", str(out)],
        capture_output=True,
        text=True,
        env=offline_env(),
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    with Image.open(out / "sweep_ablation_kl_kl_threshold.png") as png:
        assert png.format == "PNG" and png.width > 100
    points = ledger_rows(out / "sweep_ablation_kl_kl_threshold.csv")
    assert [(p["dataset"], p["kl_threshold"]) for p in points] == [
        ("synthetic", "[0.5, 0.5, 0.5]"),
        ("synthetic", "[1.5, 1.5, 1.5]"),
    ]


def test_optuna_runs_two_trials_maximising_the_returned_miou(multiruns: Path) -> None:
    rows = ledger_rows(multiruns / "optuna" / "ledger.csv")
    assert len(rows) == 2 and {r["experiment"] for r in rows} == {"optuna_search"}
    assert {r["num_points"] for r in rows} <= {"2", "4"}
    for row in rows:
        kl = json.loads(row["kl_threshold"])
        assert len(kl) == 3 and len(set(kl)) == 1 and 0.5 <= float(kl[0]) <= 1.5
        assert 50 <= int(row["timestep"]) <= 900
    result = yaml.safe_load((multiruns / "optuna" / "sweep" / "optimization_results.yaml").open())
    assert result["best_value"] == pytest.approx(max(float(r["miou"]) for r in rows))
    assert set(result["best_params"]) == SWEEPS["optuna_search"]
