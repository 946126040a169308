"""The ledger a run writes: the resolved settings, deviations, skipped images, and what happens
when the ledger is malformed or cannot be written."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest

from eval.outputs import Outputs, append_to_ledger
from eval.results import ledger as ledger_io
from eval.runtime import RunError
from tests import fixtures as fx
from tests.helpers import run_module

IDS = ("000000000139", "000000000285", "000000000632")
FAST = ("model=tiny", "dataset.resolution=64", "segmenter.num_points=8", "num_workers=0",
        "n_qualitative=1", "logger=csv")  # fmt: skip


def rows(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


@pytest.mark.slow
def test_tiny_run_on_a_coco_fixture_records_its_deviations_and_skips(tmp_path: Path) -> None:
    root = tmp_path / "coco"
    fx.make_coco(root, {i: fx.grid_label([0, 91, 181, 255], 40, 48) for i in IDS})
    (root / "annotations" / "val2017" / f"{IDS[1]}.png").unlink()  # one label file is missing
    ledger, run_dir = tmp_path / "ledger.csv", tmp_path / "run"
    out = run_module(
        "eval", tmp_path, "dataset=coco_stuff27", f"dataset.root={root}", "dataset.on_error=skip",
        *FAST, f"hydra.run.dir={run_dir}", f"paths.ledger={ledger}",
    )  # fmt: skip
    assert out.returncode == 0, out.stderr[-3000:]
    (row,) = rows(ledger)
    assert rows(run_dir / "results.csv") == [row]
    assert (row["n_images"], row["n_skipped"], json.loads(row["skipped_ids"])) == (
        "2",
        "1",
        [IDS[1]],
    )
    assert (row["dtype"], row["model"], row["split"], row["split_size"]) == (
        "float32", "tiny", "curated", "2175",
    )  # fmt: skip
    assert row["deviations"].split("; ")[:3] == ["model=tiny", "resolution=64", "images 2 of 2175"]
    assert "1 skipped" in row["deviations"]
    assert json.loads(row["segmenter_settings"])["num_points"] == 8
    assert f"Skipped (dataset.on_error=skip): {IDS[1]}" in out.stdout
    assert "Not comparable with the published cell: model=tiny" in out.stdout

    tables = run_module(
        "eval.report.tables", tmp_path, "--ledger", str(ledger), "--out", str(tmp_path)
    )
    assert tables.returncode == 0, tables.stderr
    assert "| DiffSeg | COCO-Stuff-27 | 72.5 | not run |" in tables.stdout
    listed = tables.stdout.split("Other runs")[1].split("###")[0]
    assert f"`{row['run_id']}` DiffSeg, COCO-Stuff-27" in listed and "model=tiny" in listed


def test_a_malformed_ledger_stops_the_run_before_the_model_loads(tmp_path: Path) -> None:
    ledger = tmp_path / "ledger.csv"
    ledger.write_text("run_id,miou\na,0.5\nb,0.6,extra\n")
    out = run_module(
        "eval", tmp_path, "dataset=synthetic", *FAST, f"paths.ledger={ledger}",
        f"hydra.run.dir={tmp_path / 'run'}", "model.seed=not-a-seed",
    )  # fmt: skip
    # The model config is broken too: the ledger check comes first, so the model never loads.
    assert out.returncode == 1
    assert f"ledger {ledger}, line 3: 3 fields where the header has 2" in out.stderr
    assert "Traceback" not in out.stderr
    assert not (tmp_path / "run" / "per_image.jsonl").exists()


def test_an_unwritable_ledger_location_is_found_at_start(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("")
    with pytest.raises(ledger_io.LedgerError, match="not a folder"):
        ledger_io.check_writable(tmp_path / "file" / "ledger.csv")
    ledger_io.check_writable(tmp_path / "new" / "deeper" / "ledger.csv")  # made on first append


def test_a_failed_append_keeps_the_results_and_names_the_command(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    row = ledger_io.encode_row({"run_id": "r1", "miou": 0.25, "kl_threshold": [1.1, 1.1, 1.1]})
    run_dir.mkdir()
    with open(run_dir / "results.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(row))
        writer.writeheader()
        writer.writerow(row)
    (tmp_path / "file").write_text("")
    outputs = Outputs(run_dir, row, tmp_path / "file" / "ledger.csv", False, 0, 0)
    with pytest.raises(RunError) as error:
        append_to_ledger(outputs)
    command = ledger_io.append_command(run_dir, tmp_path / "ledger.csv")
    assert f"kept in {run_dir / 'results.csv'}" in str(error.value)
    # The printed command, pointed at a good ledger, appends the row once.
    args = command.split()[3:]
    out = run_module("eval.results.ledger", tmp_path, *args)
    assert out.returncode == 0 and "row added" in out.stdout, out.stderr
    again = run_module("eval.results.ledger", tmp_path, *args)
    assert "already there" in again.stdout
    (added,) = ledger_io.read_rows(tmp_path / "ledger.csv")
    assert json.loads(added["kl_threshold"]) == [1.1, 1.1, 1.1] and added["ledger_version"] == "2"


def test_rows_round_trip_through_json_columns() -> None:
    row = {"run_id": "x", "weights": None, "kl_threshold": [0.9, 1.0, 1.1], "limit": 5}
    encoded = ledger_io.encode_row(row)
    assert encoded["weights"] == "" and encoded["kl_threshold"] == "[0.9, 1.0, 1.1]"
    parsed = ledger_io.parse_row({k: str(v) for k, v in encoded.items()})
    assert (parsed["weights"], parsed["kl_threshold"], parsed["limit"]) == ("", [0.9, 1.0, 1.1], 5)
    assert np.isclose(parsed["kl_threshold"][0], 0.9)


@pytest.mark.parametrize(
    ("line", "problem"),
    [
        ("run_id,miou", "a second header"),
        ("b,0.6x", "miou is '0.6x', not a number"),
    ],
)
def test_rows_that_are_not_numbers_are_refused_naming_the_line(tmp_path, line, problem) -> None:
    ledger = tmp_path / "ledger.csv"
    ledger.write_text(f"run_id,miou\na,0.5\n{line}\nc,\n")
    with pytest.raises(ledger_io.LedgerError, match=rf"ledger {ledger}, line 3: {problem}"):
        ledger_io.read_rows(ledger)
