"""Where a Stable Diffusion model comes from: a local folder in diffusers layout, or a hub id
downloaded (or found in the local hub cache) with diffusers, without the parts DiffSeg never uses.

A folder holds `model_index.json`, `unet/`, `vae/`, `scheduler/` and either the text parts
(`text_encoder/` + `tokenizer/`; an SDXL-shaped model, whose `model_index.json` names
`text_encoder_2`, also `text_encoder_2/` + `tokenizer_2/`) or `prompt_embeds.safetensors`: the
empty-prompt embedding (tensor `prompt_embeds`, shape `(1, 77, D)`; SDXL-shaped: also
`pooled_prompt_embeds`, `(1, P)`) of a copy made without the text encoders
(`DiffSegPipeline.save_pretrained(path, prompt_embeds_only=True)` writes one).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from diffusers import DiffusionPipeline
from safetensors.torch import load_file

PROMPT_EMBEDS_FILE = "prompt_embeds.safetensors"
TEXT_PARTS = ("text_encoder", "tokenizer")
XL_TEXT_PARTS = ("text_encoder_2", "tokenizer_2")
EMBEDS = ("prompt_embeds", "pooled_prompt_embeds")
# Parts of Stable Diffusion pipelines that DiffSeg never runs: passed as None, diffusers skips
# downloading them (SD 1.x's safety checker alone is 1.2 GB).
UNUSED_PARTS = ("safety_checker", "feature_extractor", "image_encoder")
FIX = "give from_pretrained the path of a local copy in diffusers layout"


class ModelLoadError(OSError):
    """A model that cannot be loaded; the message names the model and how to get a copy."""


class ModelNotFoundError(ModelLoadError, FileNotFoundError):
    """A local model folder that is missing or incomplete."""


def looks_local(model: str) -> bool:
    """Hub ids are `name` or `org/name`; anything else (absolute, ./, ~, deeper) is a path."""
    return (
        os.path.isabs(model)
        or model.startswith((".", "~"))
        or model.count("/") > 1
        or "\\" in model
    )


def _text_parts(path: Path) -> tuple[str, ...]:
    """The text encoders and tokenizers ``path``'s model_index.json names (SDXL: both pairs)."""
    try:
        index = json.loads((path / "model_index.json").read_text())
    except (OSError, ValueError) as err:
        raise ModelNotFoundError(
            f"{path / 'model_index.json'} cannot be read ({err}); copy the one of the model it "
            "came from, or write the folder again with DiffSegPipeline.save_pretrained"
        ) from err
    xl = (index.get(XL_TEXT_PARTS[0]) or [None])[0] is not None
    return TEXT_PARTS + (XL_TEXT_PARTS if xl else ())


def check_folder(path: Path) -> dict[str, None]:
    """Raise :class:`ModelNotFoundError` unless ``path`` holds a model DiffSeg can load; returns
    the text parts to skip (None: absent, the folder's prompt embedding stands in for them)."""
    if not (path / "model_index.json").is_file():
        raise ModelNotFoundError(
            f"model directory {str(path)!r} has no model_index.json (the list of its parts that "
            "diffusers reads); copy the one of the model it came from, or write the folder again "
            "with DiffSegPipeline.save_pretrained"
        )
    text = _text_parts(path)
    has_embeds = (path / PROMPT_EMBEDS_FILE).is_file()
    required = ["unet", "vae", "scheduler", *([] if has_embeds else text)]
    missing = [name for name in required if not (path / name).is_dir()]
    if missing:
        raise ModelNotFoundError(
            f"model directory {str(path)!r} lacks the subfolder(s) {missing}. A diffusers "
            f"layout needs unet/, vae/, scheduler/ and {' + '.join(p + '/' for p in text)} (or a "
            f"{PROMPT_EMBEDS_FILE} with the empty-prompt embedding); {FIX}"
        )
    return {name: None for name in TEXT_PARTS + XL_TEXT_PARTS if not (path / name).is_dir()}


def model_folder(model: str, revision: str | None) -> Path:
    """The local folder of ``model``: the path itself, or the hub snapshot diffusers downloads
    (or finds in its cache) without :data:`UNUSED_PARTS`.

    Raises :class:`ModelNotFoundError` for a path that is not a directory and
    :class:`ModelLoadError` for a hub model that cannot be fetched.
    """
    path = Path(model).expanduser()
    if path.is_dir():
        return path
    if path.exists() or looks_local(model):
        raise ModelNotFoundError(
            f"model={model!r}: no such directory. Expected a Stable Diffusion model in diffusers "
            f"layout (model_index.json, unet/, vae/, scheduler/, text_encoder/, tokenizer/; SDXL "
            f"and SSD-1B also text_encoder_2/, tokenizer_2/); {FIX}"
        )
    try:
        skip = dict.fromkeys(UNUSED_PARTS)
        return Path(DiffusionPipeline.download(model, revision=revision, **skip))
    except Exception as err:
        raise ModelLoadError(
            f"could not load model={model!r} (revision={revision!r}) from the Hugging Face hub or "
            f"its local cache ({type(err).__name__}: {err}). Without network, download it "
            f"elsewhere (e.g. `hf download {model} --local-dir DIR`), copy DIR here and {FIX}"
        ) from err


def load_prompt_embeds(path: Path) -> dict[str, torch.Tensor]:
    """The empty-prompt embedding stored in ``path`` as the pipeline's keyword arguments:
    `prompt_embeds` `(1, L, D)` and, when stored, `pooled_prompt_embeds` `(1, P)`; {} without a
    file."""
    file = path / PROMPT_EMBEDS_FILE
    if not file.is_file():
        return {}
    tensors = load_file(file)
    if "prompt_embeds" not in tensors or not set(tensors) <= set(EMBEDS):
        raise ValueError(
            f"{file} must hold a tensor named 'prompt_embeds' (1, 77, D) and, for an SDXL-shaped "
            f"model, 'pooled_prompt_embeds' (1, P); found {sorted(tensors)}"
        )
    return tensors
