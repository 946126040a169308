"""Rescoring without the model (eval.scoring.contingency, eval.analysis.rescore) and the granularity report
(eval.scoring.granularity): stored tables against the pixel-level functions, rules and Boundary IoU on
hand-computed cases, and a COCO-Stuff fixture run rescored with diffusers unimportable."""

from __future__ import annotations

import csv
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from scipy.ndimage import binary_erosion

from eval.results import paper
from eval.scoring import contingency, granularity
from eval.scoring.matching import confusion_histogram, match_histogram, match_per_image
from eval.scoring.protocol import Protocol, Scoring, merge_unmatched_into_background
from eval.scoring.rules import RescoreError, Rules, majority_counts, score
from tests import fixtures as fx
from tests.helpers import run_module


def random_pair(rng: np.random.Generator, n_class: int, n_seg: int, side: int = 12):
    """A prediction and a label with ignored pixels (-1 and 255), as torch tensors."""
    pred = torch.from_numpy(rng.integers(0, n_seg, (side, side)))
    label = rng.integers(0, n_class, (side, side))
    label[rng.random((side, side)) < 0.15] = -1
    label[rng.random((side, side)) < 0.05] = 255
    return pred, torch.from_numpy(label)


def test_table_gives_back_the_official_histogram_and_counts():
    rng = np.random.default_rng(0)
    for k in range(30):
        pred, label = random_pair(rng, n_class=5, n_seg=3 + k % 6)
        if k % 3 == 0:  # the widest id only on ignored pixels: it still sets the width
            label[0, 0], pred[0, 0] = -1, 20
        table = contingency.image_table(pred, label, 5)
        hist = contingency.histogram(table)
        assert np.array_equal(hist, confusion_histogram(pred, label, 5))
        tp, fp, fn, total = match_histogram(hist)
        for got, want in zip((tp, fp, fn, total), match_per_image(pred, label, 5), strict=True):
            assert np.array_equal(got, want)
        assert table[0, -1].sum() == int(((label < 0) | (label >= 5)).sum())
        segments, _ = granularity.image_counts(table)
        assert segments == torch.unique(pred).numel()  # the record's "segments"


def test_parts_round_trip_and_each_record_reads_its_own_part(tmp_path):
    rng = np.random.default_rng(1)
    tables = {i: contingency.image_table(*random_pair(rng, 4, 5), 4) for i in range(4, 8)}
    # A batch killed after its part was written but before records 6 and 7 were appended ...
    stale = contingency.write_part(tmp_path, 0, {**tables, 6: tables[4]})
    # ... and the resumed run's batch of 6 and 7.
    fresh = contingency.write_part(tmp_path, 0, {6: tables[6], 7: tables[7]})
    assert (stale, fresh) == (
        "contingency/part-0-000004.parquet",
        "contingency/part-0-000006.parquet",
    )
    records = [{"index": i, "contingency": stale if i < 6 else fresh} for i in range(4, 8)]
    back = contingency.read_tables(tmp_path, records, 4)
    assert sorted(back) == [4, 5, 6, 7]
    for i in back:
        assert np.array_equal(back[i], tables[i])
    with pytest.raises(
        contingency.ContingencyError, match=r"per_image\.jsonl: image x .*no contingency"
    ):
        contingency.read_tables(tmp_path, [{"index": 9, "id": "x"}], 4)
    assert not list((tmp_path / "contingency").glob(".*tmp"))


@pytest.mark.parametrize("background", [0, 2])
def test_background_merge_on_the_table_equals_the_pixel_merge(background):
    rng = np.random.default_rng(2)
    rules = Rules("voc", ("a", "b", "c", "d"), False, None, background)
    for k in range(40):
        pred, label = random_pair(rng, n_class=4, n_seg=2 + k % 7, side=8)
        merged = merge_unmatched_into_background(pred, label, 4, background)
        table = contingency.image_table(pred, label, 4)
        got = contingency.merge_background(table, background)
        assert np.array_equal(got[0], contingency.image_table(merged, label, 4)[0])
        counts = rules.image(table, "background_merge")
        for key, want in zip(
            ("tp", "fp", "fn", "total"), match_per_image(merged, label, 4), strict=True
        ):
            assert np.array_equal(counts[key], want)


def test_the_runs_rule_under_compat_matches_in_diffcuts_class_order():
    """Scoring.match (DiffCut's order, background last) and the table rule agree, on images
    where the order decides a tie (checked: the plain order would count otherwise)."""
    rng = np.random.default_rng(3)
    scoring = Scoring(Protocol(name="diffcut", compat=True), 4, 0)
    rules = Rules("voc", ("bg", "a", "b", "c"), True, 0, 0)
    tie_decided = 0
    for _ in range(60):
        pred = torch.from_numpy(rng.integers(0, 6, (4, 4)))
        label = torch.from_numpy(rng.integers(0, 2, (4, 4)))  # classes 2, 3 absent: ties
        table = contingency.image_table(pred, label, 4)
        counts = rules.image(table, "background_merge")  # the run's own rule: stored as scored
        want = scoring.match(pred, label)
        for key, value in zip(("tp", "fp", "fn", "total"), want, strict=True):
            assert np.array_equal(counts[key], value)
        plain = match_per_image(pred, label, 4)
        tie_decided += not all(np.array_equal(a, b) for a, b in zip(plain, want, strict=True))
    assert tie_decided > 0


