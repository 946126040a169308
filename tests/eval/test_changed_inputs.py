"""A run that reuses something stored (a run folder, an attention cache) notices when its inputs
changed, as a breaker changed them: another dataset root on resume, weights replaced in place in a
copied model folder, two processes on one run folder. Each ends in the right numbers or in a
refusal that names the difference and leaves the run folder as it was."""

from __future__ import annotations

import multiprocessing
import os
import shutil
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from eval.atomic import read_csv_rows
from eval.runtime import RunRefused
from eval.state import LOCK_FILE, run_lock
from tests import fixtures as fx
from tests.helpers import run_module

PROJECT = Path(__file__).resolve().parents[2]
COMMON = (
    "dataset.resolution=64",
    "segmenter.num_points=8",
    "limit=2",
    "n_qualitative=0",
    "num_workers=0",
    "logger=csv",
    "save_predictions=false",
)
STEMS = [("aachen", "aachen_000000_000019"), ("bonn", "bonn_000001_000019")]


def run_eval(tmp: Path, run: str, *args: str):
    """``python -m eval`` of this checkout, in ``tmp``."""
    run_dir, ledger = f"hydra.run.dir={tmp / run}", f"paths.ledger={tmp / 'ledger.csv'}"
    return run_module("eval", tmp, *COMMON, *args, run_dir, ledger, PYTHONPATH=str(PROJECT))


def snapshot(folder: Path, lock: bool = False) -> dict[str, bytes]:
    """Every file's bytes; the lock's (who last held the folder) only with ``lock``."""
    files = [p for p in folder.rglob("*") if p.is_file() and (lock or p.name != LOCK_FILE)]
    return {str(p.relative_to(folder)): p.read_bytes() for p in files}


def cut_to_first_image(run_dir: Path) -> None:
    """The run folder as a run that failed at its second image leaves it."""
    log = run_dir / "per_image.jsonl"
    log.write_text(log.read_text().splitlines(keepends=True)[0])
    (run_dir / "results.csv").unlink()


def cityscapes_root(root: Path, seed: int) -> Path:
    rng = np.random.default_rng(seed)
    fx.make_cityscapes(root, {s: rng.integers(7, 34, (20, 30)).astype(np.uint8) for s in STEMS})
    return root


@pytest.mark.slow
def test_resume_refuses_another_dataset_root_and_a_folder_in_use(tmp_path: Path) -> None:
    a, b = cityscapes_root(tmp_path / "A", 0), cityscapes_root(tmp_path / "B", 1)
    args = ("dataset=cityscapes", "model=tiny")
    first = run_eval(tmp_path, "run", *args, f"dataset.root={a}")
    assert first.returncode == 0, first.stderr[-2000:]
    (want,) = read_csv_rows(tmp_path / "run" / "results.csv")
    cut_to_first_image(tmp_path / "run")
    before = snapshot(tmp_path / "run")

    other = run_eval(tmp_path, "run", *args, f"dataset.root={b}")
    assert other.returncode == 1, other.stdout[-2000:]
    assert "dataset_root: " in other.stderr and "dataset_identity: " in other.stderr
    assert snapshot(tmp_path / "run") == before  # .hydra/overrides.yaml, run.json, error.log
    assert len(read_csv_rows(tmp_path / "ledger.csv")) == 1

    with run_lock(tmp_path / "run"):  # another process holds the folder
        before = snapshot(tmp_path / "run", lock=True)
        busy = run_eval(tmp_path, "run", *args, f"dataset.root={a}")
        assert busy.returncode == 1
        assert f"{tmp_path / 'run'} is in use by another run (pid {os.getpid()} " in busy.stderr
        assert snapshot(tmp_path / "run", lock=True) == before

    resumed = run_eval(tmp_path, "run", *args, f"dataset.root={a}")
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    (got,) = read_csv_rows(tmp_path / "run" / "results.csv")
    assert (got["pixel_accuracy"], got["miou"]) == (want["pixel_accuracy"], want["miou"])


def replace_unet_weights(model: Path) -> None:
    """Random weights of the same shapes in place of the UNet's (the file keeps its size)."""
    weights = next((model / "unet").glob("*.safetensors"))
    with safe_open(weights, "pt") as f:
        metadata = f.metadata()
    gen = torch.Generator().manual_seed(1)
    tensors = {
        k: (0.05 * torch.randn(t.shape, generator=gen)).to(t.dtype)
        for k, t in load_file(weights).items()
    }
    save_file(tensors, weights, metadata)


