"""An on-disk cache of each image's UNet pass (per-resolution self-attention and DiffCut's features),
for cheap sweeps of the segmenters' own settings.

DiffSeg's cost is the UNet pass; the merging (``kl_threshold``, ``num_points``, ``refine``), the
K-means baselines and DiffCut's cut (``tau``, ``alpha``) only read what the pass gives. With
``cache.attention=true`` the harness stores, per image, the attention maps ``(r*r, r*r)`` of every
resolution ``r`` and DiffCut's features ``(C, h, w)`` (``diffseg.features``, captured in the same
pass, a few hundred KiB) in ``cache.dtype`` (bfloat16 by default) as one safetensors file, and a
later run with the same model and pass settings reads them instead of running the VAE and UNet.
An entry written without features (before they were stored) is computed again for a segmenter
that reads them.

Key (SHA-256 of a JSON document): the model config (target, name or path, revision, dtype,
seed) and its weights' fingerprint (``eval.models.digests.weights_fingerprint``: the content hash of every
weight file, so weights replaced in place are another key), the device type and compute dtype, the
storage dtype, the image's content (its float32 pixels and shape, so the dataset, its preprocessing
and the image id are all covered), and the pass settings (``diffseg.passes.PassSettings.key``:
``resolution``, ``timestep``, ``prompt``, ``noise``, ``seed`` with noise, ``numerics``). With ``noise=true`` every image of
a batch gets the same seeded noise map (``DiffSegPipeline.capture_attention``), so an entry does not
depend on the batching either.

The stored values are rounded to the storage dtype, and a run with the cache always segments the
rounded values (computed or read), so every run with the cache gives the same numbers; bfloat16
keeps ~3 significant digits and float32's range (``cache.dtype=float32`` keeps the attention and
features exact: the labels then equal an uncached run). float16 is refused: it flushes probabilities below 6e-8 to
zero, a zero makes the KL of that map infinite, and peaked attention then stops merging
(``bench/bench_merge.py`` measures it). Files are written to a temporary name and moved into place
(``os.replace``), so concurrent runs and kills never leave half a file.

Each entry carries its own key and a CRC-32 of its tensors (names, dtypes, shapes and bytes) in
its safetensors metadata (:func:`entry_checksum`). An entry that cannot be read, holds another
key (a file copied or swapped onto another's name) or fails its checksum (flipped or cut bytes)
is reported once per run, naming the cache folder, and computed again and replaced
(:func:`entry_problem`). CRC-32 reads 3.9 GiB/s here (SHA-256: 1.4 GiB/s), ~9 ms of an SD
entry's 34 MiB; ``bench/bench_attention_cache.py`` measures the read with and without it.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
import zlib
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save as safetensors_save

from diffseg.features import feature_shape
from diffseg.passes import PassSettings
from diffseg.segmenter import PassSource, UNetPass
from eval.atomic import atomic_open

CACHE_VERSION = 2  # 2: the weights' fingerprint in the key, key and checksum in the entry
STORAGE_DTYPES = {"bfloat16": torch.bfloat16, "float32": torch.float32}
FEATURES = "features"  # the tensor name of the features in an entry; attention maps are "r<side>"


def image_hash(image: torch.Tensor) -> str:
    """SHA-256 of an image ``(3, H, W)``: its shape and float32 pixel bytes."""
    data = image.detach().to("cpu", torch.float32).contiguous()
    h = hashlib.sha256(repr(tuple(data.shape)).encode())
    h.update(data.numpy().tobytes())
    return h.hexdigest()


def entry_checksum(tensors: Mapping[str, torch.Tensor]) -> str:
    """CRC-32 (hex) of an entry's tensors: each name, dtype, shape and bytes, in name order."""
    crc = 0
    for name in sorted(tensors):
        t = tensors[name].detach().cpu().contiguous()
        crc = zlib.crc32(f"{name}:{t.dtype}:{tuple(t.shape)};".encode(), crc)
        crc = zlib.crc32(t.reshape(-1).view(torch.uint8).numpy(), crc)
    return f"{crc:08x}"


