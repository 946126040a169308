"""Images to model input, and the benchmark datasets' crop and resize: one implementation of each.

As the official code (google/diffseg, ``process_image`` of the benchmark data loaders, TF2's
``tf.image.resize``):

- crop (:func:`center_crop`): the central square of side ``c = min(H, W)`` at offsets
  ``((H - c) // 2, (W - c) // 2)``;
- image resize (:func:`resize_image`): bilinear with half-pixel centres and no antialiasing
  (torch ``interpolate(mode="bilinear", align_corners=False)``);
- label resize (:func:`resize_label`): nearest neighbour with half-pixel centres (TF2 takes source
  index ``floor((i + 0.5) * in / out)``: torch's ``nearest-exact``, not ``nearest``);
- model input (:func:`to_model_input`): ``[0, 1]`` scaled to ``[-1, 1]`` (the official
  ``x / 127.5 - 1`` on 8-bit values).

Dataset items (:func:`preprocess_image`) carry the cropped, resized image in ``[0, 1]``; the
pipeline crops and resizes again only what is not square at its resolution already.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

OFFSET_ROUNDING = ("floor", "round")


def center_crop(x: torch.Tensor, side: int | None = None, rounding: str = "floor") -> torch.Tensor:
    """The central ``side x side`` square of ``(..., H, W)`` (a view; default side ``min(H, W)``).

    ``rounding``: offsets ``(H - side) // 2`` (``floor``, the official crop) or
    ``round((H - side) / 2)`` with Python's round, half to even (``round``: torchvision's
    ``CenterCrop``, DiffCut's).
    """
    h, w = x.shape[-2:]
    c = min(h, w) if side is None else side
    if rounding == "floor":
        top, left = (h - c) // 2, (w - c) // 2
    elif rounding == "round":
        top, left = round((h - c) / 2), round((w - c) / 2)
    else:
        raise ValueError(f"rounding must be one of {OFFSET_ROUNDING}, got {rounding!r}")
    return x[..., top : top + c, left : left + c]


def resize_image(images: torch.Tensor, size: int, antialias: bool = False) -> torch.Tensor:
    """Bilinear resize of float ``(3, H, W)`` or ``(B, 3, H, W)`` to ``size x size``, half-pixel
    centres; returned as it is when already that size (the resize would be the identity)."""
    if tuple(images.shape[-2:]) == (size, size):
        return images
    batch = images if images.ndim == 4 else images[None]
    out = F.interpolate(
        batch, size=(size, size), mode="bilinear", align_corners=False, antialias=antialias
    )
    return out if images.ndim == 4 else out[0]


def resize_label(
    label: torch.Tensor, size: int | Sequence[int], mode: str = "nearest-exact"
) -> torch.Tensor:
    """Nearest resize of int64 ids ``(H, W)`` to ``size`` (a side or ``(H', W')``); returned as it
    is when already that size.

    ``mode``: ``nearest-exact`` (half-pixel centres, TF2's nearest: the official labels) or
    ``nearest`` (source pixel ``floor(i * H / H')``, DiffCut's rule for its labels).
    """
    shape = (size, size) if isinstance(size, int) else tuple(size)
    if tuple(label.shape) == shape:
        return label
    # Class ids and -1 are exact in float32, so the round trip through float is lossless.
    out = F.interpolate(label[None, None].float(), size=shape, mode=mode)
    return out[0, 0].long()


def channels_first(image: np.ndarray) -> torch.Tensor:
    """uint8 ``(H, W, 3)`` -> ``(3, H, W)``, a view of the (contiguous) pixels."""
    return torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1)


def preprocess_image(image: np.ndarray, resolution: int, antialias: bool = False) -> torch.Tensor:
    """uint8 ``(H, W, 3)`` -> float ``(3, R, R)`` in [0, 1]: centre square, then bilinear resize.
    The crop comes first, on the uint8 pixels, so only the kept ones are converted to float."""
    square = center_crop(channels_first(image)).float() / 255.0
    return resize_image(square, resolution, antialias).clamp_(0.0, 1.0)


def _checked_tensor(images: torch.Tensor) -> torch.Tensor:
    if images.ndim != 4 or images.shape[1] != 3 or not images.is_floating_point():
        raise ValueError(
            f"images must be a float tensor (B, 3, H, W) in [0, 1], got "
            f"{images.dtype} {tuple(images.shape)} (divide uint8 images by 255)"
        )
    lo, hi = torch.aminmax(images) if images.numel() else (0.0, 1.0)
    if lo < 0 or hi > 1:
        raise ValueError(f"images must be in [0, 1], got values in [{lo:.3g}, {hi:.3g}]")
    return images


def _pil_square(image: Image.Image, resolution: int, device: torch.device) -> torch.Tensor:
    # np.array: a writable copy (torch refuses to share PIL's read-only buffer silently).
    square = center_crop(channels_first(np.array(image.convert("RGB")))).float() / 255.0
    return resize_image(square[None].to(device), resolution)


def to_model_input(
    images: torch.Tensor | Sequence[Image.Image],
    resolution: int,
    device: torch.device,
    dtype: torch.dtype,
) -> torch.Tensor:
    """Images -> ``(B, 3, resolution, resolution)`` in [-1, 1] on ``device`` in ``dtype``.

    ``images``: a float tensor ``(B, 3, H, W)`` in [0, 1], or PIL images (each its own size);
    centre square, bilinear resize, scaled to [-1, 1] (the crop and resize in float32).
    """
    if isinstance(images, Image.Image):
        images = [images]
    if isinstance(images, torch.Tensor):
        # non_blocking: a pinned batch (the harness' loader) is copied while the host goes on.
        batch = _checked_tensor(images).to(device, torch.float32, non_blocking=True)
        batch = resize_image(center_crop(batch), resolution)
    elif (
        isinstance(images, Sequence) and images and all(isinstance(i, Image.Image) for i in images)
    ):
        batch = torch.cat([_pil_square(i, resolution, device) for i in images])
    else:
        raise ValueError(
            "images must be a float tensor (B, 3, H, W) in [0, 1] or a non-empty list of PIL "
            f"images, got {type(images).__name__}"
        )
    return (batch * 2 - 1).to(dtype)
