"""Capture Stable Diffusion's self-attention probabilities during a UNet forward pass.

DiffSeg reads the self-attention probabilities `softmax(Q K^T * scale)` of every transformer block
(`attn1` of each diffusers `BasicTransformerBlock`), averages them over heads and over the blocks of
each spatial resolution. `SelfAttentionCaptureProcessor` replaces the processor of those layers only:
it returns what diffusers' default processor returns and adds the head-averaged probabilities to an
`AttentionStore`, keyed by the layer's resolution `r` (sequence length `N = r*r`). The resolutions
come from the tensors that flow through the model, so any square latent size and any
`UNet2DConditionModel` layout (SD 1.x, SD 2.x base, ...) works.

The layer output is computed from the same probabilities (`probs @ V`) rather than by a second,
fused attention pass: on CPU with the SD 1.4 configuration this is faster than scaled-dot-product
attention plus a separate probability pass (`bench/bench_pipeline.py --compare-capture` measures
both). Memory: probabilities are materialised for at most `max_elements` scores at a time (a chunk of
heads, or of queries within one head): on CPU 4 MiB, so capture adds little beyond the
per-resolution sums to a plain forward.

Note: `unet.fuse_qkv_projections()` and `unet.set_attn_processor(...)` replace every processor,
ours included. `capture_self_attention` checks on exit that its processors are still installed and
raises otherwise; call `fuse_qkv_projections()` before entering (our processor uses the unfused
`to_q`/`to_k`/`to_v`, which diffusers keeps).
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager

import torch
from diffusers.models.attention_processor import Attention

# Scores per chunk. CPU: 4 MiB chunks were as fast as or up to 2x faster than 256 MiB ones on SD's
# 64x64 layers (bench/bench_pipeline.py --compare-capture) and keep capture's extra memory near the
# per-resolution sums; CUDA: large chunks, so the loop does not become launch-bound.
CPU_MAX_ELEMENTS = 2**20  # 4 MiB of float32 scores
CUDA_MAX_ELEMENTS = 2**28


def default_max_elements(device: torch.device) -> int:
    """Chunk size (number of attention scores) used when none is given, by device type."""
    return CUDA_MAX_ELEMENTS if device.type == "cuda" else CPU_MAX_ELEMENTS


class AttentionStore:
    """Per-resolution sums of head-averaged self-attention probabilities.

    `sums[r]`: float32 `(B, N, N)` with `N = r*r` (query, key), summed over the layers at
    resolution `r`; `counts[r]`: how many layer calls were added.
    """

    def __init__(self) -> None:
        self.sums: dict[int, torch.Tensor] = {}
        self.counts: dict[int, int] = {}

    def reset(self) -> None:
        self.sums.clear()
        self.counts.clear()

    def add(self, probs: torch.Tensor) -> None:
        """Add one layer's head-averaged probabilities `(B, N, N)` (float32)."""
        n = probs.shape[-1]
        r = math.isqrt(n)
        if r * r != n:
            raise ValueError(
                f"self-attention sequence length {n} is not a square number: DiffSeg needs square "
                "latents (centre-crop the image to a square)"
            )
        if r in self.sums:
            self.sums[r] += probs
            self.counts[r] += 1
        else:
            self.sums[r] = probs
            self.counts[r] = 1

    @property
    def resolutions(self) -> list[int]:
        """Captured resolutions, largest first."""
        return sorted(self.sums, reverse=True)

    def averaged(self) -> list[torch.Tensor]:
        """Block-averaged maps `(B, r*r, r*r)`, one per resolution, largest resolution first."""
        if not self.sums:
            raise RuntimeError("no self-attention was captured: run the UNet inside the context")
        return [self.sums[r] / self.counts[r] for r in self.resolutions]


def chunked_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    scale: float,
    mask: torch.Tensor | None,
    max_elements: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention output and head-averaged probabilities, in chunks of at most `max_elements` scores.

    query `(B, H, Nq, d)`, key/value `(B, H, Nk, d)`, mask broadcastable to `(B, H, Nq, Nk)`.
    Returns output `(B, H, Nq, d)` in value's dtype and float32 probabilities `(B, Nq, Nk)`.
    """
    b, h, nq, _ = query.shape
    nk = key.shape[-2]
    per_head = b * nq * nk
    heads_per_chunk = max(1, min(h, max_elements // per_head))
    queries_per_chunk = nq if heads_per_chunk > 1 else max(1, min(nq, max_elements // (b * nk)))
    out = torch.empty(b, h, nq, value.shape[-1], dtype=value.dtype, device=value.device)
    probs_sum = torch.zeros(b, nq, nk, dtype=torch.float32, device=query.device)
    # Scaling the (N, d) queries instead of the (N, N) scores saves a pass over the scores.
    query = query * scale
    key_t = key.transpose(-1, -2)
    for h0 in range(0, h, heads_per_chunk):
        hs = slice(h0, h0 + heads_per_chunk)
        for q0 in range(0, nq, queries_per_chunk):
            qs = slice(q0, q0 + queries_per_chunk)
            scores = torch.matmul(query[:, hs, qs], key_t[:, hs])
            if mask is not None:
                scores += mask[:, hs, qs] if mask.shape[-2] > 1 else mask[:, hs]
            probs = scores.softmax(dim=-1, dtype=torch.float32)
            del scores
            out[:, hs, qs] = torch.matmul(probs.to(value.dtype), value[:, hs])
            probs_sum[:, qs] += probs.sum(dim=1)
    return out, probs_sum.div_(h)


def _query_key_value(
    attn: Attention, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The projected query, key and value per head, `(B, H, N, d)`, as AttnProcessor2_0 has them."""
    batch_size = hidden_states.shape[0]
    query = attn.to_q(hidden_states)
    if encoder_hidden_states is None:
        encoder_hidden_states = hidden_states
    elif attn.norm_cross:
        encoder_hidden_states = attn.norm_encoder_hidden_states(encoder_hidden_states)
    key = attn.to_k(encoder_hidden_states)
    value = attn.to_v(encoder_hidden_states)

    head_dim = key.shape[-1] // attn.heads
    query = query.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)
    key = key.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)
    value = value.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)
    if attn.norm_q is not None:
        query = attn.norm_q(query)
    if attn.norm_k is not None:
        key = attn.norm_k(key)
    return query, key, value