def entry_problem(
    key: str, metadata: Mapping[str, str] | None, tensors: Mapping[str, torch.Tensor]
) -> str | None:
    """Why an entry read under ``key`` cannot be used (None when it can): it holds another
    key, or its tensors fail the checksum stored with them."""
    metadata = metadata or {}
    if metadata.get("key") != key:
        return f"holds the entry of key {metadata.get('key')!r} (copied or swapped?)"
    if metadata.get("checksum") != entry_checksum(tensors):
        return "fails its checksum (corrupted)"
    return None


class AttentionCache:
    """Files ``<directory>/<key[:2]>/<key>.safetensors``, one per image and setting.

    ``context``: everything outside the image and the call that decides the attention (model
    config, device type, compute dtype); ``dtype``: the storage dtype name.
    """

    def __init__(
        self, directory: str | os.PathLike, context: Mapping[str, Any], dtype: str = "bfloat16"
    ) -> None:
        if dtype == "float16":
            raise ValueError(
                "cache.dtype=float16 is not offered: it flushes attention probabilities below "
                "6e-8 to zero, which makes their KL infinite and stops peaked maps from merging; "
                "use cache.dtype=bfloat16 (same size, float32's range) or cache.dtype=float32"
            )
        if dtype not in STORAGE_DTYPES:
            raise ValueError(f"cache.dtype must be one of {sorted(STORAGE_DTYPES)}, got {dtype!r}")
        self.directory = Path(directory).expanduser()
        self.context = {"version": CACHE_VERSION, "dtype": dtype, **context}
        self.dtype = STORAGE_DTYPES[dtype]
        self.hits = 0
        self.misses = 0
        self.bad = 0  # entries found unusable (and computed again)

    def key(self, image_sha: str, settings: Mapping[str, Any]) -> str:
        blob = json.dumps(
            {**self.context, "image": image_sha, **settings}, sort_keys=True, default=str
        )
        return hashlib.sha256(blob.encode()).hexdigest()

    def path(self, key: str) -> Path:
        return self.directory / key[:2] / f"{key}.safetensors"

    def load(self, key: str) -> UNetPass | None:
        """The stored pass of one image: resolution -> ``(N, N)`` and the features ``(C, h, w)``
        (None in entries written without them), in the storage dtype; None when absent or
        unreadable."""
        path = self.path(key)
        if not path.is_file():
            return None
        try:
            with safe_open(path, framework="pt") as f:
                metadata = f.metadata()
                tensors = {name: f.get_tensor(name) for name in f.keys()}  # noqa: SIM118
        except (OSError, SafetensorError) as e:
            problem = f"cannot be read ({e})"
        else:
            problem = entry_problem(key, metadata, tensors)
        if problem:
            self.report_bad(path, problem)
            return None
        features = tensors.pop(FEATURES, None)
        attention = {int(name.removeprefix("r")): t for name, t in tensors.items()}
        return UNetPass(attention, features)

    def save(self, key: str, stored: UNetPass) -> None:
        """Store one image's pass (already in the storage dtype), atomically."""
        tensors = {f"r{r}": t for r, t in stored.attention.items()}
        if stored.features is not None:
            tensors[FEATURES] = stored.features
        tensors = {name: t.detach().cpu().contiguous() for name, t in tensors.items()}
        metadata = {"key": key, "checksum": entry_checksum(tensors)}
        with atomic_open(self.path(key), "wb") as f:
            f.write(safetensors_save(tensors, metadata))

    def report_bad(self, path: Path, problem: str) -> None:
        """Count an unusable entry; the first of a run is named on stderr."""
        self.bad += 1
        if self.bad == 1:
            print(
                f"attention cache {self.directory}: entry {path.relative_to(self.directory)} "
                f"{problem}; computing it again (every bad entry is replaced, counted at the end)",
                file=sys.stderr,
            )

    def summary(self) -> str:
        return (
            f"attention cache {self.directory}: {self.hits} image(s) read, "
            f"{self.misses} computed (UNet run for these only)"
            + (f", {self.bad} bad entries among them replaced" if self.bad else "")
        )