def test_majority_voting_by_hand():
    hist = np.array([[5, 0, 2], [1, 4, 3]])
    tp, fp, fn, total = majority_counts(hist)
    # Segments 0 -> class 0; 1 and 2 -> class 1 (3 > 2).
    assert tp.tolist() == [5, 7] and fp.tolist() == [1, 2] and fn.tolist() == [2, 1]
    assert total == 15
    assert match_histogram(hist)[0].tolist() == [5, 4]  # one-to-one: segment 2 unmatched


def test_rules_that_do_not_apply_say_why():
    merged = Rules("voc", ("background", "cat"), False, 0, 0)
    assert merged.own == "background_merge"
    assert "merged" in merged.unavailable("hungarian")
    plain = Rules("coco_stuff27", ("a", "b"), False, None, None)
    assert plain.unavailable("background_merge") == "coco_stuff27 has no background class"


def test_a_merge_that_would_follow_pamr_is_refused():
    # A run with PAMR but without the merge stored refined segments: merging them now would be
    # the reverse of DiffCut's order (merge, then PAMR).
    settings = {"compat": False, "pamr": True, "background": {}}
    row = {"protocol": "diffcut", "dataset": "voc", "protocol_settings": settings}
    names = ("background", "cat")
    refined = Rules.from_row(row, names)
    assert refined.own == "hungarian" and refined.unavailable("hungarian") is None
    assert "PAMR" in refined.unavailable("background_merge")
    with pytest.raises(RescoreError, match="merges before PAMR"):
        score({0: np.zeros((4, 3, 2), dtype=np.int64)}, refined, "background_merge")
    # Without PAMR the merge applies to the raw clusters, as DiffCut's order has it.
    raw = Rules.from_row({**row, "protocol_settings": {**settings, "pamr": False}}, names)
    assert raw.unavailable("background_merge") is None
    # The merge made by the run itself (before PAMR) is the run's own rule.
    merged = {**settings, "background": {"voc": "background"}}
    assert Rules.from_row({**row, "protocol_settings": merged}, names).own == "background_merge"


def test_boundary_band_is_ciou_erosion_of_every_region():
    rng = np.random.default_rng(4)
    for d in (1, 2, 3):
        labels = rng.integers(0, 3, (5, 7)).repeat(3, axis=0).repeat(2, axis=1)
        band = contingency.boundary_band(labels, d)
        for v in range(3):
            mask = labels == v
            eroded = binary_erosion(mask, structure=np.ones((3, 3)), iterations=d, border_value=0)
            assert np.array_equal(band & mask, mask & ~eroded)


def test_boundary_iou_by_hand():
    """6x6, d = 1. Classes: columns 0-2 and 3-5; segments: columns 0-3 and 4-5.
    Class 0's band: 14 pixels, segment 0's: 16, shared 10 -> 10/20. Class 1's band: 14,
    segment 1's: all 12, shared 8 -> 8/18."""
    label = np.repeat([[0, 0, 0, 1, 1, 1]], 6, axis=0)
    pred = np.repeat([[0, 0, 0, 0, 1, 1]], 6, axis=0)
    table = contingency.image_table(pred, label, 2)
    assert contingency.boundary_width(6, 6) == 1
    result = score({0: table}, Rules("x", ("a", "b"), False, None, None), "hungarian")
    assert np.allclose(result["per_class_boundary_iou"], [10 / 20, 8 / 18])
    assert result["boundary_iou"] == pytest.approx(17 / 36)
    assert np.isnan(
        score({0: table}, Rules("x", ("a", "b"), False, None, None), "majority")["boundary_iou"]
    )


def test_granularity_rates_and_histogram_by_hand():
    segments, classes = np.array([3, 1, 2, 2]), np.array([2, 2, 2, 1])
    assert granularity.rates(segments, classes) == (0.5, 0.25)
    joint = granularity.joint_histogram(segments, classes)
    want = np.zeros((4, 3), dtype=np.int64)
    want[3, 2] = want[1, 2] = want[2, 2] = want[2, 1] = 1
    assert np.array_equal(joint, want)


def test_granularity_heatmap_shows_the_diagonal_over_all_data_with_integer_ticks():
    fig = granularity.figure(np.array([1, 1, 2]), np.array([4, 5, 5]), "t")
    (ax,) = [a for a in fig.axes if a.get_label() != "<colorbar>"]
    fig.canvas.draw()
    # Data up to 5 classes and 2 segments: both axes reach 5, where the diagonal meets the data.
    assert ax.get_xlim() == ax.get_ylim() == (-0.5, 5.5)
    for ticks in (ax.get_xticks(), ax.get_yticks()):
        shown = [t for t in ticks if -0.5 <= t <= 5.5]
        assert all(float(t).is_integer() for t in shown), shown


