"""Training the toy model: a few steps on the CPU, reproducible, saved in the layout the pipeline loads."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import torch
from safetensors.torch import load_file

from diffseg.pipeline import DiffSegPipeline
from diffseg.train import Recipe, encode_latents, train_tiny
from eval.tools.train_toy import hard_scenes, main

RECIPE = Recipe(seed=3, vae_steps=3, unet_steps=3, batch=2)


def _pixels(n: int = 4) -> torch.Tensor:
    data = hard_scenes(n, 64, seed=5)
    return torch.stack([data[i]["image"] for i in range(n)])


def _train() -> tuple[DiffSegPipeline, list[tuple[str, int, float]]]:
    log: list[tuple[str, int, float]] = []
    pipe = train_tiny(_pixels(), RECIPE, lambda *row: log.append(row))
    return pipe, log


def test_training_changes_both_parts_is_seeded_and_rescales_the_latents() -> None:
    random = DiffSegPipeline.from_tiny(seed=RECIPE.seed)
    (a, log_a), (b, log_b) = _train(), _train()
    assert [(s, i) for s, i, _ in log_a] == [("vae", i) for i in range(3)] + [
        ("unet", i) for i in range(3)
    ]
    assert log_a == log_b  # same seed, same losses
    for part in ("unet", "vae"):
        trained, again, start = (dict(getattr(p, part).named_parameters()) for p in (a, b, random))
        assert all(torch.equal(trained[k], again[k]) for k in trained)
        assert not all(torch.equal(trained[k], start[k]) for k in trained)
        assert not any(p.requires_grad for p in trained.values())
    latents = encode_latents(a.vae, _pixels() * 2 - 1)
    assert abs(a.vae.config.scaling_factor * latents.std().item() - 1) < 1e-5


def test_vae_loss_falls_on_a_fixed_scene() -> None:
    """Twenty steps on one scene: the reconstruction must improve on the random VAE's."""
    log: list[tuple[str, int, float]] = []
    recipe = Recipe(seed=0, vae_steps=20, unet_steps=0, batch=1, vae_lr=3e-3)
    train_tiny(_pixels(1), recipe, lambda *row: log.append(row))
    losses = [loss for stage, _, loss in log if stage == "vae"]
    assert sum(losses[-3:]) / 3 < 0.8 * sum(losses[:3]) / 3


def test_command_writes_a_loadable_model_log_and_recipe(tmp_path: Path) -> None:
    out = tmp_path / "toy"
    args = ["--scenes", "4", "--resolution", "64", "--vae-steps", "2", "--unet-steps", "2"]
    assert main([str(out), *args, "--batch", "2"]) == 0
    with open(out / "train_log.csv") as f:
        rows = list(csv.DictReader(f))
    assert [r["stage"] for r in rows] == ["vae", "vae", "unet", "unet"]
    recipe = json.loads((out / "recipe.json").read_text())
    assert recipe["unet_steps"] == 2 and recipe["data_seed"] == 100 and recipe["device"] == "cpu"
    weights = load_file(out / "unet" / "diffusion_pytorch_model.safetensors")
    assert {t.dtype for t in weights.values()} == {torch.float16}  # half the size
    pipe = DiffSegPipeline.from_pretrained(out, dtype="float32", device="cpu")
    assert pipe.text_encoder is None and pipe.num_self_attention_layers == 16
    labels = pipe(_pixels(1), resolution=64, num_points=8, kl_threshold=(0.01,) * 3)
    assert labels.shape == (1, 64, 64)


def test_the_shipped_toy_model_loads_from_its_config_and_finds_regions() -> None:
    """`conf/model/tiny_trained.yaml` loads the committed weights wherever DIFFSEG_HOME points,
    and at its KL threshold splits held-out hard scenes better than the random model."""
    import hydra
    from hydra import compose, initialize_config_dir

    from eval import CONFIG_DIR
    from eval.scoring.metrics import HungarianIoU

    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        cfg = compose("config", overrides=["model=tiny_trained"])
    trained = hydra.utils.instantiate(cfg.model)
    data = hard_scenes(4, 128, seed=7)
    images = torch.stack([data[i]["image"] for i in range(4)])
    labels = torch.stack([data[i]["label"] for i in range(4)])
    scores = []
    for pipe in (trained, DiffSegPipeline.from_tiny(seed=0)):
        pred = pipe(images, resolution=128, kl_threshold=(0.02,) * 3)
        metric = HungarianIoU(5)
        metric.update(pred, labels)
        scores.append((float(metric.compute()["miou"]), sum(len(p.unique()) for p in pred) / 4))
    (trained_miou, trained_segments), (random_miou, random_segments) = scores
    assert trained_segments > 1.5 and random_segments == 1
    assert trained_miou > random_miou + 0.1
