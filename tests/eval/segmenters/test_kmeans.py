"""The paper's K-means baselines (diffseg/kmeans.py, eval/segmenters/kmeans.py, segmenter=kmeans_c/_s):
known answers on block-structured attention, an independent Lloyd (scipy) for the full chain,
seeding, per-image cluster counts from the ground truth, and one harness run end to end."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from scipy.cluster.vq import kmeans2

from diffseg.kmeans import kmeans_plusplus, kmeans_proposals, kmeans_segment
from diffseg.pipeline import DiffSegPipeline
from eval.datasets import get_dataset
from eval.segmenters import gt_class_counts, image_seed, segment_batch, segmenter_call
from tests.helpers import run_module

S = 8


def quadrant_attention(batch: int = 1, s: int = S, noise: float = 0.05, seed: int = 0):
    """``(batch, s, s, s, s)``: each query attends (almost) uniformly to its own quadrant."""
    quadrant = (torch.arange(s) >= s // 2).long()
    q = (quadrant[:, None] * 2 + quadrant[None, :]).reshape(-1)  # quadrant id of each pixel
    block = (q[:, None] == q[None, :]).double()
    block = block / block.sum(dim=1, keepdim=True)
    g = torch.Generator().manual_seed(seed)
    rand = torch.rand(batch, s * s, s * s, generator=g, dtype=torch.float64)
    maps = (1 - noise) * block + noise * rand / rand.sum(dim=-1, keepdim=True)
    return maps.reshape(batch, s, s, s, s)


def random_attention(batch: int, s: int = S, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(batch, s * s, s * s, generator=g, dtype=torch.float64) ** 4
    return (x / x.sum(dim=-1, keepdim=True)).reshape(batch, s, s, s, s)


def quadrant_labels(out: int) -> torch.Tensor:
    half = (torch.arange(out) >= out // 2).long()
    return half[:, None] * 2 + half[None, :]


def same_partition(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Equal up to renaming the labels."""
    pairs = torch.unique(torch.stack([a.reshape(-1), b.reshape(-1)]), dim=1)
    return pairs.shape[1] == len(torch.unique(a)) == len(torch.unique(b))


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_four_clusters_find_the_quadrants(seed: int) -> None:
    labels = kmeans_segment(quadrant_attention(seed=seed), 4, seed=seed, out_size=8 * S)
    assert labels.shape == (1, 8 * S, 8 * S)
    assert same_partition(labels[0], quadrant_labels(8 * S))


def test_two_clusters_each_take_whole_quadrants() -> None:
    labels = kmeans_segment(quadrant_attention(), 2, seed=0)[0]
    assert len(torch.unique(labels)) == 2
    for quadrant in range(4):
        assert len(torch.unique(labels[quadrant_labels(8 * S) == quadrant])) == 1


def test_kmeans_plusplus_picks_every_distinct_point_first() -> None:
    points = torch.tensor([[0.0, 0.0], [5.0, 0.0], [0.0, 7.0]], dtype=torch.float64)
    x = points.repeat_interleave(torch.tensor([5, 1, 3]), dim=0)
    for seed in range(5):
        init = kmeans_plusplus(x, 3, torch.Generator().manual_seed(seed))
        assert sorted(map(tuple, init.tolist())) == sorted(map(tuple, points.tolist()))


def test_more_clusters_than_distinct_maps_drops_the_empty_ones() -> None:
    exact = quadrant_attention(noise=0.0)
    (proposals,) = kmeans_proposals(exact, 6, seed=0)
    assert proposals.shape == (4, S, S)


def test_full_chain_equals_scipy_lloyd_and_independent_upsampling() -> None:
    aggregated = random_attention(1)
    maps = aggregated[0].reshape(S * S, S * S)
    init = kmeans_plusplus(maps, 5, torch.Generator().manual_seed(7))
    centres, _ = kmeans2(maps.numpy(), init.numpy(), iter=300, minit="matrix", missing="raise")
    up = F.interpolate(
        torch.from_numpy(centres).reshape(1, -1, S, S), size=(64, 64), mode="bilinear"
    )
    expected = up[0].argmax(dim=0)
    got = kmeans_segment(aggregated, 5, seed=7, out_size=64)[0]
    assert torch.equal(got, expected)


def test_seeded_deterministic_and_independent_of_the_batch() -> None:
    aggregated = random_attention(3, seed=1)
    first = kmeans_segment(aggregated, [6, 3, 4], seed=[10, 11, 12])
    again = kmeans_segment(aggregated, [6, 3, 4], seed=[10, 11, 12])
    assert torch.equal(first, again)
    alone = kmeans_segment(aggregated[1:2], 3, seed=11)
    assert torch.equal(first[1], alone[0])
    by_seed = [kmeans_segment(aggregated[:1], 6, seed=s)[0] for s in range(5)]
    assert any(not torch.equal(by_seed[0], other) for other in by_seed[1:])


