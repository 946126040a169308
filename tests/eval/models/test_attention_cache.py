"""The attention cache (eval/models/attention_cache.py): a second run reads the stored attention and gives
identical labels without calling the UNet; the key separates settings; float32 storage equals the
uncached pipeline; plus the harness end to end (hit counters in the run's output)."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from diffseg.passes import PassSettings
from diffseg.pipeline import DiffSegPipeline
from diffseg.reference import realistic_attention
from eval.atomic import read_csv_rows
from eval.models.attention_cache import (
    AttentionCache,
    CachedAttentionPipeline,
    bytes_per_image,
    context,
    image_hash,
)
from tests.helpers import run_module

RES = 64
CALL = {"resolution": RES, "num_points": 4}
PASS = PassSettings(resolution=RES)  # the pass of CALL


@pytest.fixture(scope="module")
def pipe() -> DiffSegPipeline:
    return DiffSegPipeline.from_tiny(seed=0)


@pytest.fixture(scope="module")
def images() -> torch.Tensor:
    return torch.rand(3, 3, RES, RES, generator=torch.Generator().manual_seed(0))


def _count_unet_calls(pipeline: DiffSegPipeline) -> list[int]:
    calls = [0]
    pipeline.unet.register_forward_hook(lambda *_: calls.__setitem__(0, calls[0] + 1))
    return calls


def _wrap(pipe, directory: Path, dtype: str = "bfloat16") -> CachedAttentionPipeline:
    return CachedAttentionPipeline(pipe, AttentionCache(directory, {"model": "tiny"}, dtype))


def test_second_run_reads_the_cache_without_the_unet(tmp_path, images) -> None:
    pipe = DiffSegPipeline.from_tiny(seed=0)
    calls = _count_unet_calls(pipe)
    first = _wrap(pipe, tmp_path)
    labels = first(images[:2], **CALL)
    assert calls[0] == 1 and first.cache.misses == 2
    # A new wrapper (a new run): a merging sweep point, and a batch with one new image.
    second = _wrap(pipe, tmp_path)
    again = second(images[:2], **CALL)
    assert calls[0] == 1 and (second.cache.hits, second.cache.misses) == (2, 0)
    assert torch.equal(again, labels)
    second(images[:2], **{**CALL, "num_points": 2, "kl_threshold": (0.5, 0.5)})
    assert calls[0] == 1
    mixed = second(images[1:], **CALL)  # image 1 stored, image 2 not: the UNet sees image 2 only
    assert calls[0] == 2 and second.cache.misses == 1
    assert torch.equal(mixed[0], labels[1])
    # Stored as bfloat16, one file per image, sizes as the estimate says.
    files = sorted(tmp_path.rglob("*.safetensors"))
    assert len(files) == 3
    stored = second.cache.load(files[0].stem)
    tensors = [*stored.attention.values(), stored.features]
    assert {t.dtype for t in tensors} == {torch.bfloat16}
    assert tuple(stored.features.shape) == (64, 2, 2)  # the tiny model's, latent 8 / 4
    assert sum(t.numel() * 2 for t in tensors) == bytes_per_image(pipe, RES, "bfloat16")
    assert not list(tmp_path.rglob("*.tmp"))


def test_float32_storage_equals_the_uncached_pipeline(tmp_path, pipe, images) -> None:
    cached = _wrap(pipe, tmp_path, "float32")
    expected = pipe(images, **CALL)
    assert torch.equal(cached(images, **CALL), expected)
    assert torch.equal(cached(images, **CALL), expected)  # read back
    torch.testing.assert_close(
        cached.aggregate(images, resolution=RES), pipe.aggregate(images, resolution=RES)
    )


def test_key_separates_settings_and_images(images) -> None:
    cache = AttentionCache("unused", {"model": "tiny"})
    h = image_hash(images[0])
    base = {"timestep": 300, "resolution": RES, "prompt": "", "noise": False, "seed": None}
    key = cache.key(h, base)
    assert cache.key(h, dict(base)) == key
    assert cache.key(h, {**base, "timestep": 200}) != key
    assert cache.key(h, {**base, "prompt": "a photo"}) != key
    assert cache.key(image_hash(images[1]), base) != key
    assert AttentionCache("unused", {"model": "sd14"}).key(h, base) != key
    assert AttentionCache("unused", {"model": "tiny"}, "float32").key(h, base) != key
    assert image_hash(images[0].clone()) == h


def test_noised_entries_do_not_depend_on_the_batching(tmp_path, images) -> None:
    # Every image of a batch gets the same seeded noise map: a stored image is reused in another
    # batch, and its labels are those of the image alone.
    pipe = DiffSegPipeline.from_tiny(seed=0)
    calls = _count_unet_calls(pipe)
    cached = _wrap(pipe, tmp_path, "float32")
    call = {**CALL, "noise": True, "seed": 3}
    pair = cached(images[:2], **call)
    assert calls[0] == 1
    mixed = cached(images[1:3], **call)  # image 1 read, the UNet sees image 2 only
    assert calls[0] == 2 and cached.cache.misses == 3
    assert torch.equal(mixed[0], pair[1])
    assert torch.equal(mixed[1], pipe(images[2:3], **call)[0])
    other_seed = pipe.aggregate(images[1:2], resolution=RES, noise=True, seed=4)
    assert not torch.equal(
        other_seed, cached.aggregate(images[1:2], resolution=RES, noise=True, seed=3)
    )


def test_bad_storage_dtype() -> None:
    with pytest.raises(ValueError, match=r"cache\.dtype"):
        AttentionCache("x", {}, "int8")
    with pytest.raises(ValueError, match=r"float16 is not offered.*cache\.dtype=bfloat16"):
        AttentionCache("x", {}, "float16")


def test_bfloat16_keeps_what_float16_flushes_to_zero() -> None:
    # Why float16 is refused: peaked attention holds probabilities far below float16's smallest
    # subnormal (6e-8); they become 0 and their maps' KL infinite. bfloat16 keeps float32's range.
    attention = realistic_attention(batch=1, size=16, seed=0)[0].mean(dim=1)
    tiny = (attention > 0) & (attention < 2**-25)
    assert tiny.any()
    assert (attention.to(torch.float16)[tiny] == 0).all()
    assert (attention.to(torch.bfloat16)[tiny] > 0).all()


def _flip_bytes(path: Path, fraction: float = 0.02) -> None:
    """Flip one bit in ``fraction`` of the bytes after the safetensors header (the values)."""
    data = bytearray(path.read_bytes())
    start = 8 + int.from_bytes(data[:8], "little")
    for i in range(start, len(data), int(1 / fraction)):
        data[i] ^= 0x10
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("fault", ["flipped", "swapped", "truncated", "random"])
def test_a_bad_entry_is_reported_once_and_computed_again(tmp_path, images, capsys, fault) -> None:
    pipe = DiffSegPipeline.from_tiny(seed=0)
    calls = _count_unet_calls(pipe)
    first = _wrap(pipe, tmp_path)
    labels = first(images[:2], **CALL)
    passes = first.unet_pass(images[:2], PASS)
    paths = [first.cache.path(first.cache.key(image_hash(im), PASS.key())) for im in images[:2]]
    assert all(p.is_file() for p in paths) and calls[0] == 1
    if fault == "flipped":
        _flip_bytes(paths[0])
    elif fault == "swapped":
        a, b = (p.read_bytes() for p in paths)
        paths[0].write_bytes(b)
        paths[1].write_bytes(a)
    elif fault == "truncated":
        paths[0].write_bytes(paths[0].read_bytes()[:-100])
    else:  # random bytes in the values, header intact: non-finite attention unless caught
        data = bytearray(paths[0].read_bytes())
        data[-4096:] = torch.randint(0, 256, (4096,), dtype=torch.uint8).numpy().tobytes()
        paths[0].write_bytes(bytes(data))
    capsys.readouterr()
    second = _wrap(pipe, tmp_path)
    assert torch.equal(second(images[:2], **CALL), labels)
    bad = 2 if fault == "swapped" else 1
    assert calls[0] == 2 and (second.cache.bad, second.cache.misses) == (bad, bad)
    err = capsys.readouterr().err
    assert err.count(f"attention cache {tmp_path}: entry") == 1, err
    assert f"{bad} bad entries among them replaced" in second.cache.summary()
    # Replaced by good entries: a third run reads both.
    third = _wrap(pipe, tmp_path)
    again = third.unet_pass(images[:2], PASS)
    assert (third.cache.hits, third.cache.bad) == (2, 0)
    for r in passes.attention:
        assert torch.equal(again.attention[r], passes.attention[r])


def test_key_covers_the_weights_at_a_model_path(tmp_path, monkeypatch) -> None:
    # As the breaker did: a copy of the toy model, its UNet weights replaced in place by others
    # of the same shapes and size. The config is the same; the key must not be.
    monkeypatch.setenv("DIFFSEG_HOME", str(tmp_path))
    model = tmp_path / "model"
    shutil.copytree(Path(__file__).resolve().parents[3] / "models" / "tiny_trained", model)
    cfg = {"_target_": "diffseg.pipeline.DiffSegPipeline.from_pretrained", "model": str(model)}
    before = context(cfg, torch.device("cpu"), torch.float32)
    weights = next((model / "unet").glob("*.safetensors"))
    size = weights.stat().st_size
    with safe_open(weights, "pt") as f:
        metadata = f.metadata()
    tensors = {k: torch.randn_like(t.float()).to(t.dtype) for k, t in load_file(weights).items()}
    save_file(tensors, weights, metadata)
    assert weights.stat().st_size == size
    after = context(cfg, torch.device("cpu"), torch.float32)
    assert after["model"] == before["model"] and after["weights"] != before["weights"]
    h = image_hash(torch.zeros(3, 8, 8))
    keys = [AttentionCache("unused", c).key(h, PASS.key()) for c in (before, after)]
    assert keys[0] != keys[1]


@pytest.mark.slow
def test_harness_second_run_reuses_the_cache(tmp_path: Path) -> None:
    common = [
        "dataset=synthetic", "model=tiny", "limit=3", f"dataset.resolution={RES}",
        "segmenter.num_points=8", "logger=csv", "num_workers=0", "n_qualitative=0",
        "cache.attention=true", f"cache.dir={tmp_path / 'cache'}",
        f"paths.ledger={tmp_path / 'ledger.csv'}",
    ]  # fmt: skip
    outs = []
    for run in ("a", "b"):
        out = run_module("eval", Path.cwd(), *common, f"hydra.run.dir={tmp_path / run}")
        assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
        outs.append(out.stdout)
    assert "MiB per image (bfloat16) x 3 images" in outs[0]
    assert "0 image(s) read, 3 computed" in outs[0]
    assert "3 image(s) read, 0 computed" in outs[1]
    a, b = (read_csv_rows(tmp_path / run / "results.csv")[0] for run in ("a", "b"))
    assert (a["pixel_accuracy"], a["miou"]) == (b["pixel_accuracy"], b["miou"])
    per_image = [read_csv_rows(tmp_path / run / "per_image.csv") for run in ("a", "b")]
    assert per_image[0] == per_image[1]
