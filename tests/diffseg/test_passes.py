"""One UNet pass's settings as one value (`diffseg.passes.PassSettings`), and DiffCut's passes with
DiffCut's numerics, checked on the CPU in bfloat16 (autocast, dtypes) and, where there is one, on
CUDA in float16 (`bench/gpu_check.sh sdxl`) against a transcription of DiffCut's `tools/ldm.py`
(PaulCouairon/DiffCut at aa16df4, `LdmExtractor.forward`)."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
from diffusers import DDIMScheduler
from omegaconf import OmegaConf

from diffseg.attention import SelfAttentionCaptureProcessor
from diffseg.diffcut import diffcut_segment
from diffseg.features import capture_features, feature_layer
from diffseg.passes import DIFFCUT, PassSettings
from diffseg.pipeline import DiffSegPipeline
from eval.segmenters import segment_batch, segmenter_call

RES = 64
ITEMS = [{"id": "a"}, {"id": "b"}]
CONFIG = Path(__file__).parents[2] / "conf" / "segmenter" / "diffcut.yaml"


@pytest.fixture(scope="module")
def images() -> torch.Tensor:
    return torch.rand(2, 3, RES, RES, generator=torch.Generator().manual_seed(3))


def diffcut_call() -> dict:
    return segmenter_call(OmegaConf.to_container(OmegaConf.load(CONFIG)), RES, seed=0)


def test_the_seed_counts_only_with_noise() -> None:
    clean = PassSettings(timestep=50, resolution=RES, seed=1)
    assert clean == PassSettings(timestep=50, resolution=RES, seed=2) and clean.seed is None
    assert hash(clean) == hash(PassSettings(timestep=50, resolution=RES))
    noisy = PassSettings(timestep=50, resolution=RES, noise=True, seed=1)
    assert noisy != PassSettings(timestep=50, resolution=RES, noise=True, seed=2)
    assert noisy.key() == {
        "timestep": 50, "resolution": RES, "prompt": "", "noise": True, "seed": 1,
        "numerics": "plain",
    }  # fmt: skip
    assert PassSettings(**noisy.key()) == noisy
    assert PassSettings(numerics="diffcut") != PassSettings()


def test_a_segmenter_call_gives_its_pass_settings() -> None:
    call = diffcut_call()
    assert PassSettings.of(call) == PassSettings(50, RES, "", True, 42)
    assert PassSettings.of(call, numerics="diffcut").arithmetic is DIFFCUT


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"numerics": "fp16"}, r"numerics must be one of \['diffcut', 'plain'\], got 'fp16'"),
        ({"noise": True, "seed": None}, "noise=True needs a seed"),
        ({"timestep": 50.5}, "timestep must be an integer, got 50.5"),
        ({"noise": True, "seed": "1"}, "seed must be an integer"),
    ],
)
def test_bad_pass_settings_are_refused_naming_the_value(kwargs, match) -> None:
    with pytest.raises(ValueError, match=match):
        PassSettings(**kwargs)


def _watch(pipe: DiffSegPipeline) -> tuple[dict, list]:
    """Hooks recording what DiffCut's pass computes in: the VAE's input and weights, the noise
    added, and the UNet's autocast state and attention processors."""
    seen: dict = {}

    def vae_in(module, args):
        seen["pixels"] = args[0].dtype
        seen["vae_weights"] = next(module.parameters()).dtype

    def unet_in(module, args, kwargs):
        seen["latents"] = args[0].dtype
        seen["autocast"] = torch.is_autocast_enabled("cpu") and torch.get_autocast_dtype("cpu")
        processor = module.attn_processors[feature_layer(module) + ".processor"]
        seen["capture"] = isinstance(processor, SelfAttentionCaptureProcessor)

    add_noise = pipe.scheduler.add_noise

    def noise_in(latents, eps, t):
        seen["noise"] = (latents.dtype, eps.dtype)
        return add_noise(latents, eps, t)

    handles = [
        pipe.vae.encoder.register_forward_pre_hook(vae_in),
        pipe.unet.register_forward_pre_hook(unet_in, with_kwargs=True),
    ]
    pipe.scheduler.add_noise = noise_in
    return seen, handles


