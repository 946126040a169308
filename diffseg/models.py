"""Model configurations and builders: the real Stable Diffusion 1.4 shapes, an SD-shaped `tiny` model
and an SDXL-shaped `tiny_xl` model.

Configs are plain dicts in the diffusers/transformers layout, so `UNet2DConditionModel(**cfg)` and
`save_pretrained` round-trip them. `tiny` keeps SD 1.x's block structure (three cross-attention down
blocks, a plain down block, a cross-attention mid block, the mirrored up blocks, two layers per block),
hence the same 16 self-attention layers at four resolutions (5 / 5 / 5 / 1 at latent sizes r, r/2, r/4,
r/8), but with a few channels per layer and seeded random weights: it needs no download.

The tiny tokenizer is a real `CLIPTokenizer` built in memory from a byte-level vocabulary (every byte,
with and without the end-of-word suffix, plus the two special tokens) and no merges, so every prompt
tokenises (one token per character) and `save_pretrained` writes ordinary tokenizer files. Its special
tokens follow SD 1.x: `<|startoftext|>`, then `<|endoftext|>` which also pads to 77 tokens.

`tiny_xl` keeps SDXL's structure (SSD-1B, DiffCut's model, is a distilled SDXL of the same
layout): a plain down block then two cross-attention down blocks (so self-attention at latent/2 and
latent/4 only), several transformer layers in the deepest blocks, linear projections, two text
encoders whose penultimate hidden states are concatenated (the second one with a projection: its
pooled output), and the "text_time" added conditioning (pooled text embedding and six size/crop
ids). Its second tokenizer pads with "!" as SDXL's does.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
from tokenizers.pre_tokenizers import ByteLevel
from transformers import (
    CLIPTextConfig,
    CLIPTextModel,
    CLIPTextModelWithProjection,
    CLIPTokenizer,
)

SD_DOWN_BLOCKS = ("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",)
SD_UP_BLOCKS = ("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3
TEXT_LENGTH = 77  # CLIP's context length: prompts are padded to it, as SD does
SD_SCALING_FACTOR = 0.18215
SDXL_SCALING_FACTOR = 0.13025
# SDXL's micro-conditioning: original size (2), crop top-left (2), target size (2).
SDXL_TIME_IDS = 6


def sd14_unet_config() -> dict[str, Any]:
    """The UNet2DConditionModel config of Stable Diffusion 1.4 (`CompVis/stable-diffusion-v1-4`)."""
    return {
        "sample_size": 64,
        "in_channels": 4,
        "out_channels": 4,
        "center_input_sample": False,
        "flip_sin_to_cos": True,
        "freq_shift": 0,
        "down_block_types": list(SD_DOWN_BLOCKS),
        "mid_block_type": "UNetMidBlock2DCrossAttn",
        "up_block_types": list(SD_UP_BLOCKS),
        "block_out_channels": [320, 640, 1280, 1280],
        "layers_per_block": 2,
        "downsample_padding": 1,
        "mid_block_scale_factor": 1,
        "act_fn": "silu",
        "norm_num_groups": 32,
        "norm_eps": 1e-5,
        "cross_attention_dim": 768,
        # diffusers' legacy name: in SD 1.x this is the number of heads (8 heads of 40, 80, 160).
        "attention_head_dim": 8,
    }


def sd14_vae_config() -> dict[str, Any]:
    """The AutoencoderKL config of Stable Diffusion 1.4 (8x downsampling, 4 latent channels)."""
    return {
        "in_channels": 3,
        "out_channels": 3,
        "down_block_types": ["DownEncoderBlock2D"] * 4,
        "up_block_types": ["UpDecoderBlock2D"] * 4,
        "block_out_channels": [128, 256, 512, 512],
        "layers_per_block": 2,
        "act_fn": "silu",
        "latent_channels": 4,
        "norm_num_groups": 32,
        "sample_size": 512,
        "scaling_factor": SD_SCALING_FACTOR,
    }


def sd14_scheduler_config() -> dict[str, Any]:
    """The noise schedule of SD 1.x (scaled-linear betas 0.00085..0.012 over 1000 steps).

    Only `add_noise` is used (the optional noise ablation), which is the same for DDPM and PNDM.
    """
    return {
        "num_train_timesteps": 1000,
        "beta_start": 0.00085,
        "beta_end": 0.012,
        "beta_schedule": "scaled_linear",
        "clip_sample": False,
        "set_alpha_to_one": False,
        "steps_offset": 1,
        "prediction_type": "epsilon",
    }


def tiny_unet_config() -> dict[str, Any]:
    """SD 1.x's UNet block structure with 32/64 channels and 2 heads per attention layer."""
    return {
        **sd14_unet_config(),
        "block_out_channels": [32, 32, 64, 64],
        "norm_num_groups": 8,
        "cross_attention_dim": 32,
        "attention_head_dim": 2,
    }


