"""``segmenter=diffcut`` (eval/segmenters/diffcut.py) on the tiny model: the UNet pass that also
captures DiffCut's features, the segment function, its settings and the published cells."""

from __future__ import annotations

import csv
import json
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from diffseg.diffcut import diffcut_segment
from diffseg.features import capture_features
from diffseg.passes import PassSettings
from diffseg.pipeline import DiffSegPipeline
from eval.results import paper
from eval.segmenters import segment_all, segment_batch, segmenter_call, settings
from tests.helpers import run_module, wandb_summary


@pytest.fixture(scope="module")
def pipe() -> DiffSegPipeline:
    return DiffSegPipeline.from_tiny(seed=0, device="cpu")


@pytest.fixture(scope="module")
def images() -> torch.Tensor:
    return torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(3))


CONFIG = Path(__file__).parents[3] / "conf" / "segmenter" / "diffcut.yaml"
PASS = PassSettings(timestep=50, resolution=64, noise=True, seed=42)
CUT = replace(PASS, numerics="diffcut")  # the segmenter's pass: DiffCut's numerics


def test_unet_pass_captures_features_without_changing_the_attention(pipe, images) -> None:
    out = pipe.unet_pass(images, PASS)
    plain = pipe.attention(images, PASS)
    assert list(out.attention) == list(plain)
    assert all(torch.equal(out.attention[r], plain[r]) for r in plain)
    # The features of the last encoder self-attention layer, by the capture used on its own.
    latents = pipe.encode_images(pipe.preprocess(images, 64))
    with capture_features(pipe.unet) as store:
        pipe.capture_attention(latents, PASS)
    assert out.features.shape == store.features.shape and out.features.shape[0] == 2
    assert torch.equal(out.features, store.features)
    assert pipe.unet_pass(images, PASS, features=False).features is None


def test_diffcut_segmenter_labels_are_diffcut_on_the_pass_features(pipe, images) -> None:
    config = {**OmegaConf.to_container(OmegaConf.load(CONFIG)), "tau": 0.9, "alpha": 5.0}
    call = segmenter_call(config, 64, seed=0)
    # DiffCut's pass (its code's seed 42, not the run's): conf/segmenter/diffcut.yaml.
    assert PassSettings.of(call) == PASS
    labels = segment_batch(pipe, images, [{"id": "a"}, {"id": "b"}], call)
    features = pipe.unet_pass(images, CUT).features
    assert labels.shape == (2, 64, 64) and labels.device.type == "cpu"
    assert torch.equal(labels, diffcut_segment(features, 64, alpha=5.0, tau=0.9))
    # tau decides the number of segments: a tiny tau never splits.
    low = segment_batch(pipe, images, [{"id": "a"}, {"id": "b"}], {**call, "tau": 1e-9})
    assert all(len(x.unique()) == 1 for x in low)


@pytest.mark.parametrize(
    ("key", "value"), [("tau", 0), ("alpha", -1.0), ("tau", float("nan")), ("bogus", 1)]
)
def test_diffcut_settings_refuse_bad_values_naming_the_key(key, value) -> None:
    with pytest.raises(ValueError, match=f"segmenter.{key}|{key}"):
        settings({"name": "diffcut", key: value})


def test_a_diffcut_run_targets_a_diffcut_cell_never_a_diffseg_one() -> None:
    row = {"protocol": "diffcut", "protocol_settings": {"compat": False}, "dataset": "voc"}
    assert paper.target({**row, "segmenter": "diffseg"}).method.name == "DiffSeg"
    # DiffCut's lines, by the model and PAMR the run used (the tiny model: the first line, with
    # its deviations).
    cut = {**row, "segmenter": "diffcut", "protocol_settings": {"compat": False, "pamr": True}}
    assert paper.target({**cut, "model": "tiny"}).method.name == "DiffCut (SSD-1B)"
    assert paper.target({**cut, "model": "sd14"}).method.name == "DiffCut (SD 1.4)"


def _calls(**diffcut) -> list[dict]:
    diffseg = {"name": "diffseg", "timestep": 300, "kl_threshold": [1.1] * 3, "num_points": 8}
    kmeans = {"name": "kmeans_c", "timestep": 300, "n_clusters": 3, "seed": 7}
    cut = {**OmegaConf.to_container(OmegaConf.load(CONFIG)), **diffcut}
    return [segmenter_call(c, 64, seed=0) for c in (diffseg, kmeans, cut)]


