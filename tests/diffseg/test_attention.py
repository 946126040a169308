"""Self-attention capture on the SD-shaped tiny UNet (16 x 16 latents: resolutions 16, 8, 4, 2)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from diffusers import UNet2DConditionModel

from diffseg.attention import (
    AttentionStore,
    capture_self_attention,
    chunked_attention,
    self_attention_layers,
)
from diffseg.models import build_tiny, tiny_unet_config


@pytest.fixture(scope="module")
def unet() -> UNet2DConditionModel:
    return build_tiny(seed=0)["unet"]


def _inputs(unet: UNet2DConditionModel, size: int = 16, batch: int = 2):
    g = torch.Generator().manual_seed(1)
    latents = torch.randn(batch, 4, size, size, generator=g)
    context = torch.randn(batch, 77, unet.config.cross_attention_dim, generator=g)
    return latents, torch.tensor([300]), context


def test_output_matches_default_processor(unet):
    latents, t, context = _inputs(unet)
    with torch.inference_mode():
        expected = unet(latents, t, context).sample
        with capture_self_attention(unet) as store:
            got = unet(latents, t, context).sample
    assert store.counts  # the capture path really ran
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5 * expected.abs().max().item())


def test_captured_probabilities_equal_manual_softmax(unet):
    latents, t, context = _inputs(unet)
    inputs: dict[str, torch.Tensor] = {}

    def hook(name):
        def fn(module, args, kwargs):
            inputs[name] = (args[0] if args else kwargs["hidden_states"]).detach().clone()

        return fn

    modules = {n: m for n, m in unet.named_modules() if n.endswith("attn1")}
    handles = [m.register_forward_pre_hook(hook(n), with_kwargs=True) for n, m in modules.items()]
    try:
        with torch.inference_mode(), capture_self_attention(unet) as store:
            unet(latents, t, context)
    finally:
        for h in handles:
            h.remove()

    sums: dict[int, torch.Tensor] = {}
    counts: dict[int, int] = {}
    for name, module in modules.items():
        x = inputs[name].double()
        b, n, _ = x.shape
        heads = module.heads
        q = F.linear(x, module.to_q.weight.double()).view(b, n, heads, -1).transpose(1, 2)
        k = F.linear(x, module.to_k.weight.double()).view(b, n, heads, -1).transpose(1, 2)
        probs = torch.softmax(q @ k.transpose(-1, -2) * module.scale, dim=-1).mean(dim=1)
        r = int(n**0.5)
        sums[r] = sums.get(r, 0) + probs
        counts[r] = counts.get(r, 0) + 1

    assert store.resolutions == [16, 8, 4, 2]
    for r, got in zip(store.resolutions, store.averaged(), strict=True):
        assert got.dtype == torch.float32 and got.shape == (2, r * r, r * r)
        torch.testing.assert_close(got.double(), sums[r] / counts[r], rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(got.sum(-1), torch.ones(2, r * r), rtol=0, atol=1e-5)


def test_sixteen_layers_grouped_five_five_five_one(unet):
    assert len(self_attention_layers(unet)) == 16
    latents, t, context = _inputs(unet, batch=1)
    with torch.inference_mode(), capture_self_attention(unet) as store:
        unet(latents, t, context)
    assert store.counts == {16: 5, 8: 5, 4: 5, 2: 1}


def test_resolutions_come_from_the_model():
    # SD 2.x-style blocks (linear projections, per-block head counts) at a 24 x 24 latent.
    config = {
        **tiny_unet_config(),
        "use_linear_projection": True,
        "attention_head_dim": [2, 4, 4, 4],
    }
    torch.manual_seed(0)
    unet = UNet2DConditionModel(**config).eval()
    latents, t, context = _inputs(unet, size=24, batch=1)
    with torch.inference_mode():
        expected = unet(latents, t, context).sample
        with capture_self_attention(unet) as store:
            got = unet(latents, t, context).sample
    assert store.counts == {24: 5, 12: 5, 6: 5, 3: 1}
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5 * expected.abs().max().item())


def test_processors_restored_and_cross_attention_untouched(unet):
    before = unet.attn_processors
    cross = [n for n in before if "attn2" in n]
    with pytest.raises(KeyError), capture_self_attention(unet):
        inside = unet.attn_processors
        assert all(inside[n] is before[n] for n in cross)
        assert all(inside[n] is not before[n] for n in self_attention_layers(unet))
        raise KeyError("boom")  # restored even when the body fails
    after = unet.attn_processors
    assert before.keys() == after.keys()
    assert all(after[n] is before[n] for n in before)


def test_replaced_processors_are_detected():
    unet = build_tiny(seed=0)["unet"]
    before = unet.attn_processors
    with pytest.raises(RuntimeError, match="fuse_qkv_projections"), capture_self_attention(unet):
        unet.fuse_qkv_projections()
    assert all(unet.attn_processors[n] is before[n] for n in before)


@pytest.mark.parametrize("max_elements", [10**9, 3 * 64 * 64, 2048])
def test_chunked_attention_matches_sdpa(max_elements):
    # Chunks of all heads, of some heads, and of a few queries within one head.
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 4, 64, 8, generator=g) for _ in range(3))
    mask = torch.randn(2, 4, 1, 64, generator=g)
    for m in (None, mask):
        out, probs = chunked_attention(q, k, v, 8**-0.5, m, max_elements)
        torch.testing.assert_close(out, F.scaled_dot_product_attention(q, k, v, attn_mask=m))
        scores = q @ k.transpose(-1, -2) * 8**-0.5 + (0 if m is None else m)
        torch.testing.assert_close(probs, scores.softmax(-1).mean(1))


def test_store_rejects_non_square_sequences():
    with pytest.raises(ValueError, match="not a square"):
        AttentionStore().add(torch.ones(1, 12, 12) / 12)
