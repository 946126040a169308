"""The evaluation harness (`python -m eval`) end to end on the tiny model and the synthetic dataset,
plus its building blocks: atomic CSV/JSONL writing, the locked ledger, run-state checks, boundaries.

End-to-end runs are subprocesses in a temporary directory (their own run directory and ledger), at
64x64 with 8x8 anchors so that the whole file stays fast on two CPU cores.
"""

from __future__ import annotations

import csv
import json
import multiprocessing
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from filelock import FileLock
from PIL import Image
from torch.utils.data import DataLoader

from eval.atomic import read_csv_rows, read_jsonl, write_csv_atomic
from eval.datasets import DataFileError, get_dataset
from eval.loop import IndexedItems, collate, predict, restore_images
from eval.results.columns import PER_CLASS_COLUMNS, PER_IMAGE_COLUMNS, RESULT_COLUMNS
from eval.results.ledger import append as append_ledger
from eval.results.loggers import wandb_mode
from eval.results.visualize import find_edges, save_label_png
from eval.runtime import RunError, resolve_device
from eval.schema import check_run
from eval.scoring.matching import match_per_image
from eval.state import open_run_state
from tests import fixtures as fx
from tests.helpers import offline_env, run_module, wandb_summary

RES = 64
LIMIT = 4
N_QUAL = 2
COMMON = (
    "dataset=synthetic",
    "model=tiny",
    f"dataset.resolution={RES}",
    "segmenter.num_points=8",
    f"limit={LIMIT}",
    f"n_qualitative={N_QUAL}",
    "num_workers=0",
)


def run_eval(cwd: Path, *args: str, wait: bool = True, **env_extra: str):
    """``python -m eval ARGS`` in ``cwd``, offline; ``wait=False``: the Popen (output to a file)."""
    if wait:
        return run_module("eval", cwd, *args, **env_extra)
    with open(cwd / "popen.log", "wb") as log:
        return subprocess.Popen(
            [sys.executable, "-m", "eval", *args],
            cwd=cwd,
            env=offline_env(DIFFSEG_HOME=str(cwd), **env_extra),
            stdout=log,
            stderr=subprocess.STDOUT,
        )


def eval_args(tmp: Path, run: str, *extra: str) -> list[str]:
    return [*COMMON, f"hydra.run.dir={tmp / run}", f"paths.ledger={tmp / 'ledger.csv'}", *extra]


def csv_rows(path: Path) -> tuple[list[str], list[dict[str, str]]]:
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        return list(reader.fieldnames or []), list(reader)


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> Path:
    """One uninterrupted run with W&B (offline) and a DataLoader worker, made once per session:
    under pytest-xdist the workers share it through a folder of the session and a file lock."""
    shared = os.environ.get("PYTEST_XDIST_WORKER") is not None
    root = tmp_path_factory.getbasetemp().parent if shared else tmp_path_factory.getbasetemp()
    tmp = root / "harness_reference"
    with FileLock(str(root / "harness_reference.lock")):
        if not (tmp / "run" / "results.csv").exists():
            tmp.mkdir(exist_ok=True)
            out = run_eval(tmp, *eval_args(tmp, "run", "logger=wandb", "num_workers=1"))
            assert out.returncode == 0, out.stdout + out.stderr
    return tmp


@pytest.mark.slow
def test_run_writes_every_output_with_its_columns(reference: Path) -> None:
    run = reference / "run"
    columns, rows = csv_rows(run / "results.csv")
    assert columns == list(RESULT_COLUMNS) and len(rows) == 1
    row = rows[0]
    assert (row["dataset"], row["model"], row["segmenter"], row["protocol"]) == (
        "synthetic",
        "tiny",
        "diffseg",
        "diffseg",
    )
    assert (row["n_images"], row["resolution"], row["num_points"]) == (str(LIMIT), str(RES), "8")
    assert json.loads(row["kl_threshold"]) == [1.1, 1.1, 1.1] and row["timestep"] == "300"
    assert row["weights"] == "" and row["refine"] == "False"  # "": proportional (null)
    assert row["run_dir"] == str(run.resolve()) and "torch" in json.loads(row["versions"])
    assert (row["ledger_version"], row["dtype"], row["n_skipped"]) == ("2", "float32", "0")
    assert row["deviations"].startswith("no published cell")
    # The demo's granularity report (eval.scoring.granularity) and what eval.analysis.rescore reads.
    assert (run / "granularity.csv").is_file() and (run / "granularity.png").is_file()
    assert row["scoring"] == "hungarian" and list((run / "contingency").glob("part-0-*.parquet"))

    dataset = get_dataset("synthetic", resolution=RES)
    columns, per_class = csv_rows(run / "per_class.csv")
    assert columns == list(PER_CLASS_COLUMNS)
    assert [r["class"] for r in per_class] == dataset.class_names
    columns, per_image = csv_rows(run / "per_image.csv")
    assert columns == list(PER_IMAGE_COLUMNS)
    assert [r["id"] for r in per_image] == [dataset[i]["id"] for i in range(LIMIT)]

    assert len(list((run / "predictions").glob("*.png"))) == LIMIT
    assert len(list((run / "qualitative").glob("*.png"))) == N_QUAL
    assert Image.open(run / "per_class_iou.png").size[0] > 100
    assert (run / ".hydra" / "config.yaml").exists()
    config = (run / "config.yaml").read_text()
    assert "num_points: 8" in config and f"resolution: {RES}" in config

    ledger = read_csv_rows(reference / "ledger.csv")
    assert ledger == [row]