@pytest.mark.parametrize(
    ("diffcut", "passes"),
    [({}, 2), ({"timestep": 300, "noise": False}, 2)],
    ids=["diffcut-own-pass", "diffcut-own-numerics"],
)
def test_one_pass_feeds_several_segmenters_their_labels_alone(pipe, images, diffcut, passes):
    calls = _calls(**diffcut)
    items = [{"id": "a"}, {"id": "b"}]
    seen = []
    hook = pipe.unet.register_forward_pre_hook(lambda *_: seen.append(1))
    try:
        shared = segment_all(pipe, images, items, calls)
        # DiffSeg and K-means share theirs; DiffCut's is its own even on their setting (numerics).
        assert len(seen) == passes
        alone = [segment_batch(pipe, images, items, call) for call in calls]
    finally:
        hook.remove()
    assert len(seen) == passes + len(calls)
    for a, b in zip(shared, alone, strict=True):
        assert torch.equal(a.cpu(), b.cpu())
    # The seed is part of a noised pass's setting: another seed is another pass.
    seen.clear()
    hook = pipe.unet.register_forward_pre_hook(lambda *_: seen.append(1))
    try:
        segment_all(pipe, images, items, [calls[2], {**calls[2], "seed": 1}])
    finally:
        hook.remove()
    assert len(seen) == (2 if calls[2]["noise"] else 1)


RUN = ("dataset=synthetic", "model=tiny", "dataset.resolution=64", "limit=2", "logger=csv")
RUN += ("num_workers=0",)


def _records(run_dir: Path) -> list[dict]:
    lines = (run_dir / "per_image.jsonl").read_text().splitlines()
    return [{k: v for k, v in json.loads(x).items() if k != "seconds"} for x in lines]


def test_one_run_names_three_segmenters_each_row_as_its_run_alone(tmp_path: Path) -> None:
    extras = ("segmenter.num_points=8", "+segmenter@segmenters.kc=kmeans_c")
    extras += ("+segmenter@segmenters.cut=diffcut",)
    multi = run_module("eval", tmp_path, *RUN, *extras, "segmenters.cut.tau=0.7", "hydra.run.dir=m")
    assert multi.returncode == 0, multi.stderr
    rows = list(csv.DictReader((tmp_path / "outputs" / "ledger.csv").open()))
    assert [r["segmenter"] for r in rows] == ["diffseg", "kmeans_c", "diffcut"]
    assert len({r["run_id"] for r in rows}) == 3
    assert json.loads(rows[2]["segmenter_settings"])["tau"] == 0.7
    # It ends with one table of the three side by side.
    table = multi.stdout[multi.stdout.index("The segmenters side by side:") :].splitlines()[1:]
    header = [c.strip() for c in table[0].split("|")[1:-1]]
    assert header == ["segmenter", "pixel acc %", "mIoU %", "segments/img", "img/s"]
    names = [line.split("|")[1].strip() for line in table[2:]]
    assert names == ["segmenter (diffseg)", "segmenters.kc (kmeans_c)", "segmenters.cut (diffcut)"]
    assert f"{100 * float(rows[1]['miou']):.2f}" in table[3]

    # DiffCut on its own (its pass differs from the others'; test_one_pass_... checks the
    # labels of all three in process): the same records.
    one = run_module(
        "eval", tmp_path, *RUN, "segmenter=diffcut", "segmenter.tau=0.7", "hydra.run.dir=a"
    )
    assert one.returncode == 0, one.stderr
    assert _records(tmp_path / "m" / "segmenters" / "cut") == _records(tmp_path / "a")


def test_qualitative_pictures_name_their_segmenter(tmp_path: Path, monkeypatch) -> None:
    from eval import loop
    from eval.results import visualize

    titles = []
    monkeypatch.setattr(visualize, "save_comparison", lambda *args: titles.append(args[-1]))
    item = {"id": "x", "image": None, "label": None}
    loop.save_qualitative(0, item, None, [], tmp_path, "kmeans_c")
    assert titles == ["x: kmeans_c"]


def test_each_segmenter_is_logged_in_the_run_logger_under_its_key(tmp_path: Path) -> None:
    run = tmp_path / "m"
    args = [*RUN, "segmenter.num_points=8", "+segmenter@segmenters.kc=kmeans_c"]
    out = run_module("eval", tmp_path, *args, "logger=wandb", f"hydra.run.dir={run}")
    assert out.returncode == 0, out.stderr
    (own,) = csv.DictReader((run / "results.csv").open())
    (extra,) = csv.DictReader((run / "segmenters" / "kc" / "results.csv").open())
    assert own["miou"] != extra["miou"]  # else the test could not tell them apart
    summary = wandb_summary(run)
    assert summary["miou"] == pytest.approx(float(own["miou"]), rel=1e-12)
    assert summary["kc/miou"] == pytest.approx(float(extra["miou"]), rel=1e-12)
    assert summary["kc/run_id"] == extra["run_id"]
    # Running metrics: one line per batch, the extra segmenter's beside the run's own.
    (last,) = list(csv.DictReader((run / "metrics.csv").open()))[-1:]
    assert float(last["kc/miou"]) == pytest.approx(float(extra["miou"]))
    assert float(last["miou"]) == pytest.approx(float(own["miou"]))