def tiny_vae_config() -> dict[str, Any]:
    """An AutoencoderKL with SD's 4 levels (8x downsampling) and scaling factor, but 8-32 channels."""
    return {
        **sd14_vae_config(),
        "block_out_channels": [8, 16, 32, 32],
        "layers_per_block": 1,
        "norm_num_groups": 8,
    }


def tiny_xl_unet_config() -> dict[str, Any]:
    """SDXL's UNet layout (3 levels, attention in the two deepest, 1 / 1 / 2 transformer layers,
    "text_time" added conditioning) with 32/64 channels; cross-attention width 64 = the two tiny
    text encoders' 32 + 32, pooled projection 32."""
    time_dim = 8
    return {
        "sample_size": 128,
        "in_channels": 4,
        "out_channels": 4,
        "flip_sin_to_cos": True,
        "freq_shift": 0,
        "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
        "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
        "block_out_channels": [32, 64, 64],
        "layers_per_block": 2,
        "transformer_layers_per_block": [1, 1, 2],
        "norm_num_groups": 8,
        "cross_attention_dim": 64,
        "attention_head_dim": [2, 2, 4],
        "use_linear_projection": True,
        "addition_embed_type": "text_time",
        "addition_time_embed_dim": time_dim,
        "projection_class_embeddings_input_dim": SDXL_TIME_IDS * time_dim + 32,
    }


def tiny_vocab() -> dict[str, int]:
    """Byte-level CLIP vocabulary without merges: 256 bytes, the same with `</w>`, then BOS, EOS."""
    alphabet = sorted(ByteLevel.alphabet())
    tokens = alphabet + [c + "</w>" for c in alphabet] + ["<|startoftext|>", "<|endoftext|>"]
    return {token: i for i, token in enumerate(tokens)}


def tiny_text_config(**overrides: Any) -> CLIPTextConfig:
    """A 2-layer CLIP text transformer of width 32 over the tiny vocabulary (``overrides``: other
    `CLIPTextConfig` fields, e.g. `projection_dim`)."""
    vocab = tiny_vocab()
    return CLIPTextConfig(
        vocab_size=len(vocab),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=TEXT_LENGTH,
        bos_token_id=vocab["<|startoftext|>"],
        eos_token_id=vocab["<|endoftext|>"],
        pad_token_id=vocab["<|endoftext|>"],
        **overrides,
    )


def _tiny_tokenizer(pad_token: str = "<|endoftext|>") -> CLIPTokenizer:
    return CLIPTokenizer(
        vocab=tiny_vocab(), merges=[], model_max_length=TEXT_LENGTH, pad_token=pad_token
    )


def _seeded(seed: int, **builders: Callable[[], torch.nn.Module]) -> dict[str, torch.nn.Module]:
    """The modules the ``builders`` make, in order, with weights drawn after
    ``torch.manual_seed(seed)``, in eval mode without gradients; the global RNG state is kept."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        modules = {name: build() for name, build in builders.items()}
    for module in modules.values():
        module.eval().requires_grad_(False)
    return modules


def build_tiny(seed: int = 0) -> dict[str, Any]:
    """The tiny components, with weights drawn from `torch.manual_seed(seed)`-style generators.

    Returns a dict with `unet`, `vae`, `text_encoder`, `tokenizer`, `scheduler` (all in eval mode).
    The global RNG state is left untouched.
    """
    modules = _seeded(
        seed,
        unet=lambda: UNet2DConditionModel(**tiny_unet_config()),
        vae=lambda: AutoencoderKL(**tiny_vae_config()),
        text_encoder=lambda: CLIPTextModel(tiny_text_config()),
    )
    scheduler = DDPMScheduler.from_config(sd14_scheduler_config())
    return {**modules, "tokenizer": _tiny_tokenizer(), "scheduler": scheduler}


def build_tiny_xl(seed: int = 0) -> dict[str, Any]:
    """The SDXL-shaped tiny components (:func:`tiny_xl_unet_config`), seeded as :func:`build_tiny`.

    Returns a dict with `unet`, `vae`, `text_encoder`, `text_encoder_2`, `tokenizer`,
    `tokenizer_2`, `scheduler`. The scheduler is SDXL's noise schedule as DDPM's (the pipeline
    only noises latents with it).
    """
    modules = _seeded(
        seed,
        unet=lambda: UNet2DConditionModel(**tiny_xl_unet_config()),
        vae=lambda: AutoencoderKL(**{**tiny_vae_config(), "scaling_factor": SDXL_SCALING_FACTOR}),
        text_encoder=lambda: CLIPTextModel(tiny_text_config()),
        text_encoder_2=lambda: CLIPTextModelWithProjection(tiny_text_config(projection_dim=32)),
    )
    return {
        **modules,
        "tokenizer": _tiny_tokenizer(),
        "tokenizer_2": _tiny_tokenizer(pad_token="!"),
        "scheduler": DDPMScheduler.from_config(sd14_scheduler_config()),
    }
