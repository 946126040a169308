"""Procedural scenes with exact masks: the offline demo's dataset (no files, no download).

Each image mixes 3 of ``n_class`` region types.  Region shapes come from smooth random fields (a
few low-frequency sinusoids per region type; each pixel belongs to the type whose field is
largest), so boundaries are smooth curves.  Each type has its own colour and an oriented stripe
texture of its own frequency, so both colour and texture separate the regions; optional Gaussian
pixel noise makes it harder.  Item ``i`` depends only on ``(seed, i)``.

``hard=True`` (off by default) draws harder scenes, where colour alone does not separate the
regions, so that pixel K-means is a weak baseline: the regions of an image share a palette of two
colours (regions 1 and 3 get the same one), they differ by a strong stripe texture of their own
scale and orientation, the last region is an object (a star-shaped blob) over the stuff-like field
regions, and a shading gradient crosses the whole image.  Masks stay exact.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass

import torch
from torch.utils.data import Dataset

from eval.datasets.base import check_on_error
from eval.datasets.registry import register
from eval.schema import DatasetSettings

CLASS_NAMES = ("sky", "grass", "water", "sand", "rock", "snow", "forest", "road")
# Base colours (RGB in [0, 1]) and stripe (period in pixels at 512, angle in degrees).
_COLOURS = (
    (0.45, 0.65, 0.95),
    (0.25, 0.65, 0.20),
    (0.10, 0.30, 0.60),
    (0.90, 0.80, 0.50),
    (0.45, 0.42, 0.40),
    (0.95, 0.95, 0.97),
    (0.05, 0.30, 0.10),
    (0.20, 0.20, 0.22),
)
_STRIPES = ((64, 0), (9, 80), (24, 10), (14, 135), (6, 45), (40, 100), (11, 160), (18, 60))
# Hard scenes: stripes coarse enough to survive 128 px (period >= 4 px there), in pairs that
# differ by orientation alone or by scale alone; contrast and shading amplitude as fractions.
_HARD_STRIPES = ((32, 0), (32, 90), (64, 45), (16, 45), (48, 135), (24, 0), (64, 90), (20, 135))
_HARD_CONTRAST = 0.4
_HARD_SHADING = 0.3


class SyntheticScenes(Dataset):
    """``length`` scenes of ``resolution`` x ``resolution``; items as the file datasets:
    ``image`` float ``(3, R, R)`` in [0, 1], ``label`` int64 ``(R, R)`` in ``0..n_class-1``,
    ``id``.  ``regions`` region types per image (at most ``n_class``); ``hard``: see the module
    docstring (``texture`` is then unused)."""

    def __init__(  # noqa: PLR0913 (conf/dataset/synthetic.yaml's keys)
        self,
        length: int = 8,
        resolution: int = 512,
        seed: int = 0,
        n_class: int = 5,
        regions: int = 3,
        noise: float = 0.0,
        texture: float = 0.15,
        hard: bool = False,
    ) -> None:
        if not 2 <= n_class <= len(CLASS_NAMES):
            raise ValueError(f"n_class must be in 2..{len(CLASS_NAMES)}, got {n_class}")
        if not 1 <= regions <= n_class:
            raise ValueError(f"regions must be in 1..n_class={n_class}, got {regions}")
        if length < 0 or resolution < 8:
            raise ValueError(f"need length >= 0 and resolution >= 8, got {length}, {resolution}")
        self.length, self.resolution, self.seed = length, resolution, seed
        if hard and regions < 2:
            raise ValueError(f"hard scenes need regions >= 2 (stuff + an object), got {regions}")
        self.regions, self.noise, self.texture, self.hard = regions, noise, texture, hard
        self.class_names = list(CLASS_NAMES[:n_class])
        self.n_class = n_class
        self.skipped = 0

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index: int) -> dict:
        if not 0 <= index < self.length:
            raise IndexError(f"index {index} out of range for {self.length} synthetic scenes")
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + index)
        r = self.resolution
        classes = torch.randperm(self.n_class, generator=g)[: self.regions]
        # Coordinates in [0, 1) at pixel centres so the scene is the same at every resolution.
        y, x = torch.meshgrid(
            (torch.arange(r) + 0.5) / r, (torch.arange(r) + 0.5) / r, indexing="ij"
        )
        stuff = classes[:-1] if self.hard else classes
        label = stuff[torch.stack([_field(x, y, g) for _ in stuff]).argmax(0)]
        if self.hard:
            label = torch.where(_blob(x, y, g), classes[-1], label)
            image = _hard_image(x, y, label, classes, g)
        else:
            image = _image(x, y, label, classes, self.texture)
        if self.noise > 0:
            image = image + self.noise * torch.randn(image.shape, generator=g)
        return {
            "image": image.clamp(0.0, 1.0),
            "label": label.long(),
            "id": f"synthetic-{'hard-' if self.hard else ''}{self.seed}-{index:05d}",
        }


def _field(x: torch.Tensor, y: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """A smooth random field ``(R, R)``: three low-frequency sinusoids and a random offset."""
    freq = 0.5 + 1.5 * torch.rand(3, 2, generator=g)
    phase = 2 * math.pi * torch.rand(3, generator=g)
    field = sum(
        torch.sin(2 * math.pi * (freq[k, 0] * x + freq[k, 1] * y) + phase[k]) for k in range(3)
    )
    return field + 0.5 * torch.randn((), generator=g)


def _stripes(x: torch.Tensor, y: torch.Tensor, period: float, angle: float) -> torch.Tensor:
    """A sine of ``period`` (pixels at 512) across direction ``angle`` (degrees), ``(R, R)``."""
    theta = math.radians(angle)
    u = (x * math.cos(theta) + y * math.sin(theta)) * 512 / period
    return torch.sin(2 * math.pi * u)


def _image(
    x: torch.Tensor, y: torch.Tensor, label: torch.Tensor, classes: torch.Tensor, texture: float
) -> torch.Tensor:
    """The default scenes: each class its own colour and faint stripes, ``(3, R, R)``."""
    image = torch.empty(3, *label.shape)
    for c in classes.tolist():
        shade = 1.0 + texture * _stripes(x, y, *_STRIPES[c])
        colour = torch.tensor(_COLOURS[c])[:, None, None] * shade
        image = torch.where(label == c, colour, image)
    return image


def _blob(x: torch.Tensor, y: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """An object's mask ``(R, R)``: a star-shaped blob, its radius a wavy function of angle."""
    centre = 0.3 + 0.4 * torch.rand(2, generator=g)
    radius = 0.15 + 0.12 * torch.rand((), generator=g)
    wobble = 0.25 * torch.rand(2, generator=g)
    phase = 2 * math.pi * torch.rand(2, generator=g)
    dx, dy = x - centre[0], y - centre[1]
    angle = torch.atan2(dy, dx)
    edge = radius * (
        1
        + wobble[0] * torch.sin(2 * angle + phase[0])
        + wobble[1] * torch.sin(3 * angle + phase[1])
    )
    return dx**2 + dy**2 < edge**2