def test_bad_arguments() -> None:
    aggregated = random_attention(2)
    with pytest.raises(ValueError, match=r"n_clusters must be in \[1, S\*S=64\]"):
        kmeans_segment(aggregated, [3, 65])
    with pytest.raises(ValueError, match="one int per image"):
        kmeans_segment(aggregated, [3])
    with pytest.raises(ValueError, match="seed must be an int"):
        kmeans_segment(aggregated, 3, seed="0")
    with pytest.raises(ValueError, match=r"\(B, S, S, S, S\)"):
        kmeans_segment(aggregated[0], 3)


def test_gt_class_counts_ignore_minus_one_and_are_at_least_one() -> None:
    labels = [
        torch.tensor([[0, 0, 3], [2, -1, 3]]),
        torch.full((2, 3), -1),
        torch.tensor([[4, 4], [4, 4]]),
    ]
    assert gt_class_counts(labels) == [3, 1, 1]


def test_segmenter_call_checks_the_config() -> None:
    diffseg = {"name": "diffseg", "timestep": 300, "num_points": 16}
    assert segmenter_call(diffseg, 512, 5) == {**diffseg, "seed": 5, "resolution": 512}
    kmeans = {"name": "kmeans_s", "timestep": 300, "n_clusters": "gt", "seed": 9}
    assert segmenter_call(kmeans, 64, 5)["seed"] == 9
    with pytest.raises(ValueError, match=r"segmenter\.name='kmeans'"):
        segmenter_call({"name": "kmeans"}, 64, 0)
    with pytest.raises(ValueError, match=r"does not take \['kl_threshold'\]"):
        segmenter_call({**kmeans, "kl_threshold": [1.1] * 3}, 64, 0)
    with pytest.raises(ValueError, match="n_clusters must be a positive int or 'gt'"):
        segmenter_call({**kmeans, "n_clusters": 0}, 64, 0)


class QuadrantPipeline:
    """Stands in for DiffSegPipeline: ``aggregate`` returns quadrant attention, one per image."""

    def aggregate(self, images, **kwargs):
        return quadrant_attention(len(images))


def test_segment_batch_takes_cluster_counts_from_each_ground_truth() -> None:
    items = [
        {"id": "a", "label": torch.tensor([[0, 1], [2, 3]])},
        {"id": "b", "label": torch.tensor([[5, -1], [5, 7]])},
    ]
    call = segmenter_call(
        {"name": "kmeans_s", "timestep": 300, "n_clusters": "gt", "seed": 0}, 64, 0
    )
    labels = segment_batch(QuadrantPipeline(), torch.zeros(2, 3, 64, 64), items, call)
    assert [len(torch.unique(x)) for x in labels] == [4, 2]
    assert same_partition(labels[0], quadrant_labels(64))


def test_pipeline_aggregate_is_what_call_merges() -> None:
    pipe = DiffSegPipeline.from_tiny(seed=0)
    images = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    out = pipe(images, resolution=64, num_points=4, return_intermediates=True)
    aggregated = pipe.aggregate(images, resolution=64)
    assert aggregated.shape == (2, S, S, S, S)
    assert torch.equal(aggregated, out.aggregated)


def test_harness_runs_kmeans_s_end_to_end(tmp_path: Path) -> None:
    args = [
        "segmenter=kmeans_s",
        "limit=2",
        "dataset=synthetic",
        "dataset.resolution=64",
        "model=tiny",
        "logger=csv",
        "num_workers=0",
        "n_qualitative=0",
        f"hydra.run.dir={tmp_path / 'run'}",
        f"paths.ledger={tmp_path / 'ledger.csv'}",
    ]
    done = run_module("eval", tmp_path, *args)
    assert done.returncode == 0, done.stderr[-3000:]
    with open(tmp_path / "ledger.csv", newline="") as f:
        (row,) = list(csv.DictReader(f))
    assert (row["segmenter"], row["timestep"], row["n_images"]) == ("kmeans_s", "300", "2")
    assert row["kl_threshold"] == row["num_points"] == ""

    # The saved predictions are K-means with each image's own ground-truth class count and seed.
    pipe = DiffSegPipeline.from_tiny(seed=0)
    dataset = get_dataset("synthetic", resolution=64)
    records = [json.loads(line) for line in (tmp_path / "run" / "per_image.jsonl").open()]
    for record in records:
        item = dataset[record["index"]]
        (count,) = gt_class_counts([item["label"]])
        expected = kmeans_segment(
            pipe.aggregate(item["image"][None], resolution=64),
            count,
            seed=image_seed(0, item["id"]),
            out_size=64,
        )[0]
        saved = np.asarray(Image.open(tmp_path / "run" / record["prediction"]))
        assert np.array_equal(saved, expected.numpy())
        assert 1 <= record["segments"] <= count