def test_diffcut_labels_do_not_depend_on_the_features_memory_layout(pipe, images) -> None:
    # The pass gives (B, C, h, w) as a view of the layer's (B, N, C) output; a cache or another
    # pipeline gives it contiguous. Same values, same labels.
    features = pipe.unet_pass(images, CUT).features
    assert not features.is_contiguous()
    view = diffcut_segment(features, 64)
    assert torch.equal(diffcut_segment(features.contiguous(), 64), view)


def test_diffcut_reads_its_features_from_the_attention_cache(pipe, images, tmp_path) -> None:
    from diffseg.segmenter import UNetPass
    from eval.models.attention_cache import AttentionCache, CachedAttentionPipeline, image_hash

    items = [{"id": "a"}, {"id": "b"}]
    (call,) = _calls()[2:]
    expected = segment_batch(pipe, images, items, call)
    full = pipe.unet_pass(images[:1], PASS)  # a batch of one: its own rounding
    seen = []
    hook = pipe.unet.register_forward_pre_hook(lambda *_: seen.append(1))
    try:
        first = CachedAttentionPipeline(pipe, AttentionCache(tmp_path, {"m": 0}, "float32"))
        assert torch.equal(segment_batch(first, images, items, call), expected)
        again = CachedAttentionPipeline(pipe, AttentionCache(tmp_path, {"m": 0}, "float32"))
        assert torch.equal(segment_batch(again, images, items, call), expected)
        assert len(seen) == 1 and again.cache.hits == 2
        # DiffCut's pass captures no attention: its entries hold the features alone.
        stored = again.cache.load(again.cache.key(image_hash(images[0]), CUT.key()))
        assert stored.attention == {} and stored.features is not None
        # An entry stored without features (an older cache) serves attention, not features.
        old = CachedAttentionPipeline(pipe, AttentionCache(tmp_path / "old", {"m": 0}, "float32"))
        key = old.cache.key(image_hash(images[0]), PASS.key())
        old.cache.save(key, UNetPass({r: a[0] for r, a in full.attention.items()}))
        old.attention(images[:1], PASS)
        assert len(seen) == 1
        assert torch.equal(old.unet_pass(images[:1], PASS).features, full.features)
        assert len(seen) == 2 and old.cache.load(key).features is not None
    finally:
        hook.remove()


def test_a_diffcut_run_behind_the_cache_runs_the_unet_once(tmp_path: Path) -> None:
    args = (*RUN, "segmenter=diffcut", "cache.attention=true", "cache.dtype=float32")
    first = run_module("eval", tmp_path, *args, "hydra.run.dir=a")
    assert first.returncode == 0, first.stderr
    second = run_module("eval", tmp_path, *args, "segmenter.tau=0.7", "hydra.run.dir=b")
    assert second.returncode == 0, second.stderr
    assert "2 image(s) read, 0 computed" in second.stdout
    alone = run_module("eval", tmp_path, *RUN, "segmenter=diffcut", "segmenter.tau=0.7",
                       "hydra.run.dir=c")  # fmt: skip
    assert alone.returncode == 0, alone.stderr
    assert _records(tmp_path / "b") == _records(tmp_path / "c")


def test_diffcut_labels_are_made_at_the_protocols_scoring_size(pipe, images) -> None:
    # DiffCut's code upsamples its features straight to the scoring size (128); labels made at
    # the input side and then subsampled take other pixels' assignments.
    from eval.plan import plan_segmenter
    from eval.scoring.protocol import Protocol, Scoring

    diffseg = {"name": "diffseg", "timestep": 300, "kl_threshold": [1.1] * 3, "num_points": 8}
    cut = OmegaConf.to_container(OmegaConf.load(CONFIG))
    cut_call, seg_call = (
        plan_segmenter(key, config, Path("x"), 128, seed=0, score_resolution=32).call
        for key, config in (("segmenter", cut), ("segmenters.s", diffseg))
    )
    assert cut_call["score_resolution"] == 32 and "score_resolution" not in seg_call
    labels = segment_batch(pipe, images, [{"id": "a"}, {"id": "b"}], cut_call)
    features = pipe.unet_pass(images, replace(CUT, resolution=128)).features
    assert labels.shape == (2, 32, 32)
    assert torch.equal(labels, diffcut_segment(features, 32))
    # Scored as made: neither brought to the label's size nor resampled.
    protocol = Protocol("diffcut", resolution=128, crop="min_minus_one", score_resolution=32)
    score = Scoring(protocol, n_class=3, background=None)
    assert score.at_score_size(labels[0]) and not score.at_score_size(torch.zeros(128, 128))
    item = {"image": torch.rand(3, 128, 128), "label": torch.zeros(128, 128, dtype=torch.long)}
    assert torch.equal(score(item, labels[0])[1], labels[0])
