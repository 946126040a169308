"""Training the SD-shaped tiny model (`diffseg.models`): a toy, to see self-attention grouping emerge.

Two stages, as Stable Diffusion's: the VAE first (reconstruction plus a small KL term), then the
UNet on the frozen VAE's latents with SD's objective (epsilon prediction under the scaled-linear
noise schedule of `diffseg.models.sd14_scheduler_config`, timesteps uniform over 0..999) and the
empty-prompt embedding of the tiny text encoder as its only condition. Every random draw comes
from one seeded `torch.Generator`, and the number of steps is fixed, so a run is reproducible on
one device. The images are given as a tensor; `eval.tools.train_toy` is the command that draws them.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel

from diffseg.pipeline import DiffSegPipeline

Log = Callable[[str, int, float], None]


@dataclass(frozen=True)
class Recipe:
    """The settings of a run; `steps` are optimiser steps of `batch` images each."""

    seed: int = 0
    vae_steps: int = 200
    unet_steps: int = 1000
    batch: int = 16
    vae_lr: float = 1e-3
    unet_lr: float = 1e-3
    kl_weight: float = 1e-6
    grad_clip: float = 1.0

    def as_dict(self) -> dict:
        return asdict(self)


def _batches(
    images: torch.Tensor, steps: int, batch: int, generator: torch.Generator
) -> Iterator[torch.Tensor]:
    """`steps` batches `(batch, ...)` of `images (N, ...)`, drawn with replacement."""
    for _ in range(steps):
        yield images[torch.randint(len(images), (batch,), generator=generator)]


def _step(
    loss: torch.Tensor, module: torch.nn.Module, optimiser: torch.optim.Optimizer, clip: float
) -> float:
    optimiser.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(module.parameters(), clip)
    optimiser.step()
    return loss.item()


def train_vae(
    vae: AutoencoderKL,
    pixels: torch.Tensor,
    recipe: Recipe,
    generator: torch.Generator,
    log: Log,
) -> None:
    """Train `vae` in place on `pixels (N, 3, R, R)` in [-1, 1]: MSE + `kl_weight` x KL."""
    vae.train().requires_grad_(True)
    optimiser = torch.optim.AdamW(vae.parameters(), lr=recipe.vae_lr, weight_decay=0.0)
    device = next(vae.parameters()).device
    for step, batch in enumerate(_batches(pixels, recipe.vae_steps, recipe.batch, generator)):
        batch = batch.to(device)
        posterior = vae.encode(batch).latent_dist
        eps = torch.randn(posterior.mean.shape, generator=generator).to(device)
        recon = vae.decode(posterior.mean + posterior.std * eps).sample
        loss = F.mse_loss(recon, batch) + recipe.kl_weight * posterior.kl().mean()
        log("vae", step, _step(loss, vae, optimiser, recipe.grad_clip))
    vae.eval().requires_grad_(False)


@torch.no_grad()
def encode_latents(vae: AutoencoderKL, pixels: torch.Tensor, chunk: int = 64) -> torch.Tensor:
    """Posterior means `(N, C, R/8, R/8)` of `pixels (N, 3, R, R)`, unscaled."""
    device = next(vae.parameters()).device
    return torch.cat([vae.encode(p.to(device)).latent_dist.mean.cpu() for p in pixels.split(chunk)])


def train_unet(  # noqa: PLR0913 (the training loop's parts, each used)
    unet: UNet2DConditionModel,
    latents: torch.Tensor,
    context: torch.Tensor,
    scheduler: DDPMScheduler,
    recipe: Recipe,
    generator: torch.Generator,
    log: Log,
) -> None:
    """Train `unet` in place on scaled `latents (N, C, S, S)`: epsilon MSE, `context (1, 77, D)`."""
    unet.train().requires_grad_(True)
    optimiser = torch.optim.AdamW(unet.parameters(), lr=recipe.unet_lr, weight_decay=0.0)
    device = next(unet.parameters()).device
    steps = scheduler.config.num_train_timesteps
    context = context.to(device)
    for step, batch in enumerate(_batches(latents, recipe.unet_steps, recipe.batch, generator)):
        t = torch.randint(steps, (recipe.batch,), generator=generator)
        eps = torch.randn(batch.shape, generator=generator)
        noisy = scheduler.add_noise(batch, eps, t).to(device)
        pred = unet(noisy, t.to(device), encoder_hidden_states=context.expand(len(batch), -1, -1))
        loss = F.mse_loss(pred.sample, eps.to(device))
        log("unet", step, _step(loss, unet, optimiser, recipe.grad_clip))
    unet.eval().requires_grad_(False)


def train_tiny(
    pixels: torch.Tensor,
    recipe: Recipe,
    log: Log,
    device: str | torch.device = "cpu",
) -> DiffSegPipeline:
    """The tiny model (`diffseg.models.build_tiny(recipe.seed)`) trained on `pixels (N, 3, R, R)`
    in [0, 1]: VAE, then UNet; returns it as a float32 pipeline with the empty-prompt embedding.

    The VAE's scaling factor is set, as SD's was, to one over the standard deviation of the
    training latents, so that the UNet sees unit-variance latents.
    """
    pipe = DiffSegPipeline.from_tiny(seed=recipe.seed, device=device, dtype=torch.float32)
    generator = torch.Generator().manual_seed(recipe.seed)
    scaled = pixels * 2 - 1
    train_vae(pipe.vae, scaled, recipe, generator, log)
    latents = encode_latents(pipe.vae, scaled)
    scaling = 1.0 / latents.std().item()
    pipe.vae.register_to_config(scaling_factor=scaling)
    context = pipe.encode_prompt("").float().clone()  # a normal tensor, not an inference one
    train_unet(pipe.unet, latents * scaling, context, pipe.scheduler, recipe, generator, log)
    return pipe
