"""One home per parameter, registries and schemas: every experiment composes to a config whose
parameters each appear once and pass their schemas; every dataset and segmenter config is
registered (and every registered one has a config); bad values are one-line errors naming the key;
a dataset is added with one module and one config file."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.core.hydra_config import HydraConfig
from omegaconf import OmegaConf, open_dict

from eval.__main__ import CONFIG_DIR
from eval.datasets import build, get_dataset, registry
from eval.results import record
from eval.schema import check_run, validate
from eval.scoring.protocol import Protocol
from eval.segmenters import get as segmenter_spec
from eval.segmenters import names as segmenter_names
from eval.segmenters import segmenter_call, settings

CONF = Path(CONFIG_DIR)
EXPERIMENTS = sorted(p.stem for p in (CONF / "experiment").glob("*.yaml"))
DATASETS = sorted(p.stem for p in (CONF / "dataset").glob("*.yaml"))
SEGMENTERS = sorted(p.stem for p in (CONF / "segmenter").glob("*.yaml"))


def composed(*overrides: str) -> tuple[dict, dict]:
    """The job config ``python -m eval OVERRIDES --cfg job`` prints (resolved, as a run sees it)
    and the sweep's parameters."""
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        cfg = compose("config", overrides=list(overrides), return_hydra_config=True)
    with open_dict(cfg):
        cfg.hydra.runtime.output_dir = "/o"  # compose() leaves it empty; paths.output_dir uses it
    HydraConfig.instance().set_config(cfg)  # ${hydra:...} resolves as in a run
    job = {
        k: OmegaConf.to_container(v, resolve=True) if OmegaConf.is_config(v) else v
        for k, v in cfg.items()
        if k != "hydra"
    }
    params = cfg.hydra.sweeper.get("params")
    return job, OmegaConf.to_container(params) if params else {}


def keys(tree: object, prefix: str = "") -> list[str]:
    """Every dotted key of a nested dict."""
    if not isinstance(tree, dict):
        return []
    return [k for key, v in tree.items() for k in [prefix + key, *keys(v, f"{prefix}{key}.")]]


def schema_fields(schema: type) -> set[str]:
    return {f.name for f in dataclasses.fields(schema)}


# Keys a segmenter takes that no dataset schema has: found under dataset/ or protocol/ they
# would be a second home of a segmenter parameter.
SEGMENTER_KEYS = set().union(*(schema_fields(segmenter_spec(n).schema) for n in SEGMENTERS))
DATASET_KEYS = set().union(*(schema_fields(registry.get(n).schema) for n in registry.names()))
SEGMENTER_ONLY = SEGMENTER_KEYS - DATASET_KEYS


@pytest.mark.parametrize("name", EXPERIMENTS)
def test_experiment_has_one_value_per_parameter_and_passes_the_schemas(name: str) -> None:
    job, sweeps = composed(f"+experiment={name}")
    plain, _ = composed()
    # No top-level key of its own (such as a `kl` copied into the segmenter).
    assert set(job) == set(plain)
    assert "kl_threshold" in SEGMENTER_ONLY and "num_points" in SEGMENTER_ONLY
    for section in ("dataset", "protocol"):
        assert not SEGMENTER_ONLY & set(keys(job[section])), section
    # The KL threshold lives in the segmenter only; a sweep sets a group or a key the run reads.
    kl = [k for k in keys(job) if k.rpartition(".")[2].startswith("kl")]
    assert kl == (["segmenter.kl_threshold"] if job["segmenter"]["name"] == "diffseg" else [])
    for key in sweeps:
        assert key in ("dataset", "segmenter") or key in keys(job), key
    # Every section passes its schema.
    check_run(job)
    Protocol.from_config(job["protocol"])
    validate(registry.get(job["dataset"]["name"]).schema, job["dataset"], "dataset")
    segmenter = settings(job["segmenter"])
    assert len(segmenter.get("kl_threshold", [])) in (0, 3)


def test_ablation_kl_sweeps_the_segmenters_threshold_and_records_three_values() -> None:
    job, sweeps = composed("+experiment=ablation_kl", "segmenter.kl_threshold=0.9")
    assert set(sweeps) == {"dataset", "segmenter.kl_threshold"}
    assert job["segmenter"]["kl_threshold"] == 0.9  # the config: one value
    protocol = Protocol.from_config(job["protocol"])
    row = record.settings(job, "sd14", protocol, 512, torch.device("cpu"), None)
    call = segmenter_call(job["segmenter"], 512, 0)
    # The ledger and the call: the three iterations' thresholds.
    assert row["kl_threshold"] == row["segmenter_settings"]["kl_threshold"] == [0.9] * 3
    assert call["kl_threshold"] == [0.9] * 3