@pytest.mark.slow
def test_results_equal_independent_scoring_of_saved_predictions(reference: Path) -> None:
    run = reference / "run"
    dataset = get_dataset("synthetic", resolution=RES)
    records = read_jsonl(run / "per_image.jsonl")
    tp = fp = fn = 0
    total, segments = 0, []
    for i in range(LIMIT):
        (record,) = [r for r in records if r["index"] == i]
        pred = np.asarray(Image.open(run / record["prediction"])).astype(np.int64)
        label = dataset[i]["label"].numpy()
        t, p, n, tot = match_per_image(pred, label, dataset.n_class)
        tp, fp, fn, total = tp + t, fp + p, fn + n, total + tot
        segments.append(len(np.unique(pred)))
    with np.errstate(invalid="ignore", divide="ignore"):
        iou = tp / (tp + fp + fn)
    (row,) = read_csv_rows(run / "results.csv")
    assert float(row["pixel_accuracy"]) == pytest.approx(tp.sum() / total, rel=1e-12)
    assert float(row["miou"]) == pytest.approx(np.nanmean(iou), rel=1e-12, nan_ok=True)
    assert float(row["mean_segments"]) == pytest.approx(np.mean(segments))
    per_class = read_csv_rows(run / "per_class.csv")
    assert [int(r["tp"]) for r in per_class] == tp.tolist()
    assert [int(r["fp"]) for r in per_class] == fp.tolist()
    assert [int(r["fn"]) for r in per_class] == fn.tolist()


@pytest.mark.slow
def test_wandb_offline_run_holds_summary_metrics(reference: Path) -> None:
    run = reference / "run"
    summary = wandb_summary(run)
    (row,) = read_csv_rows(run / "results.csv")
    assert summary["miou"] == pytest.approx(float(row["miou"]), rel=1e-12)
    assert summary["pixel_accuracy"] == pytest.approx(float(row["pixel_accuracy"]), rel=1e-12)
    assert summary["n_images"] == LIMIT
    # Nothing W&B writes lands outside the run directory.
    assert (run / "wandb" / "cache_dir").is_dir()


@pytest.mark.slow
def test_killed_run_resumes_to_the_uninterrupted_numbers(reference: Path, tmp_path: Path) -> None:
    args = eval_args(tmp_path, "run", "logger=csv")
    log = tmp_path / "run" / "per_image.jsonl"
    proc = run_eval(tmp_path, *args, wait=False)
    deadline = time.monotonic() + 240
    while (not log.exists() or log.read_bytes().count(b"\n") < 1) and proc.poll() is None:
        assert time.monotonic() < deadline
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    done = log.read_bytes().count(b"\n")
    assert 1 <= done < LIMIT, "the run finished before it could be killed"
    assert (
        not (tmp_path / "ledger.csv").exists() and not (tmp_path / "run" / "results.csv").exists()
    )
    # A kill in the middle of a write leaves a torn last line: the resume must drop it.
    with open(log, "ab") as f:
        f.write(b'{"index": 3, "id": "synthe')

    out = run_eval(tmp_path, *args)
    assert out.returncode == 0, out.stdout + out.stderr
    assert f"{done}/{LIMIT}" in out.stderr  # the progress bar starts at the finished images
    ref = reference / "run"
    for name in ("per_class.csv", "per_image.csv"):
        assert read_csv_rows(tmp_path / "run" / name) == read_csv_rows(ref / name)
    (got,) = read_csv_rows(tmp_path / "run" / "results.csv")
    (want,) = read_csv_rows(ref / "results.csv")
    for key in ("n_images", "pixel_accuracy", "miou", "mean_segments"):
        assert got[key] == want[key], key
    assert [r["index"] for r in read_jsonl(log)] == list(range(LIMIT))

    # Running a finished run again changes nothing and adds no second ledger row.
    again = run_eval(tmp_path, *args)
    assert again.returncode == 0, again.stdout + again.stderr
    assert "not added again" in again.stdout
    assert [r["run_id"] for r in read_csv_rows(tmp_path / "ledger.csv")] == [got["run_id"]]


