"""`python -m eval.tools.segment`: any image (or folder of images) in, label map and picture out."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from eval import CONFIG_DIR
from eval.datasets import DataFileError
from eval.tools.segment import (
    group_options,
    labels_for_image,
    list_images,
    model_input,
    pad_to_square,
    readable_images,
    split_argv,
)
from tests.helpers import run_module


def _scene(path: Path, size: tuple[int, int], seed: int) -> None:
    """A blocky colour image, not square, so the centre crop matters."""
    rng = np.random.default_rng(seed)
    w, h = size
    blocks = rng.integers(0, 256, size=(4, 4, 3), dtype=np.uint8)
    pixels = np.kron(blocks, np.ones((h // 4 + 1, w // 4 + 1, 1), dtype=np.uint8))[:h, :w]
    Image.fromarray(pixels).save(path)


def _run_segment(tmp_path: Path, *args: str) -> subprocess.CompletedProcess:
    return run_module("eval.tools.segment", tmp_path, *args, f"hydra.run.dir={tmp_path / 'out'}")


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
    for name, size in (("wide", (96, 64)), ("tall", (48, 80))):
        labels = Image.open(out_dir / f"{name}_labels.png")
        assert labels.mode == "P" and labels.size == size  # the whole image, at its size
        values = np.unique(np.asarray(labels))
        match = re.search(
            rf"{name}\.\w+: (\d+) segments? -> {name}_labels\.png \(8-bit palette\)", proc.stdout
        )
        assert match, proc.stdout
        assert len(values) == int(match.group(1))
        picture = Image.open(out_dir / f"{name}_segments.png")
        assert picture.size[0] > picture.size[1]  # image | overlay side by side
    assert not (out_dir / "notes_labels.png").exists()


def test_pad_keeps_every_pixel_and_maps_labels_back_to_the_image() -> None:
    image = torch.rand(3, 2, 5)
    square, corner = pad_to_square(image)
    assert square.shape == (3, 5, 5) and corner == (1, 0)
    assert torch.equal(square[:, 1:3], image)  # the image, centred
    assert torch.equal(square[:, 0], image[:, 0]) and torch.equal(square[:, 4], image[:, 1])
    # Model labels of the square (10 x 10 for a 5-pixel side): 7 only in the padding rows.
    labels = torch.full((10, 10), 7)
    labels[2:6, :4], labels[2:6, 4:] = 3, 5
    out = labels_for_image(labels, 5, corner, (2, 5))
    assert out.tolist() == [[0, 0, 1, 1, 1], [0, 0, 1, 1, 1]]  # ids renumbered 0..K-1


def test_model_input_pads_by_default_and_crops_as_the_benchmarks_on_request() -> None:
    from diffseg.preprocess import preprocess_image

    pixels = np.random.default_rng(0).integers(0, 256, (30, 300, 3), dtype=np.uint8)
    padded, back = model_input(pixels, 64, "pad")
    assert padded.shape == (3, 64, 64) and back == (300, (135, 0), (30, 300))
    cropped, none = model_input(pixels, 64, "crop")
    assert none is None and torch.equal(cropped, preprocess_image(pixels, 64))


def test_a_model_brings_its_tuned_threshold_to_segment_too() -> None:
    # As in python -m eval: model=tiny_trained segments with its own KL scale unless one is set.
    from hydra import compose, initialize_config_dir

    from eval import CONFIG_DIR

    def kl(*overrides: str) -> list[float]:
        with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base=None):
            return list(compose("segment", overrides=list(overrides)).segmenter.kl_threshold)

    assert kl("model=tiny_trained") == [0.02] * 3
    assert kl("model=tiny_trained", "segmenter.kl_threshold=[0.5,0.5,0.5]") == [0.5] * 3
    assert kl() == kl("model=tiny") == [1.1] * 3


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


def test_help_lists_only_the_groups_segment_accepts(tmp_path: Path) -> None:
    proc = run_module("eval.tools.segment", tmp_path, "--help")
    assert proc.returncode == 0, proc.stderr
    groups = {
        line.split(":")[0] for line in proc.stdout.splitlines() if ": " in line and "," in line
    }
    assert groups == {"model", "segmenter"}, proc.stdout
    models = sorted(f.stem for f in (Path(CONFIG_DIR) / "model").glob("*.yaml"))
    assert group_options("model") == "model: " + ", ".join(models)
    assert "tiny" in models and "sd14" in models


def _broken(path: Path) -> None:
    _scene(path, (32, 32), seed=3)
    path.write_bytes(path.read_bytes()[:60])


def test_unreadable_images_skipped_in_folders_refused_when_named(tmp_path: Path, capsys) -> None:
    folder = tmp_path / "photos"
    folder.mkdir()
    _scene(folder / "a.png", (32, 32), seed=0)
    _broken(folder / "b.jpg")
    _scene(folder / "c.png", (32, 32), seed=1)
    images = list_images([folder])
    good, skipped = readable_images(images, named=())
    assert good == [folder / "a.png", folder / "c.png"]
    assert len(skipped) == 1 and str(folder / "b.jpg") in skipped[0]
    assert f"warning: cannot read image {folder / 'b.jpg'}" in capsys.readouterr().err
    (tmp_path / "notes.txt").write_text("not an image")
    named = [tmp_path / "notes.txt", folder / "b.jpg", folder / "a.png"]
    with pytest.raises(DataFileError, match=r"notes\.txt.*b\.jpg"):
        readable_images(named, named=named)
    with pytest.raises(DataFileError, match=r"none of the 1 images.*b\.jpg"):
        readable_images([folder / "b.jpg"], named=())


@pytest.mark.slow
def test_a_model_that_cannot_load_leaves_no_run_folder(tmp_path: Path) -> None:
    _scene(tmp_path / "a.png", (32, 32), seed=0)
    out = run_module("eval.tools.segment", tmp_path, "a.png", f"model.model={tmp_path / 'none'}")
    assert out.returncode == 1 and "model=tiny_trained" in out.stderr, out.stderr[-2000:]
    assert not (tmp_path / "outputs" / "segment").exists() or not any(
        (tmp_path / "outputs" / "segment").iterdir()
    )


def test_non_image_argument_is_refused_before_the_model_loads(tmp_path: Path) -> None:
    (tmp_path / "notes.txt").write_text("not an image")
    # sd14 is not available offline: had the model loaded first, the error would be about it.
    proc = _run_segment(tmp_path, "notes.txt", "model=sd14")
    assert proc.returncode == 1
    errors = [line for line in proc.stderr.splitlines() if line.startswith("Error:")]
    assert len(errors) == 1 and "cannot read image notes.txt" in errors[0], proc.stderr


@pytest.mark.slow
def test_folder_with_an_unreadable_file_goes_on_and_reports_it(tmp_path: Path) -> None:
    folder = tmp_path / "photos"
    folder.mkdir()
    _broken(folder / "a.jpg")
    _scene(folder / "b.png", (48, 40), seed=4)
    proc = _run_segment(tmp_path, "photos", "model=tiny", "resolution=64", "segmenter.num_points=8")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert (tmp_path / "out" / "b_labels.png").is_file()
    assert not (tmp_path / "out" / "a_labels.png").exists()
    tail = proc.stderr[proc.stderr.index("Skipped 1 unreadable file(s):") :]
    assert "photos/a.jpg" in tail, proc.stderr
