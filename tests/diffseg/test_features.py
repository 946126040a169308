"""DiffCut's feature capture (diffseg/features.py) on the SD-shaped tiny UNet and an SDXL-shaped
one."""

from __future__ import annotations

import pytest
import torch
from diffusers import UNet2DConditionModel

from diffseg.attention import capture_self_attention
from diffseg.features import capture_features, feature_layer
from diffseg.models import build_tiny, tiny_unet_config


@pytest.fixture(scope="module")
def unet() -> UNet2DConditionModel:
    return build_tiny(seed=0)["unet"]


def _inputs(unet: UNet2DConditionModel, h: int = 16, w: int = 16, batch: int = 2):
    g = torch.Generator().manual_seed(1)
    latents = torch.randn(batch, 4, h, w, generator=g)
    context = torch.randn(batch, 77, unet.config.cross_attention_dim, generator=g)
    return latents, torch.tensor([50]), context


def _layer_io(unet: UNet2DConditionModel, name: str, latents, t, context):
    """Input and output of module ``name`` in a plain forward pass, by hooks of the test's own."""
    seen = {}
    module = unet.get_submodule(name)
    pre = module.register_forward_pre_hook(
        lambda m, args, kwargs: seen.update(x=args[0] if args else kwargs["hidden_states"]),
        with_kwargs=True,
    )
    post = module.register_forward_hook(lambda m, args, out: seen.update(y=out))
    try:
        with torch.inference_mode():
            unet(latents, t, context)
    finally:
        pre.remove()
        post.remove()
    return seen["x"], seen["y"]


def test_sd_layout_uses_the_last_attention_of_the_third_down_block(unet):
    # SD 1.x: down_blocks[3] is a plain DownBlock2D, so DiffCut reads down_blocks[-2].
    assert feature_layer(unet) == "down_blocks.2.attentions.1.transformer_blocks.0.attn1"


def test_sdxl_layout_uses_the_last_transformer_block_of_the_last_down_block():
    config = {
        **tiny_unet_config(),
        "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
        "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
        "block_out_channels": [16, 32, 64],
        "transformer_layers_per_block": [1, 2, 3],
    }
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        xl = UNet2DConditionModel(**config).eval()
    name = feature_layer(xl)
    assert name == "down_blocks.2.attentions.1.transformer_blocks.2.attn1"
    latents, t, context = _inputs(xl)
    with torch.inference_mode(), capture_features(xl) as store:
        xl(latents, t, context)
    assert store.layer == name and store.features.shape == (2, 64, 4, 4)


@pytest.mark.parametrize(("h", "w"), [(16, 16), (16, 24)])
def test_captured_features_are_the_layer_output_as_an_image(unet, h, w):
    latents, t, context = _inputs(unet, h, w)
    name = feature_layer(unet)
    x, expected = _layer_io(unet, name, latents, t, context)
    assert x.shape == expected.shape == (2, h // 4 * w // 4, 64)  # (B, N, C) sequence
    with torch.inference_mode(), capture_features(unet) as store:
        unet(latents, t, context)
    got = store.features
    assert got.shape == (2, 64, h // 4, w // 4)  # latent / 4, block_out_channels[2]
    # Row-major pixels: feature (b, :, i, j) is token i * w' + j of the sequence.
    torch.testing.assert_close(got, expected.transpose(1, 2).reshape(got.shape), rtol=0, atol=0)
    # The attention layer's own output on its input (before the transformer block's residual).
    with torch.inference_mode():
        torch.testing.assert_close(unet.get_submodule(name)(x), expected, rtol=0, atol=0)


def test_capture_changes_neither_unet_output_nor_captured_attention(unet):
    latents, t, context = _inputs(unet)
    with torch.inference_mode():
        with capture_self_attention(unet) as plain:
            expected = unet(latents, t, context).sample
        with capture_self_attention(unet) as store, capture_features(unet) as features:
            got = unet(latents, t, context).sample
    assert features.features is not None
    assert torch.equal(got, expected)
    assert store.resolutions == plain.resolutions
    for a, b in zip(store.averaged(), plain.averaged(), strict=True):
        assert torch.equal(a, b)


def test_hooks_are_removed_on_exit_even_after_an_error(unet):
    name = feature_layer(unet)
    attn = unet.get_submodule(name)
    transformer = unet.get_submodule(name.split(".transformer_blocks.")[0])
    with pytest.raises(RuntimeError, match="boom"), capture_features(unet):
        assert attn._forward_hooks and transformer._forward_pre_hooks
        raise RuntimeError("boom")
    assert not attn._forward_hooks and not transformer._forward_pre_hooks


def test_a_model_without_attention_down_blocks_is_refused():
    with pytest.raises(ValueError, match="no down block with attentions"):
        feature_layer(torch.nn.Linear(2, 2))