@pytest.mark.parametrize("layout", ["sd", "sdxl"])
def test_diffcuts_pass_runs_with_diffcuts_numerics(images, layout) -> None:
    # float32 pixels into a float32 VAE, the noise added in float32, the UNet under autocast in
    # the model's dtype with diffusers' attention (no DiffSeg capture); DiffSeg's pass unchanged.
    pipe = DiffSegPipeline.from_tiny(seed=0, dtype="bfloat16", layout=layout)
    vae = copy.deepcopy(pipe.vae.state_dict())
    seen, handles = _watch(pipe)
    try:
        segment_batch(pipe, images, ITEMS, diffcut_call())
        cut = dict(seen)
        pipe(images, resolution=RES, num_points=4, noise=True, seed=1)
    finally:
        for handle in handles:
            handle.remove()
    assert cut == {
        "pixels": torch.float32, "vae_weights": torch.float32, "noise": (torch.float32,) * 2,
        "latents": torch.float32, "autocast": torch.bfloat16, "capture": False,
    }  # fmt: skip
    vae_dtype = torch.float32 if layout == "sdxl" else torch.bfloat16  # SDXL's VAE: upcast
    assert seen == {
        "pixels": vae_dtype, "vae_weights": vae_dtype, "noise": (torch.bfloat16,) * 2,
        "latents": torch.bfloat16, "autocast": False, "capture": True,
    }  # fmt: skip
    # The VAE is back in the model's dtype, its weights unchanged.
    after = pipe.vae.state_dict()
    assert all(torch.equal(after[k], v) and after[k].dtype == v.dtype for k, v in vae.items())


def reference_features(pipe: DiffSegPipeline, images: torch.Tensor) -> torch.Tensor:
    """DiffCut's `LdmExtractor.forward` transcribed: the VAE under float32 autocast (on the CPU,
    which has no float32 autocast, the VAE's weights cast to float32: what that autocast computes),
    the UNet under autocast in the model's dtype; DDIM with trailing spacing; seed 42, timestep
    50, the empty prompt."""
    device = pipe.device
    with torch.no_grad():
        if device.type == "cuda":
            with torch.autocast(device_type="cuda", dtype=torch.float32):
                posterior = pipe.vae.encode(2 * images - 1).latent_dist
        else:
            posterior = copy.deepcopy(pipe.vae).float().encode(2 * images - 1).latent_dist
        latent = posterior.mean * pipe.vae.config.scaling_factor
        rng = torch.Generator(device=device).manual_seed(42)
        shape = (1, 4, RES // 8, RES // 8)
        noise = torch.randn(shape, generator=rng, device=device).expand_as(latent)
        t = torch.tensor([50], device=device).expand(images.shape[0])
        ddim = DDIMScheduler.from_config(pipe.scheduler.config, timestep_spacing="trailing")
        noisy = ddim.add_noise(latent, noise, t)
        embeds = pipe.encode_prompt("").expand(images.shape[0], -1, -1)
        out = {}
        layer = pipe.unet.get_submodule(feature_layer(pipe.unet))
        hook = layer.register_forward_hook(lambda m, a, o: out.update(features=o))
        try:
            with torch.autocast(device_type=device.type, dtype=pipe.dtype):
                pipe.unet(noisy, t, encoder_hidden_states=embeds)
        finally:
            hook.remove()
    b, n, c = out["features"].shape
    side = int(n**0.5)
    return out["features"].transpose(1, 2).reshape(b, c, side, side)


CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


@pytest.mark.parametrize(
    ("device", "dtype"), [("cpu", "bfloat16"), pytest.param("cuda", "float16", marks=CUDA)]
)
def test_diffcuts_features_are_its_codes(images, device, dtype) -> None:
    pipe = DiffSegPipeline.from_tiny(seed=0, device=device, dtype=dtype)
    images = images.to(device)
    call = diffcut_call()
    with capture_features(pipe.unet) as store:
        labels = segment_batch(pipe, images, ITEMS, call)
    expected = reference_features(pipe, images)
    assert store.features.dtype == pipe.dtype
    assert torch.equal(store.features, expected)
    assert torch.equal(labels, diffcut_segment(expected, RES, call["alpha"], call["tau"]).cpu())


def test_a_compiled_unet_refuses_diffcuts_pass(images) -> None:
    pipe = DiffSegPipeline.from_tiny(seed=0)
    pipe.compile_unet(backend="eager")
    with pytest.raises(ValueError, match="run DiffCut without compile=true"):
        pipe.unet_pass(images, PassSettings(resolution=RES, numerics="diffcut"))
    with pytest.raises(ValueError, match="captures none"):
        pipe.attention(images, PassSettings(resolution=RES, numerics="diffcut"))