def test_every_dataset_config_is_registered_and_every_registered_dataset_has_one() -> None:
    assert registry.names() == DATASETS
    for name in DATASETS:
        job, _ = composed(f"dataset={name}")
        spec = registry.get(job["dataset"]["name"])
        assert spec.name == name
        target = job["dataset"]["_target_"]
        assert target == f"{spec.loader.__module__}.{spec.loader.__name__}"
        assert job["dataset"]["title"]
        validate(spec.schema, job["dataset"], "dataset")
        # A dataset of files has the published size of its configured split registered.
        assert spec.files == (job["dataset"]["split"] in spec.split_sizes), name


def test_every_segmenter_config_is_registered_and_checks() -> None:
    assert segmenter_names() == SEGMENTERS
    for name in SEGMENTERS:
        job, _ = composed(f"segmenter={name}")
        assert job["segmenter"]["name"] == name
        call = segmenter_call(job["segmenter"], 512, 0)
        assert set(call) == {*job["segmenter"], "seed", "resolution"}


@pytest.mark.parametrize(
    ("check", "match"),
    [
        (lambda: check_run({"limit": "ten"}), r"^limit: Value 'ten'"),
        (lambda: check_run({"batch_size": 0}), r"^batch_size must be a positive integer, got 0"),
        (lambda: check_run({"num_workers": -1}), r"^num_workers must be an integer >= 0"),
        (lambda: get_dataset("synthetic", length="many"), r"^dataset\.length: Value 'many'"),
        (
            lambda: get_dataset("synthetic", resolution=0),
            r"^dataset\.resolution must be a positive",
        ),
        (lambda: get_dataset("voc", "/r", colour=1), r"^voc: unknown dataset options \['colour'\]"),
        (lambda: get_dataset("voc", "/r", antialias="x"), r"^dataset\.antialias: Value 'x'"),
        (
            lambda: segmenter_call({"name": "diffseg", "num_points": "x"}, 512, 0),
            r"^segmenter\.num_points: Value 'x'",
        ),
        (
            lambda: segmenter_call({"name": "diffseg", "first_merge_dtype": "f32"}, 512, 0),
            r"^segmenter\.first_merge_dtype must be one of \['float64', 'float16'\], got 'f32'",
        ),
        (
            lambda: segmenter_call({"name": "diffseg", "kl_threshold": "high"}, 512, 0),
            r"^segmenter\.kl_threshold must be a number .* got 'high'",
        ),
        (
            lambda: segmenter_call({"name": "kmeans_c", "n_clusters": 2.5}, 512, 0),
            r"^segmenter\.n_clusters must be a positive int or 'gt'",
        ),
        (lambda: Protocol.from_config({"resolution": "x"}), r"^protocol\.resolution: Value 'x'"),
        (lambda: Protocol.from_config({"pamr": "maybe"}), r"^protocol\.pamr: Value 'maybe'"),
    ],
)
def test_bad_values_are_one_line_naming_the_key(check, match: str) -> None:
    with pytest.raises(ValueError, match=match) as error:
        check()
    assert "\n" not in str(error.value)


def test_a_dataset_is_one_module_and_one_config(tmp_path: Path, monkeypatch) -> None:
    # A module outside the package registers its dataset when the config's _target_ is imported.
    (tmp_path / "toy_data.py").write_text(
        "from eval.datasets.registry import register\n"
        "from eval.datasets.synthetic import SyntheticScenes, SyntheticSettings\n\n\n"
        "@register('toy', SyntheticSettings, files=False)\n"
        "def toy(root=None, split='val', resolution=512, on_error='raise', **options):\n"
        "    return SyntheticScenes(resolution=resolution, n_class=2, regions=2, **options)\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    data = build({"_target_": "toy_data.toy", "name": "toy", "resolution": 16, "length": 3})
    assert len(data) == 3 and data.class_names == ["sky", "grass"]
    assert registry.get("toy").loader.__module__ == "toy_data"
