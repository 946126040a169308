"""The harness's model: ``cfg.model`` instantiated on the run's device.

A model that cannot be loaded (``diffseg.loading.ModelLoadError``: no such folder, no network)
stops the run with the library's message plus the command-line fix, the Hydra override that
points the config at a local copy.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import hydra
import torch
from hydra.errors import InstantiationException

from diffseg.loading import ModelLoadError

HYDRA_FIX = (
    "on the command line: the Hydra override `model.model=/path/to/local/copy` (to try the "
    "harness offline meanwhile: `model=tiny_trained`, the toy model shipped in models/)"
)


def load_model(model_cfg: Mapping[str, Any], device: torch.device) -> Any:
    """``cfg.model`` (``_target_`` and its arguments) instantiated with ``device``.

    Raises:
        ModelLoadError: the model cannot be loaded; the message ends with :data:`HYDRA_FIX`.
        ValueError: a model setting the builder refuses (``model.KEY: message``), without
            Hydra's wrapping.
    """
    try:
        return hydra.utils.instantiate(model_cfg, device=device)
    except InstantiationException as e:
        cause = e.__cause__
        if isinstance(cause, ModelLoadError):
            raise type(cause)(f"{cause}; {HYDRA_FIX}") from cause
        if isinstance(cause, ValueError):
            raise ValueError(f"model ({model_cfg.get('_target_')}): {cause}") from cause
        raise
