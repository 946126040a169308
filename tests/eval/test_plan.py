"""A run's plan and its tracks: the config checked once at the top of the run (``eval.plan``),
one object per segmenter with the fan-out over them in one place (``eval.tracks``)."""

from __future__ import annotations

from pathlib import Path

import pytest

FAST = ("model=tiny", "dataset.resolution=64", "num_workers=0", "logger=csv")
EXTRA = ("+segmenter@segmenters.km=kmeans_c", "segmenter.num_points=8")


def composed(tmp_path: Path, monkeypatch, *overrides: str):
    """The composed config of a run in ``tmp_path``, as ``python -m eval`` gets it (without the
    ``hydra`` section compose() adds)."""
    from omegaconf import open_dict

    from eval.tools.prepare import compose_config

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("DIFFSEG_HOME", str(tmp_path))
    cfg = compose_config(["dataset=synthetic", *FAST, *EXTRA, *overrides])
    with open_dict(cfg):
        del cfg["hydra"]
    return cfg


class ModelLoads(Exception):
    """Raised where the model would be instantiated: everything before it has run."""


def test_each_segmenter_config_is_validated_once_before_the_model_loads(
    tmp_path: Path, monkeypatch
) -> None:
    import hydra.utils

    import eval.segmenters.registry as registry
    from eval.run import evaluate

    checked = []
    original = registry._checked

    def counting(segmenter):
        checked.append(segmenter["name"])
        return original(segmenter)

    def no_model(*args, **kwargs):
        raise ModelLoads

    monkeypatch.setattr(registry, "_checked", counting)
    monkeypatch.setattr(hydra.utils, "instantiate", no_model)
    cfg = composed(tmp_path, monkeypatch, "dataset.length=2")
    with pytest.raises(ModelLoads):
        evaluate(cfg)
    # Checked, pinned for a resume and recorded for the ledger: one validation each.
    assert sorted(checked) == ["diffseg", "kmeans_c"]


def test_the_plan_holds_what_the_run_needs_checked(tmp_path: Path, monkeypatch) -> None:
    from eval.plan import plan_run
    from eval.segmenters import segmenter_call

    cfg = composed(tmp_path, monkeypatch, "batch_size=3", "seed=4")
    plan = plan_run(cfg, {"model": "tiny"})
    assert (plan.batch_size, plan.num_workers, plan.seed, plan.resolution) == (3, 0, 4, 64)
    assert plan.model_choice == "tiny" and plan.cache is None
    own, km = plan.segmenters
    assert (own.own, own.name, own.folder) == (True, "", Path(cfg.paths.output_dir))
    assert (km.own, km.name, km.key) == (False, "km", "segmenters.km")
    assert km.folder == Path(cfg.paths.output_dir) / "segmenters" / "km"
    # The calls the segmenters get are those segmenter_call makes from the config.
    assert own.call == segmenter_call(dict(cfg.segmenter), 64, 4)
    assert km.call == segmenter_call(dict(cfg.segmenters.km), 64, 4, "segmenters.km")


def test_a_bad_added_segmenter_is_named_by_its_key_when_the_model_is_checked() -> None:
    from eval.plan import plan_segmenter

    plan = plan_segmenter("segmenters.d", {"name": "diffseg", "num_points": 8}, Path("x"), 64, 0)
    plan.check_model(8)
    with pytest.raises(ValueError, match=r"^segmenters\.d \(segmenter=diffseg\): num_points"):
        plan.check_model(16)  # SDXL's grid: 4 positions a side at 64 px


def test_the_runs_own_track_is_found_by_its_key_not_its_place(tmp_path: Path) -> None:
    from eval.plan import plan_segmenter
    from eval.tracks import make_tracks

    def plan(key: str):
        return plan_segmenter(key, {"name": "kmeans_c"}, tmp_path / key, 64, 0)

    plans = [plan("segmenters.a"), plan("segmenter")]
    record = {"index": 0, "tp": [3, 0], "fp": [1, 0], "fn": [0, 2], "total": 6}
    records = {"segmenters.a": {0: record}, "segmenter": {}}
    settings = {p.key: {"segmenter": "kmeans_c"} for p in plans}
    logged = []

    class Logger:
        def log_final(self, *args, prefix: str = "") -> None:
            logged.append(prefix)

    tracks = make_tracks(plans, "r1", settings, records, 2, Logger())
    assert tracks.own.plan.key == "segmenter" and tracks.own.run_id == "r1"
    assert [t.run_id for t in tracks] == ["r1-a", "r1"]
    assert set(tracks.running()) == {"a/pixel_accuracy", "a/miou", "pixel_accuracy", "miou"}
    assert tracks.running()["a/pixel_accuracy"] == 0.5  # the finished record's counts
    assert tracks.own.logger.__class__ is Logger  # an added one logs through a prefixed view
    tracks.tracks[0].logger.log_final({}, [], [])  # segmenters.a
    assert logged == ["a/"]
