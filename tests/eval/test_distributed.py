"""Data-parallel evaluation (``torchrun -m eval``) on CPU with gloo and two processes: the numbers
equal scoring the same images in one process, every image is scored once, one ledger row, one run directory; a
resumed distributed run skips finished images. Plus the sharding rule."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from diffseg.pipeline import DiffSegPipeline
from eval.atomic import read_csv_rows, read_jsonl
from eval.datasets import get_dataset
from eval.distributed import merge_rank_files, read_records, shard
from eval.scoring.metrics import HungarianIoU
from tests.helpers import offline_env

ARGS = (
    "dataset=synthetic",
    "model=tiny",
    "limit=5",  # odd: two ranks get 3 and 2 images, no padding
    "dataset.resolution=64",
    "segmenter.num_points=8",
    "logger=csv",
    "num_workers=0",
    "n_qualitative=1",
)
TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]


def _run(cmd: list[str], cwd: Path) -> subprocess.CompletedProcess:
    out = subprocess.run(
        cmd,
        cwd=cwd,
        env=offline_env(PYTHONPATH=str(Path.cwd()), DIFFSEG_HOME=str(cwd)),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    return out


def _numbers(run_dir: Path) -> tuple:
    (row,) = read_csv_rows(run_dir / "results.csv")
    counts = [(r["tp"], r["fp"], r["fn"]) for r in read_csv_rows(run_dir / "per_class.csv")]
    return int(row["n_images"]), float(row["pixel_accuracy"]), float(row["miou"]), counts


def _expected() -> tuple:
    """The same 5 images scored in this process, one at a time, independently of the harness."""
    pipe = DiffSegPipeline.from_tiny(seed=0)
    data = get_dataset("synthetic", resolution=64, length=8, seed=0, n_class=5, noise=0.0)
    metric = HungarianIoU(data.n_class)
    for i in range(5):
        item = data[i]
        pred = pipe(item["image"][None], resolution=64, num_points=8, kl_threshold=(1.1,) * 3)
        metric.update(pred, item["label"][None])
    out = metric.compute()
    counts = [tuple(str(int(t[c])) for t in (out["tp"], out["fp"], out["fn"])) for c in range(5)]
    return 5, float(out["pixel_accuracy"]), float(out["miou"]), counts


@pytest.mark.parametrize("n", [0, 1, 2, 5, 7])
@pytest.mark.parametrize("world", [1, 2, 3])
def test_shards_partition_the_indices_without_padding(n: int, world: int) -> None:
    indices = [10 + 3 * i for i in range(n)]  # any list: a resumed run shards what is left
    parts = [shard(indices, r, world) for r in range(world)]
    assert [i for p in parts for i in p] == indices
    assert max(map(len, parts)) - min(map(len, parts)) <= 1
    with pytest.raises(ValueError, match="rank"):
        shard(indices, world, world)


def test_rank_files_are_read_and_merged_once(tmp_path: Path) -> None:
    (tmp_path / "per_image.jsonl").write_text(json.dumps({"index": 0, "v": "a"}) + "\n")
    rank1 = [{"index": 1, "v": "b"}, {"index": 7, "v": "c"}]
    (tmp_path / "per_image.rank1.jsonl").write_text(
        "".join(json.dumps(r) + "\n" for r in rank1) + '{"index": 2'  # torn last line
    )
    records = read_records(tmp_path, n_total=5)
    assert sorted(records) == [0, 1]  # index 7 beyond the limit, the torn line dropped
    merge_rank_files(tmp_path, [records[1]])
    merge_rank_files(tmp_path, [records[1]])  # a second merge adds nothing
    assert [r["index"] for r in read_jsonl(tmp_path / "per_image.jsonl")] == [0, 1]
    assert not list(tmp_path.glob("per_image.rank*"))


@pytest.mark.slow
def test_torchrun_two_processes_equal_one_and_resume(tmp_path: Path) -> None:
    expected = _expected()
    ledger = tmp_path / "ledger.csv"
    out = _run([*TORCHRUN, "-m", "eval", *ARGS, f"paths.ledger={ledger}"], tmp_path)
    # Both ranks wrote to one run directory (rank 0's clock), no rank files are left behind.
    (run_dir,) = (tmp_path / "outputs" / "runs").iterdir()
    assert str(run_dir) in out.stdout
    assert not list(run_dir.glob("per_image.rank*"))
    assert _numbers(run_dir) == expected
    indices = [r["index"] for r in read_jsonl(run_dir / "per_image.jsonl")]
    assert sorted(indices) == [0, 1, 2, 3, 4]  # each image exactly once
    assert [r["run_dir"] for r in read_csv_rows(ledger)] == [str(run_dir.resolve())]
    assert len(list((run_dir / "qualitative").glob("*.png"))) == 1

    # Resume as after a kill: rank 0 had finished image 0, rank 1 image 3, nothing else.
    resumed = tmp_path / "resumed"
    shutil.copytree(run_dir, resumed)
    old = {r["index"]: r for r in read_jsonl(run_dir / "per_image.jsonl")}
    (resumed / "per_image.jsonl").write_text(json.dumps(old[0]) + "\n")
    (resumed / "per_image.rank1.jsonl").write_text(json.dumps(old[3]) + "\n")
    for name in ("results.csv", "per_image.csv", "per_class.csv"):
        (resumed / name).unlink()
    ledger2 = tmp_path / "ledger2.csv"
    _run([*TORCHRUN, "-m", "eval", *ARGS, f"hydra.run.dir={resumed}", f"paths.ledger={ledger2}"],
         tmp_path)  # fmt: skip
    assert _numbers(resumed) == expected
    new = read_jsonl(resumed / "per_image.jsonl")
    assert sorted(r["index"] for r in new) == [0, 1, 2, 3, 4]
    # The finished images were not evaluated again: their records (wall times included) are kept.
    by_index = {r["index"]: r for r in new}
    assert by_index[0] == old[0] and by_index[3] == old[3]
    assert len(read_csv_rows(ledger2)) == 1
    assert not list(resumed.glob("per_image.rank*"))


def test_torchrun_scores_each_added_segmenter_as_one_process(tmp_path: Path) -> None:
    extra = ("+segmenter@segmenters.kc=kmeans_c", "segmenters.kc.n_clusters=3")
    ledger = tmp_path / "ledger.csv"
    _run([*TORCHRUN, "-m", "eval", *ARGS, *extra, f"paths.ledger={ledger}",
          f"hydra.run.dir={tmp_path / 'two'}"], tmp_path)  # fmt: skip
    _run([sys.executable, "-m", "eval", *ARGS, *extra, f"paths.ledger={ledger}",
          f"hydra.run.dir={tmp_path / 'one'}"], tmp_path)  # fmt: skip
    for sub in ("", "segmenters/kc"):
        two, one = tmp_path / "two" / sub, tmp_path / "one" / sub
        assert _numbers(two) == _numbers(one)
        assert sorted(r["index"] for r in read_jsonl(two / "per_image.jsonl")) == [0, 1, 2, 3, 4]
        assert not list(two.glob("per_image.rank*"))
    rows = read_csv_rows(ledger)
    assert [r["segmenter"] for r in rows] == ["diffseg", "kmeans_c"] * 2
    assert _numbers(tmp_path / "two") != _numbers(tmp_path / "two" / "segmenters" / "kc")
