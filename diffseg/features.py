"""Capture DiffCut's UNet features during a UNet forward pass (the same pass as the attention maps).

DiffCut (PaulCouairon/DiffCut, ``tools/ldm.py``, ``LdmExtractor.register_hooks``) reads the output
of the self-attention layer ``attn1`` of the last transformer block of the last transformer of the
UNet encoder's last cross-attention down block: ``down_blocks[-2]`` for SD 1.x (its last down block
has no attention), ``down_blocks[-1]`` for SSD-1B / SDXL. That output is the attention layer's own
result (after its output projection), before ``BasicTransformerBlock`` adds the residual. Its
resolution is the latent's / 4 (32x32 for a 1024x1024 image). :func:`feature_layer` finds that
layer by structure (the last down block with ``attentions``), so any ``UNet2DConditionModel``
layout works, the project's tiny model included.

:func:`capture_features` registers forward hooks only; they change no computation, and work with
:func:`diffseg.attention.capture_self_attention` in the same pass (the hook sees what the capture
processor returns). The features are stored as ``(B, C, h, w)`` in the UNet's dtype; the spatial
size comes from the transformer's input, so non-square latents work too.

The rest of DiffCut's pass (``LdmExtractor.forward``; for the harness): the image resized to
1024x1024, the VAE posterior mean times the scaling factor, noised to timestep 50 with
``scheduler.add_noise`` (one ``(1, 4, h, w)`` noise draw from a CUDA generator seeded 42, shared by
the batch), one UNet pass with the empty prompt (SDXL: plus its pooled embedding and time ids for
an uncropped 1024x1024 image), with the model in float16.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch


@dataclass
class FeatureStore:
    """The last captured features ``(B, C, h, w)`` of layer ``layer`` (None before any pass)."""

    layer: str
    features: torch.Tensor | None = None


def feature_block(unet: torch.nn.Module) -> int:
    """Index of the down block holding DiffCut's feature layer: the last one with attentions (2
    for SD 1.x and SDXL); its level, so the features are ``latent / 2**index`` per side."""
    blocks = [
        i
        for i, block in enumerate(getattr(unet, "down_blocks", ()))
        if hasattr(block, "attentions")
    ]
    if not blocks:
        raise ValueError(
            f"{type(unet).__name__} has no down block with attentions: DiffCut's features need a "
            "UNet2DConditionModel-style encoder (down_blocks with transformer blocks)"
        )
    return blocks[-1]


def feature_shape(unet: torch.nn.Module, latent_side: int) -> tuple[int, int, int]:
    """``(C, h, w)`` of the features of a ``latent_side`` square latent (SD 1.x at 512 px:
    ``(1280, 16, 16)``)."""
    index = feature_block(unet)
    side = latent_side >> index
    return unet.config.block_out_channels[index], side, side


def feature_layer(unet: torch.nn.Module) -> str:
    """Module name of DiffCut's feature layer in ``unet``.

    ``down_blocks.2.attentions.1.transformer_blocks.0.attn1`` for SD 1.x,
    ``down_blocks.2.attentions.1.transformer_blocks.9.attn1`` for SDXL.
    """
    index = feature_block(unet)
    block = unet.down_blocks[index]
    transformer = len(block.attentions) - 1
    layer = len(block.attentions[transformer].transformer_blocks) - 1
    return f"down_blocks.{index}.attentions.{transformer}.transformer_blocks.{layer}.attn1"


@contextmanager
def capture_features(unet: torch.nn.Module) -> Iterator[FeatureStore]:
    """Hook DiffCut's feature layer (:func:`feature_layer`); the hooks are removed on exit.

    Yields a :class:`FeatureStore` whose ``features`` each UNet pass inside the block overwrites
    with the layer's output ``(B, N, C)`` reshaped to ``(B, C, h, w)``.
    """
    name = feature_layer(unet)
    store = FeatureStore(layer=name)
    attn = unet.get_submodule(name)
    # The transformer whose input (B, C, h, w) gives the spatial size of the (B, h*w, C) output.
    transformer = unet.get_submodule(name.split(".transformer_blocks.")[0])
    size: list[int] = []

    def record_size(module: torch.nn.Module, args: tuple, kwargs: dict[str, Any]) -> None:
        hidden = args[0] if args else kwargs["hidden_states"]
        size[:] = hidden.shape[-2:]

    def record_features(module: torch.nn.Module, args: tuple, output: torch.Tensor) -> None:
        b, _, c = output.shape
        store.features = output.detach().transpose(1, 2).reshape(b, c, *size)

    handles = [
        transformer.register_forward_pre_hook(record_size, with_kwargs=True),
        attn.register_forward_hook(record_features),
    ]
    try:
        yield store
    finally:
        for handle in handles:
            handle.remove()