@pytest.mark.slow
def test_weights_replaced_in_place_miss_the_cache_and_refuse_the_resume(tmp_path: Path) -> None:
    model = tmp_path / "model"
    shutil.copytree(PROJECT / "models" / "tiny_trained", model)
    args = (
        "dataset=synthetic",
        "model=tiny_trained",
        f"model.model={model}",
        "cache.attention=true",
        "cache.dtype=float32",
        f"cache.dir={tmp_path / 'cache'}",
    )
    first = run_eval(tmp_path, "old", *args)
    assert first.returncode == 0, first.stderr[-2000:]
    assert "0 image(s) read, 2 computed" in first.stdout
    cut_to_first_image(tmp_path / "old")
    replace_unet_weights(model)

    new = run_eval(tmp_path, "new", *args)
    assert new.returncode == 0, new.stderr[-2000:]
    assert "0 image(s) read, 2 computed" in new.stdout  # the old weights' entries are not read

    before = snapshot(tmp_path / "old")
    resumed = run_eval(tmp_path, "old", *args)
    assert resumed.returncode == 1, resumed.stdout[-2000:]
    assert "weights: 'dir:" in resumed.stderr
    assert snapshot(tmp_path / "old") == before


def _hold(run_dir: Path, ready) -> None:
    with run_lock(run_dir):
        ready.set()
        time.sleep(600)


def test_a_killed_holder_leaves_no_stuck_lock(tmp_path: Path) -> None:
    ctx = multiprocessing.get_context("spawn")
    ready = ctx.Event()
    holder = ctx.Process(target=_hold, args=(tmp_path, ready))
    holder.start()
    try:
        assert ready.wait(60)
        busy = rf"in use by another run \(pid {holder.pid} "
        with pytest.raises(RunRefused, match=busy), run_lock(tmp_path):
            pass
    finally:
        holder.kill()
        holder.join()
    with run_lock(tmp_path):  # the OS released the killed process's lock
        pass


@pytest.mark.slow
def test_rescoring_tampered_tables_exits_non_zero_and_appends_nothing(tmp_path: Path) -> None:
    import pyarrow.parquet as pq

    from eval.analysis import rescore

    first = run_eval(tmp_path, "run", "dataset=synthetic", "model=tiny")
    assert first.returncode == 0, first.stderr[-2000:]
    run, ledger = tmp_path / "run", tmp_path / "rescore_ledger.csv"
    part = next((run / "contingency").glob("*.parquet"))
    table = pq.read_table(part).to_pydict()
    line = next(i for i, c in enumerate(table["class"]) if c >= 0)
    table["count"][line] = 3 * table["count"][line] + 5  # more pixels of a class in a segment
    pq.write_table(pa.table(table, schema=pq.read_schema(part)), part)
    with pytest.raises(SystemExit, match=r"contingency tables in .*no longer give the run's own"):
        rescore.main([str(run), "--ledger", str(ledger)])
    assert not ledger.exists() and not (run / "rescore").exists()


def test_dataset_identity_follows_the_files_not_the_folder(tmp_path: Path) -> None:
    from eval.datasets import get_dataset
    from eval.datasets.cache import identity

    a = cityscapes_root(tmp_path / "A", 0)
    shutil.copytree(a, tmp_path / "copy")  # copy2: same sizes and mtimes
    b = cityscapes_root(tmp_path / "B", 1)
    ids = [
        identity(get_dataset("cityscapes", root, resolution=16))
        for root in (a, tmp_path / "copy", b)
    ]
    assert ids[0] == ids[1] != ids[2]
    cached = get_dataset("cityscapes", a, resolution=16, cache=True, cache_dir=tmp_path / "c")
    assert identity(cached) == ids[0]


def test_weights_unknown_at_the_start_are_learnt_then_pinned(tmp_path: Path) -> None:
    # A hub model not yet downloaded when the run started is recorded as "" (no snapshot yet).
    from eval.state import open_run_state

    first = open_run_state(tmp_path, {"seed": 0, "weights": ""})
    again = open_run_state(tmp_path, {"seed": 0, "weights": "hub:abc"})
    assert again["run_id"] == first["run_id"] and again["pinned"]["weights"] == "hub:abc"
    with pytest.raises(RunRefused, match=r"weights: 'hub:abc' \(run\) vs 'hub:def' \(now\)"):
        open_run_state(tmp_path, {"seed": 0, "weights": "hub:def"})
