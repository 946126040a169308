"""DiffCut (diffseg/diffcut.py): known cuts on planted graphs, the tau direction, the affinity,
the concept assignment by hand, and an independent numpy transcription of DiffCut's code."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from diffseg.diffcut import (
    affinity,
    assemble_clusters,
    assign_high_res,
    diffcut_segment,
    ncut_bipartition,
    recursive_ncut,
)


def planted_graph(sizes, seed: int = 0, inside=(0.8, 1.0), across=(0.01, 0.05)) -> torch.Tensor:
    """Symmetric affinity with dense blocks of ``sizes`` nodes, weakly connected (no zeros)."""
    g = torch.Generator().manual_seed(seed)
    n = sum(sizes)
    block = torch.repeat_interleave(torch.arange(len(sizes)), torch.tensor(sizes))
    same = block[:, None] == block[None, :]
    u = torch.rand(n, n, generator=g, dtype=torch.float64)
    u = (u + u.T) / 2
    w = torch.where(
        same, inside[0] + (inside[1] - inside[0]) * u, across[0] + (across[1] - across[0]) * u
    )
    return w, block


def ncut_value(w: torch.Tensor, side: torch.Tensor) -> float:
    cut = w[side][:, ~side].sum()
    return float(cut / w[side].sum() + cut / w[~side].sum())


def same_partition(a, b) -> bool:
    """Whether two label arrays are the same partition up to renaming the labels."""
    a, b = np.asarray(a).ravel(), np.asarray(b).ravel()
    pairs = set(zip(a.tolist(), b.tolist(), strict=True))
    return len(pairs) == len(set(a.tolist())) == len(set(b.tolist()))


def test_bipartition_finds_the_planted_cut_the_global_ncut_minimum():
    w, block = planted_graph([4, 6], seed=1)
    side, value = ncut_bipartition(w)
    assert same_partition(side, block)
    assert value == pytest.approx(ncut_value(w, side), rel=1e-12)
    # Brute force over every bipartition of the 10 nodes: the planted one is the minimum.
    n = len(block)
    best = min(
        ncut_value(w, torch.tensor([i in chosen for i in range(n)]))
        for k in range(1, n // 2 + 1)
        for chosen in itertools.combinations(range(n), k)
    )
    assert value == pytest.approx(best, rel=1e-12)


def test_bipartition_side_follows_the_sign_rule():
    # The side returned is y > t with y's largest |entry| positive: the side holding that node.
    w, _ = planted_graph([3, 9], seed=2)
    side, _ = ncut_bipartition(w)
    d = w.sum(1)
    inv = d.rsqrt()
    _, vec = torch.linalg.eigh(inv[:, None] * (torch.diag(d) - w) * inv[None, :])
    y = inv * vec[:, 1]
    assert side[y.abs().argmax()]


def test_recursion_splits_into_the_planted_blocks():
    w, block = planted_graph([5, 7, 6, 4], seed=3)
    labels = recursive_ncut(w, tau=0.5)
    assert same_partition(labels, block)
    assert sorted(labels.unique().tolist()) == [0, 1, 2, 3]


def test_recursion_continues_while_ncut_is_below_tau():
    w, block = planted_graph([5, 7], seed=4)
    _, value = ncut_bipartition(w)
    assert 0 < value < 0.5  # a weak cut between the blocks; splitting a dense block costs ~1
    assert recursive_ncut(w, tau=value).unique().tolist() == [0]  # not below tau: one segment
    assert same_partition(recursive_ncut(w, tau=value * (1 + 1e-9)), block)
    assert recursive_ncut(w, tau=1e-6).unique().tolist() == [0]
    # A large tau splits down to single nodes.
    assert len(recursive_ncut(w, tau=10.0).unique()) == len(block)


def test_nodes_with_a_zero_affinity_leave_the_subgraphs_below_level_zero():
    # Groups A = A1 + A2 (moderately connected) and B. Level 0 cuts A from B; level 1 cuts A1
    # from A2 on A's nodes without node i, whose row has a zero (to a node of B): DiffCut's
    # get_affinity_matrix drops it, so i never is on the y > t side and joins the other one,
    # even when its own group A1 or A2 is the y > t side.
    sub = torch.tensor([0] * 4 + [1] * 5 + [2] * 6)  # A1, A2, B
    group = (sub == 2).long()
    g = torch.Generator().manual_seed(6)
    u = torch.rand(15, 15, generator=g, dtype=torch.float64)
    u = (u + u.T) / 2
    same_sub, same_group = sub[:, None] == sub[None, :], group[:, None] == group[None, :]
    base = torch.where(
        same_sub, 0.8 + 0.2 * u, torch.where(same_group, 0.15 + 0.05 * u, 0.02 * u + 0.01)
    )
    a = (group == 0).nonzero().squeeze(1)
    for i in a.tolist():  # a node of A whose own part is the y > t side once it is left out
        rest = a[a != i]
        side, _ = ncut_bipartition(base[rest][:, rest])
        if sub[rest[side]].unique().tolist() == [sub[i].item()]:
            break
    else:
        pytest.fail("no node of A lies on the y > t side of the level-1 cut")
    w = base.clone()
    w[i, 14] = w[14, i] = 0.0
    labels = recursive_ncut(w, tau=0.6)
    assert same_partition(recursive_ncut(base, tau=0.6), sub)  # without the zero: A1, A2, B
    others = (torch.arange(15) != i) & (torch.arange(15) != 14)
    assert same_partition(labels[others], sub[others])
    assert labels[i] != labels[others & (sub == sub[i])][0]  # not with its own part ...
    assert labels[i] == labels[rest[~side]][0]  # ... but with the other side of the cut


def test_affinity_symmetric_unit_diagonal_zero_minimum():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(30, 8, generator=g)
    for alpha in (1, 5, 10.0):
        w = affinity(x, alpha)
        assert w.dtype == torch.float64 and w.shape == (30, 30)
        assert torch.equal(w, w.T)
        torch.testing.assert_close(w.diagonal(), torch.ones(30, dtype=torch.float64))
        assert w.min() == 0 and w.max() <= 1
    # alpha is a power of the min-max normalised cosine similarity.
    xn = F.normalize(x.double(), dim=1)
    cos = xn @ xn.T
    expected = ((cos - cos.min()) / (cos.max() - cos.min())) ** 3
    torch.testing.assert_close(affinity(x, 3), expected, rtol=1e-12, atol=1e-15)
    # Scaling a feature does not change its affinities (cosine similarity).
    torch.testing.assert_close(affinity(x * torch.arange(1, 31)[:, None], 3), expected)
    # All features parallel: every pair equally similar, a uniform graph.
    assert torch.equal(affinity(torch.ones(4, 3), 10), torch.ones(4, 4, dtype=torch.float64))


def test_high_res_assignment_by_features_not_by_segment():
    # 2x2 features; pixel (1, 0) is in segment 0 but its feature is closer to segment 1's concept.
    features = torch.tensor([[[1.0, 1.0], [0.6, 0.0]], [[0.0, 0.0], [0.8, 1.0]]])  # (C=2, 2, 2)
    segments = torch.tensor([[0, 0], [0, 1]])
    # concept 0 = mean([1,0],[1,0],[.6,.8]) = [.867,.267]: (.6,.8).c0 = .733 < (.6,.8).c1 = .8
    assert assign_high_res(features, segments, 2).tolist() == [[0, 0], [1, 1]]


def test_high_res_assignment_upsamples_bilinearly():
    # Left column [1, 0], right column [0, 1]: on 4x4 the half-pixel centres of columns 1 and 2
    # blend 3:1 towards the nearer column, so each half takes its own column's concept.
    features = torch.tensor([[[1.0, 0.0], [1.0, 0.0]], [[0.0, 1.0], [0.0, 1.0]]])
    segments = torch.tensor([[5, 9], [5, 9]])  # any ids: label k = k-th smallest id
    assert assign_high_res(features, segments, 4).tolist() == [[0, 0, 1, 1]] * 4
    assert assign_high_res(features, segments, (3, 6)).tolist() == [[0, 0, 0, 1, 1, 1]] * 3


def quadrant_features(batch: int = 1, c: int = 16, s: int = 8, noise: float = 0.3, seed: int = 0):
    """``(batch, c, s, s)``: one random direction per quadrant, plus noise."""
    g = torch.Generator().manual_seed(seed)
    half = (torch.arange(s) >= s // 2).long()
    quadrant = half[:, None] * 2 + half[None, :]
    centres = torch.randn(batch, 4, c, generator=g)
    x = centres[:, quadrant.reshape(-1)].reshape(batch, s, s, c).permute(0, 3, 1, 2)
    return x + noise * torch.randn(batch, c, s, s, generator=g), quadrant


def test_diffcut_segment_finds_the_quadrants_per_image():
    features, quadrant = quadrant_features(batch=2)
    labels = diffcut_segment(features, 32, alpha=10, tau=0.5)
    assert labels.shape == (2, 32, 32) and labels.dtype == torch.long
    expected = quadrant.repeat_interleave(4, 0).repeat_interleave(4, 1)
    for image, lab in zip(features, labels, strict=True):
        assert same_partition(lab, expected)
        assert torch.equal(diffcut_segment(image[None], 32)[0], lab)  # batch-independent


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda: diffcut_segment(torch.zeros(16, 8, 8), 32), "(B, C, h, w)"),
        (lambda: diffcut_segment(torch.ones(1, 4, 2, 2), 0), "out_size"),
        (lambda: affinity(torch.ones(4, 3), alpha=0), "alpha"),
        (lambda: recursive_ncut(torch.ones(3, 3, dtype=torch.float64), tau=float("nan")), "tau"),
        (lambda: recursive_ncut(torch.ones(3, 2), tau=0.5), "(N, N)"),
        (lambda: recursive_ncut(torch.tensor([[1.0, 2.0], [0.0, 1.0]]), tau=0.5), "symmetric"),
        (lambda: recursive_ncut(torch.zeros(2, 2), tau=0.5), "degree"),
        (lambda: assign_high_res(torch.ones(4, 2, 2), torch.zeros(2, 3).long(), 4), "segments"),
    ],
)
def test_bad_input_is_refused(call, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        call()


# ---------------------------------------------------------------------------------------------
# An independent transcription of DiffCut's code (PaulCouairon/DiffCut, diffcut/
# recursive_normalized_cut.py, DiffCut.recursive_ncut / get_bipartition / assemble_clusters /
# generate_masks), in numpy float64 (the codes of assemble_clusters in float32, as DiffCut's) and
# in its own structure: painting masks, masked affinity, nodes with a zero in their row dropped
# below level 0, the Rayleigh-quotient Ncut.


def _reference_recursive_ncut(
    feats: np.ndarray, tau: float, alpha: float, dims, sizes: list | None = None
) -> list:
    """``feats (C, N)`` -> DiffCut's list of accumulated (h, w) 0/1 bipartition masks.
    ``sizes``: if given, gets the node count of each subgraph split."""
    n = feats.shape[1]
    accumulator = []

    def step(aff, painting, mask, level):
        painting = ((painting + mask) > 0).astype(np.float64)
        flat = painting.reshape(-1)
        aff = aff * (1 - np.outer(flat, flat))
        if level == 0:
            keep = np.arange(n)
        else:
            zero_rows = set(np.nonzero(aff == 0)[0].tolist())
            keep = np.array(sorted(set(range(n)) - zero_rows), dtype=int)
        a = aff[np.ix_(keep, keep)]
        if a.shape[0] <= 1:
            return
        d = np.diag(a.sum(axis=1))
        d_inv_sqrt = np.diag(1 / np.diag(d) ** 0.5)
        _, vectors = np.linalg.eigh(d_inv_sqrt @ (d - a) @ d_inv_sqrt)
        y = d_inv_sqrt @ vectors[:, 1]
        y = y * np.sign(y[np.argmax(np.abs(y))])
        thresholds = np.linspace(y.min() * 0.99, y.max() * 0.99, 100)
        partitions = [1.0 * (y > t) for t in thresholds]
        lap, total, diag = d - a, np.sum(d), np.diag(d)
        values = []
        for x in partitions:
            x = 2 * x - 1
            k = np.sum(diag * (x > 0)) / total
            b = k / (1 - k)
            z = (1 + x) - b * (1 - x)
            values.append((z @ lap @ z) / (z @ d @ z))
        bipartition = np.zeros(n)
        bipartition[keep] = partitions[int(np.argmin(values))]
        bipartition = bipartition.reshape(dims)
        if min(values) < tau:
            if sizes is not None:
                sizes.append(len(keep))
            accumulator.append(bipartition)
            step(aff, painting, 1 - bipartition, level + 1)
            step(aff, painting, bipartition, level + 1)

    f = feats / np.linalg.norm(feats, axis=0, keepdims=True)
    aff = f.T @ f
    aff = ((aff - aff.min()) / (aff.max() - aff.min())) ** alpha
    step(aff, np.zeros(dims), np.zeros(dims), 0)
    return accumulator


def _reference_generate_masks(
    features: torch.Tensor, tau: float, alpha: float, out: int, sizes: list | None = None
):
    """``features (C, h, w)`` -> (low-res segments (h, w), labels (out, out)) as DiffCut does."""
    c, h, w = features.shape
    fn = F.normalize(features.double(), dim=0)
    clusters = _reference_recursive_ncut(fn.reshape(c, -1).numpy(), tau, alpha, (h, w), sizes)
    mask, top = np.zeros((h, w), np.float32), np.float32(1)
    for cluster in clusters or [np.zeros((h, w))]:
        mask += top * cluster.astype(np.float32)
        top = mask.max() + np.float32(1)
    ids = np.unique(mask)
    segments = np.searchsorted(ids, mask)
    concepts = np.stack([fn.numpy()[:, mask == i].mean(axis=1) for i in ids])  # (K, C)
    up = F.interpolate(fn[None], size=(out, out), mode="bilinear").numpy()[0]  # (C, out, out)
    labels = np.argmax(np.einsum("kc,chw->khw", concepts, up), axis=0)
    return segments, labels


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_matches_a_transcription_of_diffcuts_code(seed):
    g = torch.Generator().manual_seed(100 + seed)
    c, s = 12, 10
    # Smooth random fields of a few directions: uneven regions, several levels of splits.
    coarse = torch.randn(1, c, 3, 3, generator=g)
    features = F.interpolate(coarse, size=(s, s), mode="bilinear", align_corners=True)[0]
    features = features + 0.2 * torch.randn(c, s, s, generator=g)
    for tau in (0.3, 0.6):
        ref_segments, ref_labels = _reference_generate_masks(features, tau, 10, 40)
        segments = recursive_ncut(affinity(features.reshape(c, -1).T, 10), tau)
        assert len(np.unique(ref_segments)) > 2  # the recursion went past level 0
        assert same_partition(segments, ref_segments)
        labels = diffcut_segment(features[None], 40, alpha=10, tau=tau)[0]
        assert same_partition(labels, ref_labels)


def smooth_features(seed: int, c: int = 16, s: int = 16, noise: float = 0.3) -> torch.Tensor:
    """``(c, s, s)``: a random field of 4x4 directions interpolated, plus noise."""
    g = torch.Generator().manual_seed(seed)
    coarse = torch.randn(1, c, 4, 4, generator=g)
    features = F.interpolate(coarse, size=(s, s), mode="bilinear", align_corners=True)[0]
    return features + noise * torch.randn(c, s, s, generator=g)


@pytest.mark.parametrize("seed", [0, 2, 3, 5, 6])
def test_ids_and_labels_at_the_output_size_are_diffcuts_exactly(seed):
    # Id for id, not only the partition: the ids break the matching's ties (which absent class
    # takes a leftover cluster's pixels). DiffCut numbers segments by its assemble_clusters
    # codes, and makes its labels straight at the output size (128 for 32x32 nodes; here 64
    # for 16x16), not at the input side and then subsampled.
    features = smooth_features(seed)
    sizes = []
    ref_segments, ref_labels = _reference_generate_masks(features, 0.3, 10, 64, sizes)
    # A split of two nodes of equal degree is decided by rounding (diffseg/diffcut.py): the
    # seeds are ones without.
    assert len(sizes) > 4 and min(sizes) > 2
    segments = recursive_ncut(affinity(features.reshape(16, -1).T, 10), 0.3)
    np.testing.assert_array_equal(segments.reshape(16, 16).numpy(), ref_segments)
    labels = diffcut_segment(features[None], 64, alpha=10, tau=0.3)[0]
    np.testing.assert_array_equal(labels.numpy(), ref_labels)


def test_float32_codes_merge_segments_as_in_diffcuts_code():
    # Past 2**24 DiffCut's float32 codes round: 26 nested splits (each side the previous one
    # less its first node) push the largest code past 2**25, where "largest + 1" rounds to the
    # largest; a last split taking a fresh node alone then gives it the largest code: the node
    # joins the innermost segment, as in DiffCut's code.
    n = 28
    index = torch.arange(n)
    splits = [(index > k) & (index < n - 1) for k in range(26)] + [index == n - 1]
    ids = assemble_clusters(splits, n, torch.device("cpu"))
    assert len(ids.unique()) == n - 1  # exact codes: n segments
    assert ids[-1] == ids[-2] == n - 2
    codes, top = np.zeros(n, np.float32), np.float32(1)
    for side in splits:
        codes += top * side.numpy().astype(np.float32)
        top = codes.max() + np.float32(1)
    np.testing.assert_array_equal(ids.numpy(), np.unique(codes, return_inverse=True)[1])
