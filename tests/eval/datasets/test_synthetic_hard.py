"""The hard synthetic scenes (``hard=True``) and the colour-only baseline they are meant to defeat."""

from __future__ import annotations

import pytest
import torch

from diffseg.kmeans import pixel_kmeans_segment
from eval.datasets.synthetic import SyntheticScenes
from eval.scoring.metrics import HungarianIoU


def _scenes(**options) -> SyntheticScenes:
    return SyntheticScenes(**{"length": 4, "resolution": 64, "seed": 1, "hard": True, **options})


def _chroma(image: torch.Tensor) -> torch.Tensor:
    """``(3, H, W)`` -> ``(H, W, 3)`` colour direction: stripes and shading scale it away."""
    return (image / image.sum(0, keepdim=True)).permute(1, 2, 0)


def test_hard_scenes_are_deterministic_by_seed_and_index() -> None:
    a, b, c = _scenes(), _scenes(length=6), _scenes(seed=2)
    for i in range(4):
        assert torch.equal(a[i]["image"], b[i]["image"])
        assert torch.equal(a[i]["label"], b[i]["label"])
    assert not torch.equal(a[0]["label"], c[0]["label"])
    assert a[0]["id"] == "synthetic-hard-1-00000"
    assert SyntheticScenes(length=1, seed=1, resolution=64)[0]["id"] == "synthetic-1-00000"


def test_hard_masks_are_exact_and_regions_share_two_colours() -> None:
    """Without noise every pixel's colour direction is its region's palette colour: one per
    region, two per image (regions 1 and 3 share one), so a mask off by a pixel would fail."""
    for item in _scenes(length=6):
        label, image = item["label"], item["image"]
        assert label.dtype == torch.int64 and label.unique().numel() == 3
        unclamped = ((image > 0) & (image < 1)).all(0)
        chroma = _chroma(image)
        region_colours = []
        for cls in label.unique().tolist():
            pixels = chroma[(label == cls) & unclamped]
            assert len(pixels) > 0
            assert torch.allclose(pixels, pixels[0].expand_as(pixels), atol=1e-5)
            region_colours.append(pixels[0])
        distinct = {tuple(c.mul(1e4).round().tolist()) for c in region_colours}
        assert len(distinct) == 2


def test_the_object_is_one_blob_over_the_stuff() -> None:
    """The last region type drawn is the object: a star-shaped blob, so the pixels on a segment
    from its centroid to any of its pixels carry its label (checked on a coarse set of them)."""
    item = _scenes(resolution=96, length=1)[0]
    label = item["label"]
    found = False
    for cls in label.unique().tolist():
        ys, xs = torch.nonzero(label == cls, as_tuple=True)
        cy, cx = ys.float().mean(), xs.float().mean()
        on_segments = all(
            label[int(cy + f * (y - cy) + 0.5), int(cx + f * (x - cx) + 0.5)] == cls
            for y, x in zip(ys[::37].tolist(), xs[::37].tolist(), strict=True)
            for f in (0.25, 0.5, 0.75)
        )
        found |= on_segments and label[int(cy + 0.5), int(cx + 0.5)] == cls
    assert found


def _pixel_kmeans_miou(data: SyntheticScenes) -> float:
    metric = HungarianIoU(data.n_class)
    for item in data:
        label = item["label"]
        pred = pixel_kmeans_segment(item["image"][None], label.unique().numel())
        metric.update(pred, label[None])
    return float(metric.compute()["miou"])


def test_pixel_kmeans_is_weak_on_hard_scenes_only() -> None:
    """Colour separates the default scenes and not the hard ones (K = the true region count)."""
    easy = SyntheticScenes(length=8, resolution=64, seed=3)
    hard = SyntheticScenes(length=8, resolution=64, seed=3, noise=0.05, hard=True)
    # 0.84 and 0.45 at the time of writing (0.97 and 0.46 on 32 scenes at 128 px)
    assert _pixel_kmeans_miou(easy) > 0.8
    assert _pixel_kmeans_miou(hard) < 0.55


def test_pixel_kmeans_splits_flat_colours_and_checks_its_input() -> None:
    image = torch.zeros(1, 3, 8, 8)
    image[0, 0, :, 4:] = 1.0  # right half red
    labels = pixel_kmeans_segment(image, 2, seed=5)
    assert labels.shape == (1, 8, 8)
    assert (labels[0, :, :4] == labels[0, 0, 0]).all() and (
        labels[0, :, 4:] != labels[0, 0, 0]
    ).all()
    with pytest.raises(ValueError, match=r"\(B, 3, H, W\)"):
        pixel_kmeans_segment(image[0], 2)


def test_hard_scenes_need_an_object_and_a_background() -> None:
    with pytest.raises(ValueError, match="regions >= 2"):
        SyntheticScenes(regions=1, hard=True)


def test_hard_is_a_dataset_option_with_its_own_cache_key() -> None:
    from eval.datasets import get_dataset
    from eval.datasets.cache import key_options

    easy = get_dataset("synthetic", resolution=32, length=1)
    hard = get_dataset("synthetic", resolution=32, length=1, hard=True)
    assert hard.hard and not torch.equal(easy[0]["image"], hard[0]["image"])
    assert key_options(hard, "synthetic", None, None)["hard"] is True
    assert "hard" not in key_options(
        easy, "synthetic", None, None
    )  # the default scenes' caches keep their key