@pytest.mark.slow
def test_resume_with_other_settings_is_refused(reference: Path, tmp_path: Path) -> None:
    (tmp_path / "run").mkdir()
    for name in ("run.json", "per_image.jsonl"):
        shutil.copy(reference / "run" / name, tmp_path / "run" / name)
    out = run_eval(tmp_path, *eval_args(tmp_path, "run", "segmenter.num_points=4"))
    assert out.returncode == 1
    assert "other settings" in out.stderr
    # The setting that differs, by its key, not two whole configs to compare by eye.
    assert "segmenter.num_points: 8 (run) vs 4 (now)" in out.stderr
    assert "'num_points'" not in out.stderr
    assert (
        not (tmp_path / "ledger.csv").exists() and not (tmp_path / "run" / "results.csv").exists()
    )
    assert (tmp_path / "run" / "run.json").read_bytes() == (
        reference / "run" / "run.json"
    ).read_bytes()


def test_cfg_job_prints_the_composed_config(tmp_path: Path) -> None:
    out = run_eval(
        tmp_path, "dataset=synthetic", "segmenter.kl_threshold=[1.0,1.0,1.0]", "--cfg", "job"
    )
    assert out.returncode == 0, out.stderr
    assert "dataset:\n  name: synthetic" in out.stdout
    assert "kl_threshold:\n  - 1.0\n  - 1.0\n  - 1.0" in out.stdout
    assert "_target_: diffseg.pipeline.DiffSegPipeline.from_tiny" in out.stdout
    assert not (tmp_path / "outputs").exists()


def test_unknown_dataset_fails_in_composition(tmp_path: Path) -> None:
    out = run_eval(tmp_path, "dataset=no_such_set", f"paths.ledger={tmp_path / 'ledger.csv'}")
    assert out.returncode == 1
    assert "Could not find 'dataset/no_such_set'" in out.stderr
    assert "coco_stuff27" in out.stderr  # Hydra lists the available options
    assert not (tmp_path / "outputs").exists() and not (tmp_path / "ledger.csv").exists()


def test_missing_dataset_gives_the_loader_message_and_no_ledger_row(tmp_path: Path) -> None:
    out = run_eval(
        tmp_path,
        "dataset=voc",
        f"dataset.root={tmp_path / 'nowhere'}",
        f"hydra.run.dir={tmp_path / 'run'}",
        f"paths.ledger={tmp_path / 'ledger.csv'}",
    )
    assert out.returncode == 1
    assert "python -m eval.tools.prepare" in out.stderr and str(tmp_path / "nowhere") in out.stderr
    assert "Traceback" not in out.stderr and str(tmp_path / "run" / "error.log") in out.stderr
    assert not (tmp_path / "ledger.csv").exists()
    # Marked failed in its folder, with the error and its traceback in the run's own log.
    state = json.loads((tmp_path / "run" / "run.json").read_text())
    assert state["status"] == "failed" and "pinned" not in state
    assert state["error"].startswith("FileNotFoundError: ") and "dataset=voc" in state["overrides"]
    log = (tmp_path / "run" / "error.log").read_text()
    assert "Traceback" in log and "python -m eval.tools.prepare" in log


@pytest.mark.slow
def test_bad_file_read_by_a_loader_worker_is_one_line_naming_it(tmp_path: Path) -> None:
    fx.make_voc(tmp_path / "voc", {"bad": fx.grid_label([1], 8, 8), "ok": fx.grid_label([1], 8, 8)})
    jpg = tmp_path / "voc/VOCdevkit/VOC2012/JPEGImages/bad.jpg"
    jpg.write_bytes(jpg.read_bytes()[:100])
    args = eval_args(tmp_path, "run", "dataset=voc", f"dataset.root={tmp_path / 'voc'}")
    out = run_eval(tmp_path, *args, "num_workers=2", "logger=csv")
    assert out.returncode == 1
    errors = [line for line in out.stderr.splitlines() if line.startswith("Error:")]
    # The message the loader raises in this process (num_workers=0), one line naming the file.
    with pytest.raises(DataFileError) as direct:
        get_dataset("voc", tmp_path / "voc", resolution=RES)[0]
    assert errors == [f"Error: DataFileError: {direct.value}"]
    assert str(direct.value).startswith(f"cannot read image {jpg}: ")
    assert "Traceback" not in out.stderr and "worker" not in out.stderr