def _hard_image(
    x: torch.Tensor,
    y: torch.Tensor,
    label: torch.Tensor,
    classes: torch.Tensor,
    g: torch.Generator,
) -> torch.Tensor:
    """Hard scenes: two shared colours, strong stripes per class, a global shading gradient."""
    palette = torch.tensor(_COLOURS)[torch.randperm(len(_COLOURS), generator=g)[:2]]
    direction = 2 * math.pi * torch.rand((), generator=g)
    shading = 1.0 + _HARD_SHADING * 2 * (
        (x - 0.5) * torch.cos(direction) + (y - 0.5) * torch.sin(direction)
    )
    image = torch.empty(3, *label.shape)
    for i, c in enumerate(classes.tolist()):
        shade = 1.0 + _HARD_CONTRAST * _stripes(x, y, *_HARD_STRIPES[c])
        colour = palette[i % 2][:, None, None] * shade
        image = torch.where(label == c, colour, image)
    return image * shading


@dataclass
class SyntheticSettings(DatasetSettings):
    """The scenes' options (:class:`SyntheticScenes`). ``keep_size`` and ``jpeg_decoder``, which
    ``protocol=diffcut`` sets on every dataset, are accepted and unused: the scenes are generated
    square at ``resolution`` and never encoded."""

    length: int = 8
    seed: int = 0
    n_class: int = 5
    regions: int = 3
    noise: float = 0.0
    texture: float = 0.15
    hard: bool = False
    keep_size: bool = False
    jpeg_decoder: str = "tf"


@register("synthetic", SyntheticSettings, files=False)
def synthetic(
    root: str | os.PathLike | None = None,
    split: str | None = "val",
    resolution: int = 512,
    on_error: str = "raise",
    keep_size: bool = False,
    jpeg_decoder: str = "tf",
    **options,
) -> SyntheticScenes:
    """The synthetic dataset; ``root``, ``split``, ``keep_size`` and ``jpeg_decoder`` are accepted
    for a uniform call and unused."""
    check_on_error(on_error)  # nothing can fail; accepted for uniformity
    return SyntheticScenes(resolution=resolution, **options)
