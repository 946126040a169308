"""Makes ``tests/data/jpeg_decoded.npz``: a few small JPEGs and their pixels as decoded by the
decoders the published pipelines used, so that tests compare with those decoders themselves.

- TensorFlow's ``tf.io.decode_jpeg`` with its defaults (DiffSeg's official data pipeline);
- torchvision's ``torchvision.io.read_image(path, ImageReadMode.RGB)`` (DiffCut's
  ``dataloader/iterator.py``), i.e. ``torchvision.io.decode_jpeg``.

Neither is a dependency of this project: each step runs once, in a throwaway virtual environment
outside the repository, and adds its arrays to the file (the JPEG bytes are stored too, so the
test decodes exactly the bytes the decoders saw)::

    python -m venv /tmp/tfvenv && /tmp/tfvenv/bin/pip install tensorflow-cpu pillow numpy
    /tmp/tfvenv/bin/python tests/data/make_jpeg_decoded.py encode
    /tmp/tfvenv/bin/python tests/data/make_jpeg_decoded.py tf
    python -m venv /tmp/tvvenv && /tmp/tvvenv/bin/pip install torch==2.14.1 torchvision==0.29.1
    /tmp/tvvenv/bin/python tests/data/make_jpeg_decoded.py torchvision

Keys: ``NAME.jpg`` (the bytes, uint8), ``NAME.tf`` and ``NAME.torchvision`` (uint8 ``(H, W, 3)``),
``versions`` (the decoders' versions, text).
"""

from __future__ import annotations

import io
import sys
import tempfile
from pathlib import Path

import numpy as np

OUT = Path(__file__).with_name("jpeg_decoded.npz")
# name -> (height, width, Pillow quality, chroma subsampling 0: 4:4:4, 1: 4:2:2, 2: 4:2:0, mode)
IMAGES = {
    "q85_420": (24, 40, 85, 2, "RGB"),
    "q95_444": (17, 23, 95, 0, "RGB"),
    "q75_422_odd": (31, 13, 75, 1, "RGB"),
    "q90_grey": (20, 18, 90, 0, "L"),  # decoded to 3 equal channels
}


def picture(h: int, w: int, seed: int) -> np.ndarray:
    """A textured uint8 ``(h, w, 3)`` picture: smooth ramps plus noise, so that the decoders'
    DCT and upsampling differences show on many pixels."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:h, 0:w]
    ramps = np.stack([x * 7.0, y * 5.0, (x + y) * 3.0], -1)
    return np.clip(ramps + rng.normal(0, 25, (h, w, 3)) + 40, 0, 255).astype(np.uint8)


def load() -> dict[str, np.ndarray]:
    return dict(np.load(OUT)) if OUT.exists() else {}


def save(arrays: dict[str, np.ndarray]) -> None:
    np.savez_compressed(OUT, **arrays)


def encode() -> None:
    from PIL import Image

    arrays = {}
    for seed, (name, (h, w, quality, subsampling, mode)) in enumerate(IMAGES.items()):
        image = Image.fromarray(picture(h, w, seed)).convert(mode)
        buffer = io.BytesIO()
        image.save(buffer, "JPEG", quality=quality, subsampling=subsampling)
        arrays[f"{name}.jpg"] = np.frombuffer(buffer.getvalue(), dtype=np.uint8)
    arrays["versions"] = np.array("")
    save(arrays)


def decode(decoder: str) -> None:
    arrays = load()
    for name in IMAGES:
        data = arrays[f"{name}.jpg"].tobytes()
        if decoder == "tf":
            import tensorflow as tf

            pixels = tf.io.decode_jpeg(data, channels=3).numpy()
            version = f"tensorflow {tf.__version__}"
        else:
            import torchvision
            from torchvision.io import ImageReadMode, read_image

            with tempfile.TemporaryDirectory() as folder:
                path = Path(folder) / f"{name}.jpg"
                path.write_bytes(data)
                pixels = read_image(str(path), ImageReadMode.RGB).permute(1, 2, 0).numpy()
            version = f"torchvision {torchvision.__version__}"
        arrays[f"{name}.{decoder}"] = np.ascontiguousarray(pixels, dtype=np.uint8)
    versions = [
        v for v in str(arrays["versions"]).split("; ") if v and not v.startswith(version.split()[0])
    ]
    arrays["versions"] = np.array("; ".join([*versions, version]))
    save(arrays)


if __name__ == "__main__":
    step = sys.argv[1] if len(sys.argv) > 1 else ""
    if step == "encode":
        encode()
    elif step in ("tf", "torchvision"):
        decode(step)
    else:
        raise SystemExit("usage: make_jpeg_decoded.py encode|tf|torchvision")