# --------------------------------------------------------------------------------------------
# Building blocks, in process


def test_bad_values_are_rejected_naming_the_key() -> None:
    from omegaconf import OmegaConf

    good = {"limit": None, "batch_size": 2, "num_workers": 0, "n_qualitative": 0, "seed": 1}
    check_run(OmegaConf.create(good))
    for key, value in [("limit", 0), ("limit", "ten"), ("batch_size", 0), ("num_workers", -1)]:
        with pytest.raises(ValueError, match=key):
            check_run(OmegaConf.create({**good, key: value}))


@pytest.mark.skipif(
    torch.cuda.is_available(), reason="checks the message on a machine without CUDA"
)
def test_cuda_asked_but_absent() -> None:
    assert resolve_device("auto") == torch.device("cpu")
    with pytest.raises(RunError, match=r"CUDA is not available.*device=cpu"):
        resolve_device("cuda")
    with pytest.raises(ValueError, match="not a torch device"):
        resolve_device("gpu")


def test_out_of_gpu_memory_names_the_batch_size_to_use() -> None:
    def pipeline(images, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory")

    items = [{"image": torch.zeros(3, 8, 8)}] * 2
    with pytest.raises(
        RunError, match=r"batch_size=8; lower it, e.g. batch_size=4.*hydra\.run\.dir"
    ):
        predict(pipeline, items, torch.device("cpu"), [{}], batch_size=8)
    with pytest.raises(RunError, match="already 1"):
        predict(pipeline, items[:1], torch.device("cpu"), [{}], batch_size=1)


def test_run_state_pins_settings(tmp_path: Path) -> None:
    pinned = {"seed": 0, "segmenter": {"num_points": 16}}
    first = open_run_state(tmp_path, pinned)
    assert open_run_state(tmp_path, pinned)["run_id"] == first["run_id"]
    with pytest.raises(RunError, match=r"segmenter\.num_points: 16 \(run\) vs 8 \(now\)"):
        open_run_state(tmp_path, {"seed": 0, "segmenter": {"num_points": 8}})


def test_jsonl_drops_and_repairs_a_torn_last_line(tmp_path: Path) -> None:
    path = tmp_path / "log.jsonl"
    path.write_bytes(b'{"index": 0}\n{"index": 1}\n{"index": 2, "id')
    assert read_jsonl(path) == [{"index": 0}, {"index": 1}]
    assert path.read_bytes().endswith(b'"id')  # read only: untouched
    assert read_jsonl(path, repair=True) == [{"index": 0}, {"index": 1}]
    assert path.read_bytes() == b'{"index": 0}\n{"index": 1}\n'
    path.write_bytes(b'{"index": 0}\nnot json\n')
    with pytest.raises(ValueError, match="line 2"):
        read_jsonl(path)


def test_ledger_appends_once_per_run_and_merges_columns(tmp_path: Path) -> None:
    ledger = tmp_path / "sub" / "ledger.csv"
    assert append_ledger(ledger, {"run_id": "a", "miou": 0.5})
    assert not append_ledger(ledger, {"run_id": "a", "miou": 0.7})
    assert append_ledger(ledger, {"run_id": "007", "miou": 0.25, "extra": "x"})
    assert read_csv_rows(ledger) == [
        {"run_id": "a", "miou": "0.5", "extra": ""},
        {"run_id": "007", "miou": "0.25", "extra": "x"},
    ]
    assert not list(ledger.parent.glob(".*.tmp"))


def _append_many(ledger: str, worker: int) -> None:
    for i in range(15):
        append_ledger(ledger, {"run_id": f"{worker}-{i}", "value": i})


def test_concurrent_ledger_appends_lose_no_row(tmp_path: Path) -> None:
    ledger = str(tmp_path / "ledger.csv")
    ctx = multiprocessing.get_context("fork")
    procs = [ctx.Process(target=_append_many, args=(ledger, w)) for w in range(3)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
        assert p.exitcode == 0
    ids = [r["run_id"] for r in read_csv_rows(ledger)]
    assert sorted(ids) == sorted(f"{w}-{i}" for w in range(3) for i in range(15))


def test_csv_write_is_atomic_when_interrupted(tmp_path: Path) -> None:
    path = tmp_path / "t.csv"
    write_csv_atomic(path, [{"a": 1}], ["a"])

    def rows():
        yield {"a": 2}
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        write_csv_atomic(path, rows(), ["a"])
    assert read_csv_rows(path) == [{"a": "1"}] and list(tmp_path.iterdir()) == [path]


def test_wandb_mode_offline_without_credentials(monkeypatch) -> None:
    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    assert wandb_mode(None) == "offline"
    monkeypatch.setenv("WANDB_API_KEY", "k" * 40)
    assert wandb_mode(None) == "online"
    monkeypatch.setenv("WANDB_MODE", "disabled")
    assert wandb_mode(None) is None  # W&B reads WANDB_MODE itself
    assert wandb_mode("offline") == "offline"
    with pytest.raises(ValueError, match=r"logger\.mode"):
        wandb_mode("cloud")


def test_find_edges_marks_pixels_next_to_another_label() -> None:
    labels = np.zeros((5, 6), dtype=np.int64)
    labels[:, 3:] = 1
    edges = find_edges(labels)
    expected = np.zeros((5, 6), dtype=bool)
    expected[1:4, 2:4] = True  # both sides of the vertical boundary, frame excluded
    assert np.array_equal(edges, expected)


def test_collate_stacks_same_size_images_and_keeps_skipped_indices() -> None:
    a, b = torch.rand(3, 8, 8), torch.rand(3, 8, 8)
    batch = collate([(4, {"image": a}), (5, None), (6, {"image": b})])
    assert batch["index"] == [4, 6] and batch["skipped"] == [5]
    assert torch.equal(batch["images"], torch.stack([a, b]))
    restore_images(batch)
    assert [item["image"].data_ptr() for item in batch["items"]] == [
        image.data_ptr() for image in batch["images"]
    ]  # views of the one stack
    assert torch.equal(batch["items"][1]["image"], b)
    mixed = collate([(0, {"image": a}), (1, {"image": torch.rand(3, 8, 10)})])
    assert mixed["images"] is None and len(mixed["items"]) == 2
    assert collate([(0, None)])["images"] is None


@pytest.mark.filterwarnings("ignore::eval.datasets.SplitSizeWarning")
def test_loader_worker_hands_the_data_error_itself_to_the_main_process(tmp_path: Path) -> None:
    """Raised in a worker, torch re-raises it as "Caught DataFileError in DataLoader worker
    process 0. Original Traceback ..."; the loop raises the original, one line naming the file."""
    fx.make_voc(tmp_path, {"ok": fx.grid_label([1], 8, 8), "bad": fx.grid_label([1], 8, 8)})
    jpg = tmp_path / "VOCdevkit/VOC2012/JPEGImages/bad.jpg"
    jpg.write_bytes(jpg.read_bytes()[:100])
    data = get_dataset("voc", tmp_path, resolution=8)
    loader = DataLoader(IndexedItems(data, [0, 1]), batch_size=1, num_workers=2, collate_fn=collate)
    first, second = list(loader)
    assert first["error"] is None and first["index"] == [0]
    assert isinstance(second["error"], DataFileError) and second["items"] == []
    with pytest.raises(DataFileError) as direct:  # as the dataset raises it in this process
        data[1]
    assert str(second["error"]) == str(direct.value)
    assert str(direct.value).startswith(f"cannot read image {jpg}: ")


def test_predict_batched_on_the_stack_equals_one_call_per_image() -> None:
    calls = []

    def pipeline(images, **kwargs):
        calls.append(len(images))
        return (images[:, 0] > 0.5).long()

    items = [{"image": torch.rand(3, 8, 8)} for _ in range(3)]
    stacked = collate([(i, dict(item)) for i, item in enumerate(items)])["images"]
    batched = predict(pipeline, items, torch.device("cpu"), [{}], 3, stacked)[0]
    single = predict(pipeline, items, torch.device("cpu"), [{}], 3)[0]
    assert calls == [3, 1, 1, 1]
    assert all(torch.equal(x, y) for x, y in zip(batched, single, strict=True))


def test_atomic_writes_leave_shared_permissions(tmp_path: Path) -> None:
    # mkstemp creates 0600 files; a ledger shared by several users must stay readable.
    ledger = tmp_path / "ledger.csv"
    append_ledger(ledger, dict.fromkeys(RESULT_COLUMNS, "x"))
    save_label_png(np.zeros((4, 4), dtype=np.int64), tmp_path / "labels.png")
    for path in (ledger, tmp_path / "labels.png"):
        assert path.stat().st_mode & 0o777 == 0o644, path
    assert not list(tmp_path.glob(".*.tmp"))