def bytes_per_image(pipeline: Any, resolution: int, dtype: str) -> int:
    """Stored bytes per image: ``sum_r (r*r)**2`` over the UNet's attention resolutions
    (``pipeline.attention_sides``) plus the ``C * h * w`` features, times the item size."""
    itemsize = STORAGE_DTYPES[dtype].itemsize
    c, h, w = feature_shape(pipeline.unet, resolution // pipeline.vae_scale_factor)
    return (sum(r**4 for r in pipeline.attention_sides(resolution)) + c * h * w) * itemsize


class CachedAttentionPipeline(PassSource):
    """A ``DiffSegPipeline`` whose UNet passes come from an :class:`AttentionCache` when stored.

    Only ``unet_pass`` is its own (:class:`diffseg.segmenter.PassSource`); ``__call__`` and
    ``aggregate`` run on the (stored-precision) attention it returns, DiffCut on its features.
    """

    def __init__(self, pipeline: Any, cache: AttentionCache) -> None:
        super().__init__(pipeline)
        self.cache = cache

    def unet_pass(
        self, images: torch.Tensor, settings: PassSettings, features: bool = True
    ) -> UNetPass:
        """The pipeline's ``unet_pass`` read from the cache where stored (float32 on the
        pipeline's device); the UNet runs only for the images that are not (or, when
        ``features``, whose entry has none), and stores both attention and features."""
        if not isinstance(images, torch.Tensor) or images.ndim != 4:
            raise ValueError(
                "the attention cache takes images as a float tensor (B, 3, H, W), got "
                f"{type(images).__name__}"
            )
        self.pipeline.check_resolution(settings.resolution)
        keys = [self.cache.key(image_hash(image), settings.key()) for image in images]
        stored = [self.cache.load(k) for k in keys]
        missing = [
            i for i, s in enumerate(stored) if s is None or (features and s.features is None)
        ]
        if missing:
            computed = self.pipeline.unet_pass(images[missing], settings, features=True)
            # On the CPU, as what `load` reads: one copy for the batch, and one device to stack.
            attention = {r: a.to("cpu", self.cache.dtype) for r, a in computed.attention.items()}
            feats = computed.features.to("cpu", self.cache.dtype)
            for j, i in enumerate(missing):
                stored[i] = UNetPass({r: a[j] for r, a in attention.items()}, feats[j])
                self.cache.save(keys[i], stored[i])
        self.cache.misses += len(missing)
        self.cache.hits += len(images) - len(missing)
        device = self.pipeline.device

        def stack(tensors: list[torch.Tensor]) -> torch.Tensor:
            return torch.stack(tensors).to(device, torch.float32)

        resolutions = sorted(stored[0].attention, reverse=True)
        attention = {r: stack([s.attention[r] for s in stored]) for r in resolutions}
        return UNetPass(attention, stack([s.features for s in stored]) if features else None)


def context(
    model_cfg: Mapping[str, Any], device: torch.device, compute_dtype: torch.dtype
) -> dict[str, Any]:
    """What decides a pass besides the image and the call: the model config, its weights'
    fingerprint (``eval.models.digests.weights_fingerprint``), the device type and compute dtype."""
    from eval.models.digests import weights_fingerprint

    return {
        "model": dict(model_cfg),
        "weights": weights_fingerprint(model_cfg),
        "device_type": device.type,
        "compute_dtype": str(compute_dtype),
    }


def from_config(
    pipeline: Any,
    cache_cfg: Mapping[str, Any],
    model_cfg: Mapping[str, Any],
    device: torch.device,
    resolution: int,
    n_images: int,
) -> CachedAttentionPipeline:
    """The harness' wrapper: ``cache_cfg`` is ``cfg.cache`` (``dir``, ``dtype``), ``model_cfg`` the
    resolved ``cfg.model``. Prints the size estimate for ``n_images`` before the run starts."""
    dtype = cache_cfg.get("dtype", "bfloat16")
    cache = AttentionCache(cache_cfg["dir"], context(model_cfg, device, pipeline.dtype), dtype)
    per_image = bytes_per_image(pipeline, resolution, dtype)
    print(
        f"attention cache: {per_image / 2**20:.1f} MiB per image ({dtype}) x {n_images} images "
        f"= {per_image * n_images / 2**30:.2f} GiB at most, in {cache.directory}"
    )
    return CachedAttentionPipeline(pipeline, cache)
