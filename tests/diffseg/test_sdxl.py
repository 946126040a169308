"""SDXL-shaped UNets (SSD-1B, DiffCut's model) on the tiny SDXL-shaped model (`model=tiny_xl`): the
added conditioning, loading from a folder, the noise schedule, and a harness run with DiffSeg,
K-Means-C and DiffCut on a COCO-Stuff fixture."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import pytest
import torch
from diffusers import (
    DDIMScheduler,
    DDPMScheduler,
    EulerDiscreteScheduler,
    PNDMScheduler,
    StableDiffusionXLPipeline,
)

import tests.fixtures as fx
from diffseg.features import feature_layer
from diffseg.loading import ModelNotFoundError
from diffseg.models import sd14_scheduler_config
from diffseg.passes import PassSettings
from diffseg.pipeline import DiffSegPipeline
from eval.results import paper
from tests.helpers import run_module

RES = 128  # latent 16: self-attention at 8x8 and 4x4, DiffCut's features at 4x4
XL_PASS = PassSettings(timestep=50, resolution=RES, noise=True, seed=42)


@pytest.fixture(scope="module")
def pipe() -> DiffSegPipeline:
    return DiffSegPipeline.from_tiny(seed=0, device="cpu", layout="sdxl")


@pytest.fixture(scope="module")
def images() -> torch.Tensor:
    return torch.rand(2, 3, RES, RES, generator=torch.Generator().manual_seed(5))


def test_sdxl_layout_attends_at_half_and_quarter_latent_and_feeds_diffcut(pipe, images):
    assert pipe.is_xl and not DiffSegPipeline.from_tiny(seed=0).is_xl
    out = pipe.unet_pass(images, XL_PASS)
    assert {r: tuple(a.shape) for r, a in out.attention.items()} == {
        8: (2, 64, 64),
        4: (2, 16, 16),
    }
    assert list(out.attention) == pipe.attention_sides(RES) == [8, 4]
    # DiffCut's layer: the last transformer layer of the last down block (SDXL: down_blocks[-1]).
    assert feature_layer(pipe.unet) == "down_blocks.2.attentions.1.transformer_blocks.1.attn1"
    assert tuple(out.features.shape) == (2, 64, 4, 4)
    # The merge grid lives on the largest attention map: R / 16 per side, not the latent's R / 8.
    assert pipe.attention_scale_factor == 16
    labels = pipe(images, resolution=RES, num_points=8, kl_threshold=[0.01] * 3)
    assert labels.shape == (2, RES, RES)
    with pytest.raises(ValueError, match=r"S=8\].*128px image, 16 px per position"):
        pipe(images, resolution=RES, num_points=16)


def test_the_unet_gets_diffusers_sdxl_conditioning_of_the_input_size(pipe, images):
    seen = {}

    def record(module, args, kwargs):
        seen.update(kwargs)

    hook = pipe.unet.register_forward_pre_hook(record, with_kwargs=True)
    try:
        pipe.unet_pass(images, PassSettings(timestep=50, resolution=RES), features=False)
    finally:
        hook.remove()
    # What diffusers' own SDXL pipeline (DiffCut's get_text_embeds) gives an uncropped R x R image.
    sdxl = StableDiffusionXLPipeline(
        pipe.vae, pipe.text_encoder, pipe.text_encoder_2, pipe.tokenizer, pipe.tokenizer_2,
        pipe.unet, pipe.scheduler, add_watermarker=False,
    )  # fmt: skip
    embeds, _, pooled, _ = sdxl.encode_prompt("", do_classifier_free_guidance=False)
    time_ids = sdxl._get_add_time_ids(
        (RES, RES), (0, 0), (RES, RES), embeds.dtype, pipe.text_encoder_2.config.projection_dim
    )
    assert torch.equal(seen["encoder_hidden_states"], embeds.expand(2, -1, -1))
    added = seen["added_cond_kwargs"]
    assert torch.equal(added["text_embeds"], pooled.expand(2, -1))
    assert torch.equal(added["time_ids"], time_ids.expand(2, -1))
    assert time_ids.tolist() == [[RES, RES, 0, 0, RES, RES]]


def test_folder_round_trip_full_and_empty_prompt_only(pipe, images, tmp_path):
    expected = pipe.unet_pass(images, XL_PASS)
    full, slim = tmp_path / "full", tmp_path / "slim"
    pipe.save_pretrained(full)
    pipe.save_pretrained(slim, prompt_embeds_only=True)
    for path in (full, slim):
        loaded = DiffSegPipeline.from_pretrained(path, device="cpu")
        assert loaded.is_xl
        got = loaded.unet_pass(images, XL_PASS)
        for r in expected.attention:
            assert torch.equal(got.attention[r], expected.attention[r])
        assert torch.equal(got.features, expected.features)
    assert loaded.text_encoder_2 is None
    with pytest.raises(ValueError, match=r"only the empty-prompt.*text_encoder_2/, tokenizer_2/"):
        loaded.encode_prompt("a cat")
    shutil.rmtree(full / "text_encoder_2")
    with pytest.raises(ModelNotFoundError, match=r"\['text_encoder_2'\].*text_encoder_2/"):
        DiffSegPipeline.from_pretrained(full)


def test_a_folder_in_ssd1b_hub_layout_loads(pipe, images, tmp_path):
    # `hf download segmind/SSD-1B`: a StableDiffusionXLPipeline index with its own config keys and
    # unused parts, an Euler scheduler; DiffSeg reads what it needs and noises as DDPM.
    pipe.save_pretrained(tmp_path)
    index = json.loads((tmp_path / "model_index.json").read_text())
    index.update(
        _class_name="StableDiffusionXLPipeline",
        scheduler=["diffusers", "EulerDiscreteScheduler"],
        force_zeros_for_empty_prompt=True,
        image_encoder=[None, None],
        feature_extractor=[None, None],
    )
    (tmp_path / "model_index.json").write_text(json.dumps(index))
    config = tmp_path / "scheduler" / "scheduler_config.json"
    euler = EulerDiscreteScheduler.from_config(json.loads(config.read_text()))
    config.write_text(json.dumps({**dict(euler.config), "_class_name": "EulerDiscreteScheduler"}))
    loaded = DiffSegPipeline.from_pretrained(tmp_path, device="cpu")
    assert isinstance(loaded.scheduler, DDPMScheduler) and loaded.is_xl
    expected = pipe.unet_pass(images, XL_PASS)
    got = loaded.unet_pass(images, XL_PASS)
    assert torch.equal(got.features, expected.features)


def test_an_sdxl_embedding_without_its_pooled_part_is_refused(pipe):
    embeds = pipe.encode_prompt("")
    parts = (pipe.unet, pipe.vae, pipe.scheduler)
    with pytest.raises(ValueError, match="pooled_prompt_embeds"):
        DiffSegPipeline(*parts, prompt_embeds=embeds)
    with pytest.raises(ValueError, match=r"pooled_prompt_embeds must have shape \(1, 32\)"):
        DiffSegPipeline(*parts, prompt_embeds=embeds, pooled_prompt_embeds=torch.zeros(1, 7))


@pytest.mark.parametrize("scheduler", [EulerDiscreteScheduler, PNDMScheduler])
def test_any_scheduler_noises_as_ddpm_which_is_diffcuts_ddim(pipe, scheduler):
    # SDXL folders name Euler (add_noise: x + sigma * eps), SD 1.4's PNDM; DiffCut noises with
    # DDIM (trailing spacing). The pipeline keeps the schedule and noises as DDPM = DDIM = PNDM.
    given = scheduler.from_config(sd14_scheduler_config())
    built = DiffSegPipeline(
        pipe.unet, pipe.vae, given, pipe.text_encoder, pipe.tokenizer,
        pipe.text_encoder_2, pipe.tokenizer_2,
    )  # fmt: skip
    assert isinstance(built.scheduler, DDPMScheduler)
    x = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    eps = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    t = torch.tensor([50])
    diffcut = DDIMScheduler.from_config(given.config, timestep_spacing="trailing")
    assert torch.equal(built.scheduler.add_noise(x, eps, t), diffcut.add_noise(x, eps, t))
    if scheduler is PNDMScheduler:  # SD 1.x: the same noising as before
        assert torch.equal(built.scheduler.add_noise(x, eps, t), given.add_noise(x, eps, t))


def test_an_image_gets_the_same_noise_in_any_batch(images):
    # One seeded noise map shared by the batch (DiffCut's draw): an image's noised attention is
    # the same alone, first or second in a batch.
    pipe = DiffSegPipeline.from_tiny(seed=0)
    small = torch.nn.functional.interpolate(images, size=64)
    alone = pipe.attention(small[1:], PassSettings(resolution=64, noise=True, seed=7))
    second = pipe.attention(small, PassSettings(resolution=64, noise=True, seed=7))
    for r in alone:
        torch.testing.assert_close(second[r][1:], alone[r], rtol=0, atol=1e-6)
    other = pipe.attention(small[1:], PassSettings(resolution=64, noise=True, seed=8))
    assert not torch.allclose(other[8], alone[8])


def test_an_upcast_vae_stays_in_float32_the_sd_one_follows_the_dtype():
    xl = DiffSegPipeline.from_tiny(seed=0, layout="sdxl", dtype="bfloat16")
    assert (xl.unet.dtype, xl.vae.dtype, xl.dtype) == (
        torch.bfloat16,
        torch.float32,
        torch.bfloat16,
    )
    latents = xl.encode_images(torch.zeros(1, 3, 64, 64, dtype=torch.bfloat16))
    assert latents.dtype == torch.bfloat16
    sd = DiffSegPipeline.from_tiny(seed=0, dtype="bfloat16")
    assert sd.vae.dtype == torch.bfloat16
    with pytest.raises(ValueError, match="layout must be one of"):
        DiffSegPipeline.from_tiny(layout="sd3")


IDS = ("000000000139", "000000000285")


@pytest.mark.slow
def test_a_tiny_xl_run_scores_three_segmenters_and_lists_diffcut_beside_ssd1b(tmp_path: Path):
    root = tmp_path / "coco"
    fx.make_coco(root, {i: fx.grid_label([0, 91, 181, 255], 40, 48) for i in IDS})
    ledger = tmp_path / "ledger.csv"
    out = run_module(
        "eval", tmp_path, "dataset=coco_stuff27", f"dataset.root={root}", "model=tiny_xl",
        "protocol=diffcut", "protocol.resolution=128", "protocol.score_resolution=32",
        "protocol.compat=true", "segmenter=diffseg", "segmenter.num_points=8",
        "+segmenter@segmenters.kmeans_c=kmeans_c", "+segmenter@segmenters.diffcut=diffcut",
        "num_workers=0", "logger=csv", "n_qualitative=0",
        f"hydra.run.dir={tmp_path / 'run'}", f"paths.ledger={ledger}",
    )  # fmt: skip
    assert out.returncode == 0, out.stderr[-3000:]
    rows = list(csv.DictReader(ledger.open()))
    assert [r["segmenter"] for r in rows] == ["diffseg", "kmeans_c", "diffcut"]
    assert {r["model"] for r in rows} == {"tiny_xl"}
    cut = rows[2]
    cell = paper.target(paper_row(cut))
    assert cell is not None and cell.method.name == "DiffCut (SSD-1B)"
    assert cut["deviations"].split("; ")[:2] == ["model=tiny_xl", "dtype=float32"]
    tables = run_module(
        "eval.report.tables", tmp_path, "--ledger", str(ledger), "--out", str(tmp_path)
    )
    assert tables.returncode == 0, tables.stderr
    listed = tables.stdout.split("Other runs")[-1]
    assert f"`{cut['run_id']}` DiffCut (SSD-1B), COCO-Stuff-27" in listed


def paper_row(row: dict[str, str]) -> dict:
    """A ledger CSV row with its JSON columns parsed, as eval.report.tables reads it."""
    parsed = dict(row)
    for key in ("protocol_settings", "segmenter_settings", "dataset_settings"):
        parsed[key] = json.loads(row[key])
    return parsed


def _compose(tmp_path: Path, monkeypatch, *overrides: str):
    from eval.tools.prepare import compose_config

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("DIFFSEG_HOME", str(tmp_path))
    common = ["dataset=synthetic", "limit=1", "num_workers=0", "logger=csv"]
    return compose_config([*common, *overrides])


def test_merge_settings_are_checked_for_the_loaded_models_grid_before_any_image(
    tmp_path: Path,
) -> None:
    # num_points=16 fits SD 1.x's 16x16 latent at 128 px, not SDXL's 8x8 maps: refused once the
    # model is known, before the loop starts (no progress bar, no record).
    out = run_module(
        "eval", tmp_path, "dataset=synthetic", "model=tiny_xl", "dataset.resolution=128",
        "limit=1", "num_workers=0", "logger=csv", f"hydra.run.dir={tmp_path / 'run'}",
    )  # fmt: skip
    assert out.returncode == 1
    assert "S=8] (anchors per side" in out.stderr and "16 px per position), got 16" in out.stderr
    assert "synthetic:" not in out.stderr
    assert not (tmp_path / "run" / "per_image.jsonl").exists()


def test_an_added_segmenters_error_names_its_key(tmp_path: Path, monkeypatch) -> None:
    import eval.run

    cfg = _compose(
        tmp_path, monkeypatch, "model=tiny", "dataset.resolution=64", "segmenter.num_points=8",
        "+segmenter@segmenters.dc=diffcut", "segmenters.dc.tau=-1",
    )  # fmt: skip
    with pytest.raises(ValueError, match=r"^segmenters\.dc \(segmenter=diffcut\): .*tau"):
        eval.run.evaluate(cfg)


def test_a_model_setting_the_builder_refuses_is_named_without_hydras_wrapping() -> None:
    from eval.models.model import load_model

    cfg = {"_target_": "diffseg.pipeline.DiffSegPipeline.from_tiny", "layout": "sd3"}
    with pytest.raises(ValueError, match=r"^model \(diffseg.*from_tiny\): layout must be one of"):
        load_model(cfg, torch.device("cpu"))
