"""The settings of one UNet pass as one value (:class:`PassSettings`), and how a pass rounds
(:class:`Numerics`).

A pass of a batch depends on its images and on its settings only: the input side `resolution`, the
`timestep` the UNet runs at (and the latents are noised to), the `prompt`, whether to add `noise`
and its `seed`, and the `numerics`. The seed counts only with noise: without, it is normalised to
None, so settings that give the same pass are equal, hash alike (the shared pass's memo) and have
one cache key (`eval.models.attention_cache`).

Numerics (:data:`NUMERICS`), which matter only for a pipeline in float16 or bfloat16:

- ``plain`` (DiffSeg's passes): pixels, latents and noise in the pipeline's dtype (an SDXL VAE
  with `force_upcast` computes in float32 on those pixels), the UNet in the pipeline's dtype with
  DiffSeg's capture processor (`diffseg.attention`) on its self-attention layers.
- ``diffcut``: as DiffCut's `tools/ldm.py` runs its pass (PaulCouairon/DiffCut at aa16df4): pixels
  in float32, the VAE in float32 arithmetic on its weights as loaded (DiffCut's
  `torch.autocast(dtype=torch.float32)` over a float16 VAE: each weight cast up exactly), the
  latents and the noise added to them in float32, and the UNet under `torch.autocast` in the
  pipeline's dtype with diffusers' own attention processors (SDPA): no attention is captured, the
  pass gives DiffCut's features only.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from contextlib import AbstractContextManager, contextmanager, nullcontext
from dataclasses import asdict, dataclass, fields
from numbers import Real
from typing import Any

import torch


@dataclass(frozen=True)
class Numerics:
    """How a pass rounds (module docstring). ``capture``: DiffSeg's capture processor computes
    the self-attention and records it; ``amp``: DiffCut's mixed precision."""

    name: str
    capture: bool
    amp: bool

    def input_dtype(self, dtype: torch.dtype) -> torch.dtype:
        """The dtype of the pixels, latents and noise of a pipeline in ``dtype``."""
        return torch.float32 if self.amp else dtype

    @contextmanager
    def vae_arithmetic(self, vae: torch.nn.Module) -> Iterator[None]:
        """With ``amp``, ``vae`` in float32 inside the block and back in its dtype after it
        (float16 and bfloat16 weights are cast up and back exactly); else nothing."""
        dtype = next(vae.parameters()).dtype
        if not self.amp or dtype == torch.float32:
            yield
            return
        # torch's own `.to`: diffusers' warns on every cast of a model.
        torch.nn.Module.to(vae, dtype=torch.float32)
        try:
            yield
        finally:
            torch.nn.Module.to(vae, dtype=dtype)

    def unet_arithmetic(
        self, device: torch.device, dtype: torch.dtype
    ) -> AbstractContextManager[Any]:
        """With ``amp`` and a half-precision ``dtype``: `torch.autocast` to it on ``device``."""
        if self.amp and dtype != torch.float32:
            return torch.autocast(device.type, dtype=dtype)
        return nullcontext()


PLAIN = Numerics("plain", capture=True, amp=False)
DIFFCUT = Numerics("diffcut", capture=False, amp=True)
NUMERICS = {n.name: n for n in (PLAIN, DIFFCUT)}


def _integer(name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, Real) or int(value) != value:
        raise ValueError(f"{name} must be an integer, got {value!r}")
    return int(value)


@dataclass(frozen=True)
class PassSettings:
    """One UNet pass's settings (module docstring); ``numerics``: a name in :data:`NUMERICS`.

    Normalised on construction: ``timestep`` an int, ``noise`` a bool, ``seed`` an int with noise
    and None without.
    """

    timestep: int = 300
    resolution: int = 512
    prompt: str = ""
    noise: bool = False
    seed: int | None = 0
    numerics: str = PLAIN.name

    def __post_init__(self) -> None:
        if self.numerics not in NUMERICS:
            raise ValueError(f"numerics must be one of {sorted(NUMERICS)}, got {self.numerics!r}")
        if self.noise and self.seed is None:
            raise ValueError("noise=True needs a seed (the noise map is drawn from it)")
        set_ = object.__setattr__  # frozen: normalised here only
        set_(self, "timestep", _integer("timestep", self.timestep))
        set_(self, "noise", bool(self.noise))
        set_(self, "seed", _integer("seed", self.seed) if self.noise else None)

    @property
    def arithmetic(self) -> Numerics:
        """The :class:`Numerics` named by ``numerics``."""
        return NUMERICS[self.numerics]

    def key(self) -> dict[str, Any]:
        """The settings as a JSON-able dict (a cache key's part; ``PassSettings(**key)`` gives
        them back)."""
        return asdict(self)

    @classmethod
    def of(cls, call: Mapping[str, Any], **changes: Any) -> PassSettings:
        """The pass settings among a segmenter's call settings ``call`` (other keys ignored),
        with ``changes``."""
        names = {f.name for f in fields(cls)}
        return cls(**{**{k: v for k, v in call.items() if k in names}, **changes})


# DiffSeg's official pass (timestep 300 at 512 px, the empty prompt, no noise): the default.
DEFAULT_PASS = PassSettings()
