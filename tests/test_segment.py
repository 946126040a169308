"""`python -m eval.segment`: any image (or folder of images) in, label map and picture out."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from eval.segment import split_argv
from tests.helpers import run_module


def _scene(path: Path, size: tuple[int, int], seed: int) -> None:
    """A blocky colour image, not square, so the centre crop matters."""
    rng = np.random.default_rng(seed)
    w, h = size
    blocks = rng.integers(0, 256, size=(4, 4, 3), dtype=np.uint8)
    pixels = np.kron(blocks, np.ones((h // 4 + 1, w // 4 + 1, 1), dtype=np.uint8))[:h, :w]
    Image.fromarray(pixels).save(path)


def _run_segment(tmp_path: Path, *args: str) -> subprocess.CompletedProcess:
    return run_module("eval.segment", tmp_path, *args, f"hydra.run.dir={tmp_path / 'out'}")


@pytest.mark.slow
def test_segment_writes_label_map_and_picture_for_files_and_folders(tmp_path: Path) -> None:
    _scene(tmp_path / "wide.png", (96, 64), seed=0)
    folder = tmp_path / "more"
    folder.mkdir()
    _scene(folder / "tall.jpg", (48, 80), seed=1)
    (folder / "notes.txt").write_text("not an image")
    out_dir = tmp_path / "out"
    args = ["wide.png", "more", "model=tiny", "resolution=64", "segmenter.num_points=8"]
    proc = _run_segment(tmp_path, *args)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    for name in ("wide", "tall"):
        labels = Image.open(out_dir / f"{name}_labels.png")
        assert labels.mode == "L" and labels.size == (64, 64)
        values = np.unique(np.asarray(labels))
        match = re.search(
            rf"{name}\.\w+: (\d+) segments? -> {name}_labels\.png \(8-bit grey\)", proc.stdout
        )
        assert match, proc.stdout
        assert len(values) == int(match.group(1))
        picture = Image.open(out_dir / f"{name}_segments.png")
        assert picture.size[0] > picture.size[1]  # image | overlay side by side
    assert not (out_dir / "notes_labels.png").exists()


def test_split_argv_separates_paths_from_hydra_arguments(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    Path("a=b.png").write_bytes(b"")  # a file whose name looks like an override is still a path
    Path("dir").mkdir()
    paths, hydra_args = split_argv(
        ["a=b.png", "model=tiny", "dir", "--cfg", "job", "segmenter.kl_threshold=[1,1,1]"]
    )
    assert paths == [Path("a=b.png"), Path("dir")]
    assert hydra_args == ["model=tiny", "--cfg", "job", "segmenter.kl_threshold=[1,1,1]"]
    with pytest.raises(FileNotFoundError, match=r"missing\.jpg"):
        split_argv(["missing.jpg", "model=tiny"])


@pytest.mark.slow
def test_segment_runs_the_kmeans_baseline_and_refuses_ground_truth_counts(tmp_path: Path) -> None:
    _scene(tmp_path / "img.png", (64, 64), seed=2)
    common = ["img.png", "model=tiny", "resolution=64"]
    proc = _run_segment(tmp_path, *common, "segmenter=kmeans_c", "segmenter.n_clusters=3")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    values = np.unique(np.asarray(Image.open(tmp_path / "out" / "img_labels.png")))
    assert 1 <= len(values) <= 3 and values.max() < 3
    proc = _run_segment(tmp_path, *common, "segmenter=kmeans_s")
    assert proc.returncode != 0
    assert "ground truth" in proc.stdout + proc.stderr