@pytest.mark.parametrize(
    "module",
    ["eval.analysis.rescore", "eval.report.tables", "eval.results.ledger", "eval.analysis.tune"],
)
def test_help_describes_the_command_in_whole_sentences(module):
    out = subprocess.run(
        [sys.executable, "-m", module, "--help"], capture_output=True, text=True, check=True
    )
    usage_end = out.stdout.index("\n\n") + 2
    text = " ".join(out.stdout[usage_end:].split("\n\n")[0].split())
    assert text.endswith((".", ")", ":")), text


def test_a_rule_other_than_the_cells_is_a_deviation():
    row = {
        "ledger_version": 2,
        "protocol": "diffseg",
        "segmenter": "diffseg",
        "dataset": "coco_stuff27",
        "protocol_settings": {"compat": False},
    }
    cell = paper.target(row)
    assert paper.scoring_rule(cell) == "hungarian"
    assert "scoring=majority (published: hungarian)" in paper.cell_deviations(
        {**row, "scoring": "majority"}, cell
    )
    assert not any(
        d.startswith("scoring")
        for d in paper.cell_deviations({**row, "scoring": "hungarian"}, cell)
    )


@pytest.mark.slow
def test_rescoring_a_coco_stuff_run_reproduces_it_without_the_model(tmp_path):
    rng = np.random.default_rng(5)
    labels = {}
    for k in range(3):  # things (0 person, 2 car) and stuff (95, 105, 123, ...), ignored band
        lab = np.zeros((72, 88), np.uint8)
        for j, (y, x) in enumerate([(0, 0), (0, 44), (36, 0), (36, 44)]):
            lab[y : y + 36, x : x + 44] = [0, 2, 95, 105, 123, 156, 168][(j + k) % 7]
        lab[30:40, :] = 255
        lab[rng.random(lab.shape) < 0.02] = 2
        labels[f"{k:012d}"] = lab
    fx.make_coco(tmp_path / "coco", labels)
    run, ledger = tmp_path / "run", tmp_path / "ledger.csv"
    out = run_module(
        "eval",
        tmp_path,
        "dataset=coco_stuff27",
        f"dataset.root={tmp_path / 'coco'}",
        "model=tiny",
        "segmenter=kmeans_c",  # six segments an image: majority voting has work to do
        "dataset.resolution=64",
        "num_workers=0",
        "n_qualitative=0",
        "logger=csv",
        f"hydra.run.dir={run}",
        f"paths.ledger={ledger}",
    )
    assert out.returncode == 0, out.stdout + out.stderr
    for name in ("granularity.csv", "granularity.png"):
        assert (run / name).stat().st_size > 0
    with open(run / "results.csv", newline="") as f:
        live = next(csv.DictReader(f))
    # No model: a diffusers that cannot be imported stands in front of the real one.
    blocker = tmp_path / "blocker" / "diffusers"
    blocker.mkdir(parents=True)
    (blocker / "__init__.py").write_text("raise ImportError('rescoring imported diffusers')\n")
    root = Path(__file__).resolve().parents[3]
    out = run_module(
        "eval.analysis.rescore", tmp_path, str(run), PYTHONPATH=f"{blocker.parent}:{root}"
    )
    assert out.returncode == 0, out.stdout + out.stderr
    assert "= the run's numbers" in out.stdout and "| majority |" in out.stdout
    assert "background_merge | n/a" in out.stdout  # COCO-Stuff-27 has no background class
    with open(run / "rescore" / "hungarian" / "results.csv", newline="") as f:
        again = next(csv.DictReader(f))
    assert (again["pixel_accuracy"], again["miou"]) == (live["pixel_accuracy"], live["miou"])
    assert (again["miou_things"], again["boundary_iou"]) == (
        live["miou_things"],
        live["boundary_iou"],
    )
    with open(run / "rescore" / "majority" / "results.csv", newline="") as f:
        many = next(csv.DictReader(f))
    assert (many["pixel_accuracy"], many["miou"]) == (
        live["pixel_accuracy_many_to_one"],
        live["miou_many_to_one"],
    )
    assert float(many["miou"]) > float(live["miou"])  # six segments, at most four classes
    with open(ledger, newline="") as f:
        rows = {r["run_id"]: r for r in csv.DictReader(f)}
    # A row for each other rule; the run's own rule adds none (its row has those numbers).
    assert set(rows) == {live["run_id"], f"{live['run_id']}-rescore-majority"}
    row = rows[f"{live['run_id']}-rescore-majority"]
    assert (row["rescored_from"], row["scoring"]) == (live["run_id"], "majority")
    assert "scoring=majority (published: hungarian)" in row["deviations"]
    # The granularity CSV: one line per image, segments as the records counted them.
    with open(run / "granularity.csv", newline="") as f:
        grains = list(csv.DictReader(f))
    records = [json.loads(line) for line in (run / "per_image.jsonl").read_text().splitlines()]
    assert [int(g["n_segments"]) for g in grains] == [r["segments"] for r in records]
    assert all(1 <= int(g["n_gt_classes"]) <= 4 for g in grains)
