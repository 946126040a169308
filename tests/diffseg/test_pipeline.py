"""DiffSegPipeline end to end on the tiny model at 128 x 128 (latents 16 x 16)."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

from diffseg.loading import UNUSED_PARTS, ModelLoadError, ModelNotFoundError
from diffseg.merge import merge_attention
from diffseg.passes import PassSettings
from diffseg.pipeline import DiffSegOutput, DiffSegPipeline
from diffseg.preprocess import center_crop, resize_image

RES = 128
# Random weights give near-uniform attention: the paper's threshold 1.1 merges everything into one
# segment, this one leaves about a dozen, so label comparisons below are not trivially equal.
KL = (5e-4, 5e-4, 5e-4)


@pytest.fixture(scope="module")
def pipe() -> DiffSegPipeline:
    return DiffSegPipeline.from_tiny(seed=0)


@pytest.fixture(scope="module")
def images() -> torch.Tensor:
    g = torch.Generator().manual_seed(3)
    return torch.rand(2, 3, 96, 160, generator=g)


def test_labels_and_intermediates(pipe, images):
    out = pipe(images, resolution=RES, kl_threshold=KL, return_intermediates=True)
    assert isinstance(out, DiffSegOutput)
    assert out.labels.shape == (2, RES, RES) and out.labels.dtype == torch.long
    assert sorted(out.attention) == [2, 4, 8, 16]
    assert out.aggregated.shape == (2, 16, 16, 16, 16)
    for labels, proposals in zip(out.labels, out.proposals, strict=True):
        assert labels.min() >= 0 and labels.max() < len(proposals)
        assert 1 < labels.unique().numel() <= len(proposals)
    # The one-call path (segment_attention) gives the same labels as the intermediates path.
    assert torch.equal(pipe(images, resolution=RES, kl_threshold=KL), out.labels)


def test_first_merge_dtype_reaches_the_merge(pipe, images):
    half = dict(resolution=RES, kl_threshold=KL, first_merge_dtype="float16")
    out = pipe(images, return_intermediates=True, **half)
    expected = merge_attention(out.aggregated, KL, first_merge_dtype="float16")
    for got, want in zip(out.proposals, expected, strict=True):
        assert torch.equal(got, want)
    assert torch.equal(pipe(images, **half), out.labels)
    assert not torch.equal(out.labels, pipe(images, resolution=RES, kl_threshold=KL))


def test_batch_of_two_equals_two_singles(pipe, images):
    both = pipe(images, resolution=RES, kl_threshold=KL, return_intermediates=True)
    for i in range(2):
        one = pipe(images[i : i + 1], resolution=RES, kl_threshold=KL, return_intermediates=True)
        assert torch.equal(one.labels[0], both.labels[i])
        for r in both.attention:
            torch.testing.assert_close(one.attention[r][0], both.attention[r][i])


def test_deterministic_under_seed(images):
    a = DiffSegPipeline.from_tiny(seed=0)(
        images, resolution=RES, kl_threshold=KL, return_intermediates=True
    )
    b = DiffSegPipeline.from_tiny(seed=0)(
        images, resolution=RES, kl_threshold=KL, return_intermediates=True
    )
    c = DiffSegPipeline.from_tiny(seed=1)(
        images, resolution=RES, kl_threshold=KL, return_intermediates=True
    )
    assert torch.equal(a.labels, b.labels)
    assert torch.equal(a.attention[16], b.attention[16])
    assert not torch.allclose(a.attention[16], c.attention[16])


def test_noise_is_seeded_and_changes_attention(pipe, images):
    latents = pipe.encode_images(pipe.preprocess(images, RES))
    clean = pipe.capture_attention(latents)
    noisy = pipe.capture_attention(latents, PassSettings(noise=True, seed=5))
    again = pipe.capture_attention(latents, PassSettings(noise=True, seed=5))
    other = pipe.capture_attention(latents, PassSettings(noise=True, seed=6))
    assert torch.equal(noisy[16], again[16])
    assert not torch.allclose(noisy[16], clean[16])
    assert not torch.allclose(noisy[16], other[16])


def test_latent_is_the_posterior_mean(pipe, images):
    pixels = pipe.preprocess(images, RES)
    latents = pipe.encode_images(pixels)
    with torch.inference_mode():
        posterior = pipe.vae.encode(pixels).latent_dist
    assert latents.shape == (2, 4, 16, 16)
    torch.testing.assert_close(latents, posterior.mean * 0.18215)
    assert not torch.allclose(latents, posterior.sample() * 0.18215)


def test_preprocess_crops_centre_and_scales(pipe):
    image = torch.rand(1, 3, 70, 64)  # centre square: rows 3..66
    out = pipe.preprocess(image, 64)
    torch.testing.assert_close(out, image[:, :, 3:67] * 2 - 1)
    wide = torch.rand(1, 3, 64, 71)  # columns 3..66
    torch.testing.assert_close(resize_image(center_crop(wide), 64), wide[..., 3:67])
    # Half-pixel bilinear 2x downsampling of a square is the mean of each 2x2 block.
    square = torch.rand(1, 3, 8, 8)
    expected = square.unfold(2, 2, 2).unfold(3, 2, 2).mean((-1, -2))
    torch.testing.assert_close(resize_image(center_crop(square), 4), expected)


def test_pil_input_equals_tensor_input(pipe):
    rng = np.random.default_rng(0)
    arrays = [rng.integers(0, 256, (80, 120, 3), dtype=np.uint8) for _ in range(2)]
    pil = pipe([Image.fromarray(a) for a in arrays], resolution=RES, kl_threshold=KL)
    tensor = torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).float() / 255
    assert torch.equal(pil, pipe(tensor, resolution=RES, kl_threshold=KL))
    assert pil.unique().numel() > 1


def test_empty_prompt_is_bos_then_eos_padding_and_cached(pipe):
    ids = pipe.tokenizer("", padding="max_length", max_length=77).input_ids
    assert len(ids) == 77
    assert ids[0] == pipe.tokenizer.bos_token_id
    assert set(ids[1:]) == {pipe.tokenizer.eos_token_id}
    assert pipe.encode_prompt("") is pipe.encode_prompt("")
    assert pipe.encode_prompt("").shape == (1, 77, 32)
    assert not torch.allclose(pipe.encode_prompt("a cat"), pipe.encode_prompt(""))


def test_from_pretrained_local_dir(pipe, images, tmp_path):
    expected = pipe(images, resolution=RES, kl_threshold=KL, return_intermediates=True)
    full, slim = tmp_path / "full", tmp_path / "slim"
    pipe.save_pretrained(full)
    pipe.save_pretrained(slim, prompt_embeds_only=True)
    for path in (full, slim):
        loaded = DiffSegPipeline.from_pretrained(str(path), device="cpu")
        got = loaded(images, resolution=RES, kl_threshold=KL, return_intermediates=True)
        assert torch.equal(got.labels, expected.labels)
        torch.testing.assert_close(got.attention[16], expected.attention[16])
    with pytest.raises(ValueError, match="only the empty-prompt embedding"):
        loaded(images, resolution=RES, prompt="a cat")

    # The embedding is no module: it follows the pipeline's dtype all the same.
    assert loaded.place("cpu", "bfloat16").encode_prompt("").dtype == torch.bfloat16

    shutil.rmtree(full / "vae")
    with pytest.raises(FileNotFoundError, match=r"\['vae'\].*path of a local copy") as info:
        DiffSegPipeline.from_pretrained(full)
    with pytest.raises(FileNotFoundError, match=r"no such directory.*path of a local copy"):
        DiffSegPipeline.from_pretrained(str(tmp_path / "absent"))
    (slim / "model_index.json").unlink()
    with pytest.raises(ModelNotFoundError, match=r"no model_index\.json"):
        DiffSegPipeline.from_pretrained(slim)
    # A library's message: no Hydra override (the harness adds that, see eval.models.model).
    assert "model.model" not in str(info.value)


def test_stable_diffusion_folder_loads_without_the_parts_diffseg_does_not_use(pipe, tmp_path):
    # The layout of `hf download CompVis/stable-diffusion-v1-4`: a StableDiffusionPipeline index
    # that lists a safety checker and feature extractor, whose folders a DiffSeg copy can lack.
    pipe.save_pretrained(tmp_path)
    index = json.loads((tmp_path / "model_index.json").read_text())
    index.update(
        _class_name="StableDiffusionPipeline",
        safety_checker=["stable_diffusion", "StableDiffusionSafetyChecker"],
        feature_extractor=["transformers", "CLIPImageProcessor"],
        requires_safety_checker=True,
    )
    (tmp_path / "model_index.json").write_text(json.dumps(index))
    loaded = DiffSegPipeline.from_pretrained(tmp_path, device="cpu")
    assert isinstance(loaded, DiffSegPipeline)
    assert torch.equal(loaded.encode_prompt("a cat"), pipe.encode_prompt("a cat"))


def test_hub_model_is_downloaded_by_diffusers_without_unused_parts(
    pipe, images, monkeypatch, tmp_path
):
    from diffusers import DiffusionPipeline

    pipe.save_pretrained(tmp_path)
    calls = []

    def download(model, **kwargs):
        calls.append((model, kwargs))
        return str(tmp_path)  # the snapshot folder diffusers returns

    monkeypatch.setattr(DiffusionPipeline, "download", download)
    loaded = DiffSegPipeline.from_pretrained("org/sd", revision="main", device="cpu")
    assert calls == [("org/sd", {"revision": "main", **dict.fromkeys(UNUSED_PARTS)})]
    expected = pipe(images, resolution=RES, kl_threshold=KL)
    assert torch.equal(loaded(images, resolution=RES, kl_threshold=KL), expected)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"resolution": 100}, "resolution must be a positive multiple of 64"),
        ({"timestep": 1000}, r"timestep must be in \[0, 1000\)"),
    ],
)
def test_bad_arguments(pipe, images, kwargs, match):
    with pytest.raises(ValueError, match=match):
        pipe(images, **{"resolution": RES, **kwargs})


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"num_points": 1}, r"num_points must be an int in \[2, S=16\]"),
        ({"num_points": RES // 8 + 1}, r"got 17"),
        ({"kl_threshold": (1.1, 0.0)}, "positive"),
    ],
)
def test_bad_merge_settings_fail_before_the_unet_pass(pipe, images, monkeypatch, kwargs, match):
    def unet_pass(*args, **kw):
        raise AssertionError("the UNet ran before the merge settings were checked")

    monkeypatch.setattr(pipe, "attention", unet_pass)
    with pytest.raises(ValueError, match=match):
        pipe(images, **{"resolution": RES, **kwargs})


def test_bad_images(pipe):
    with pytest.raises(ValueError, match=r"in \[0, 1\]"):
        pipe(torch.full((1, 3, 64, 64), 2.0), resolution=RES)
    with pytest.raises(ValueError, match=r"\(B, 3, H, W\)"):
        pipe(torch.zeros(3, 64, 64), resolution=RES)
    with pytest.raises(ValueError, match="dtype='int8'"):
        DiffSegPipeline.from_pretrained("unused/model", dtype="int8")


def test_hub_failure_names_the_model_and_the_fix(monkeypatch):
    from diffusers import DiffusionPipeline

    def offline(*args, **kwargs):
        raise OSError("We couldn't connect to the hub")

    monkeypatch.setattr(DiffusionPipeline, "download", offline)
    with pytest.raises(
        ModelLoadError, match=r"could not load model='org/sd'.*path of a local copy"
    ) as info:
        DiffSegPipeline.from_pretrained("org/sd", device="cpu")
    assert "couldn't connect" in str(info.value)
    assert "model.model" not in str(info.value)


def test_harness_adds_the_hydra_override_to_a_model_load_error(tmp_path):
    from eval.models.model import HYDRA_FIX, load_model

    cfg = {"_target_": "diffseg.pipeline.DiffSegPipeline.from_pretrained", "model": "./absent"}
    with pytest.raises(ModelNotFoundError, match=r"no such directory.*model\.model=") as info:
        load_model(cfg, torch.device("cpu"))
    assert str(info.value).endswith(HYDRA_FIX)


def test_compiled_unet_keeps_capturing_the_same_attention(images):
    # The eager backend checks what compile_unet changes (processors installed for good, one store
    # reset per call) without the minutes inductor needs on this CPU (bench --compile does that).
    pipe = DiffSegPipeline.from_tiny(seed=0)
    expected = pipe(images, resolution=RES, kl_threshold=KL, return_intermediates=True)
    assert not pipe.compiled
    pipe.compile_unet(backend="eager")
    pipe.compile_unet(backend="eager")  # a no-op: compiling twice would drop the first store
    assert pipe.compiled
    for _ in range(2):  # a second call must not add to the first call's sums
        out = pipe(images, resolution=RES, kl_threshold=KL, return_intermediates=True)
        assert torch.equal(out.labels, expected.labels)
        for r, attention in expected.attention.items():
            torch.testing.assert_close(out.attention[r], attention, rtol=0, atol=1e-6)


def test_one_device_resolver_for_library_and_harness():
    from diffseg.devices import DeviceUnavailableError, resolve_device
    from eval.runtime import RunError
    from eval.runtime import resolve_device as run_device

    assert resolve_device(None) == resolve_device("auto") == run_device("auto")
    with pytest.raises(ValueError, match="'gpu' is not a torch device"):
        resolve_device("gpu")
    beyond = f"cuda:{torch.cuda.device_count()}"  # absent on any machine
    with pytest.raises(DeviceUnavailableError, match=r"device=cuda:\d+ but"):
        resolve_device(beyond)
    with pytest.raises(RunError, match=r"device=cuda:\d+ but"):
        run_device(beyond)