class SelfAttentionCaptureProcessor:
    """Attention processor for self-attention layers that also records their probabilities.

    Same inputs and outputs as diffusers' `AttnProcessor2_0`; in addition adds the head-averaged
    `softmax(Q K^T * attn.scale)` `(B, N, N)` of each call to `store`.
    """

    def __init__(self, store: AttentionStore, max_elements: int | None = None) -> None:
        if max_elements is not None and max_elements < 1:
            raise ValueError(f"max_elements must be >= 1, got {max_elements}")
        self.store = store
        self.max_elements = max_elements

    def __call__(
        self,
        attn: Attention,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        temb: torch.Tensor | None = None,
        *args,
        **kwargs,
    ) -> torch.Tensor:
        # Mirrors AttnProcessor2_0 step by step; only the attention product itself differs.
        residual = hidden_states
        if attn.spatial_norm is not None:
            hidden_states = attn.spatial_norm(hidden_states, temb)
        input_ndim = hidden_states.ndim
        if input_ndim == 4:
            batch_size, channel, height, width = hidden_states.shape
            hidden_states = hidden_states.view(batch_size, channel, height * width).transpose(1, 2)
        batch_size, sequence_length, _ = (
            hidden_states.shape if encoder_hidden_states is None else encoder_hidden_states.shape
        )
        if attention_mask is not None:
            attention_mask = attn.prepare_attention_mask(
                attention_mask, sequence_length, batch_size
            )
            attention_mask = attention_mask.view(
                batch_size, attn.heads, -1, attention_mask.shape[-1]
            )
        if attn.group_norm is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)

        query, key, value = _query_key_value(attn, hidden_states, encoder_hidden_states)
        head_dim = key.shape[-1]
        max_elements = self.max_elements or default_max_elements(query.device)
        hidden_states, probs = chunked_attention(
            query, key, value, attn.scale, attention_mask, max_elements
        )
        self.store.add(probs)

        hidden_states = hidden_states.transpose(1, 2).reshape(batch_size, -1, attn.heads * head_dim)
        hidden_states = hidden_states.to(query.dtype)
        hidden_states = attn.to_out[0](hidden_states)
        hidden_states = attn.to_out[1](hidden_states)
        if input_ndim == 4:
            hidden_states = hidden_states.transpose(-1, -2).reshape(
                batch_size, channel, height, width
            )
        if attn.residual_connection:
            hidden_states = hidden_states + residual
        return hidden_states / attn.rescale_output_factor


def self_attention_layers(unet: torch.nn.Module) -> list[str]:
    """Processor names (`...attn1.processor`) of the UNet's self-attention layers, in model order."""
    return [
        f"{name}.processor"
        for name, module in unet.named_modules()
        if isinstance(module, Attention)
        and name.endswith("attn1")
        and not module.is_cross_attention
    ]


def install_capture(
    unet: torch.nn.Module, store: AttentionStore | None = None, max_elements: int | None = None
) -> SelfAttentionCaptureProcessor:
    """Set one capture processor, adding to ``store`` (a new one unless given), on every
    self-attention layer of ``unet`` (the other processors are kept); returns it."""
    store = AttentionStore() if store is None else store
    processor = SelfAttentionCaptureProcessor(store, max_elements)
    layers = set(self_attention_layers(unet))
    unet.set_attn_processor(
        {name: processor if name in layers else p for name, p in unet.attn_processors.items()}
    )
    return processor


def attention_levels(unet: torch.nn.Module) -> list[int]:
    """The UNet levels (0: the latent's) whose blocks hold self-attention layers, ascending."""
    levels = [i for i, block in enumerate(unet.down_blocks) if hasattr(block, "attentions")]
    if hasattr(unet.mid_block, "attentions"):
        levels.append(len(unet.down_blocks) - 1)
    if not levels:
        raise ValueError("this UNet has no self-attention layers: DiffSeg segments from them")
    return sorted(set(levels))


@contextmanager
def capture_self_attention(
    unet: torch.nn.Module,
    store: AttentionStore | None = None,
    max_elements: int | None = None,
) -> Iterator[AttentionStore]:
    """Install the capture processor on every self-attention layer; restore the originals on exit.

    Yields the `AttentionStore` the forward passes inside the block add to (a new one unless given).
    Cross-attention and all other processors are left as they are. `max_elements` bounds the
    attention scores materialised at once (default: `default_max_elements` of the device).
    """
    layers = self_attention_layers(unet)
    if not layers:
        raise ValueError(
            f"{type(unet).__name__} has no self-attention layers (`attn1` of a transformer block)"
        )
    original = unet.attn_processors
    processor = install_capture(unet, store, max_elements)
    store = processor.store
    try:
        yield store
        current = unet.attn_processors
        replaced = [name for name in layers if current.get(name) is not processor]
        if replaced:
            raise RuntimeError(
                f"{len(replaced)} capture processors were replaced inside capture_self_attention "
                f"(first: {replaced[0]}), e.g. by unet.fuse_qkv_projections() or "
                "set_attn_processor(); call those before entering the context"
            )
    finally:
        unet.set_attn_processor(original)
