"""``python -m eval.tools.segment IMAGE [IMAGE or FOLDER ...] [model=tiny] [segmenter.kl_threshold=...]``

Segments any images with DiffSeg and writes, per image, into the run directory
(``outputs/segment/<time>_<model>/`` unless ``hydra.run.dir=...``):

- ``<name>_labels.png``: the label map (pixel value = segment id, 0..K-1), an 8-bit palette PNG
  (colours for viewers, ids for ``np.array(Image.open(...))``) when K <= 256, else 16-bit grey;
- ``<name>_segments.png``: the image beside the segments overlaid on it, with their boundaries;

and prints the number of segments of each image. How an image reaches the model's square input
(``fit=``):

- ``pad`` (default): the whole image, at its own size. It is padded to a square by repeating its
  edge pixels (centred), resized to ``resolution``; the labels are resized back (nearest) to the
  padded square, the padding cut off, and the ids renumbered 0..K-1 (a segment only in the
  padding is dropped). Every pixel is labelled; a very elongated image is seen at a low resolution
  across its short side.
- ``crop``: the central square resized to ``resolution``, exactly as the benchmark datasets are
  (``eval.datasets.base``, the official protocol); the label map is ``resolution`` square.

Every input is read before the model loads. A file named on the command line that is not a
readable image stops the command (exit status 1); an unreadable image found in a folder is
skipped with a warning and listed at the end, and the command succeeds if any image was segmented
(exit status 1 only when none could be read).
"""

from __future__ import annotations

import shutil
import sys
from collections.abc import Collection
from pathlib import Path
from typing import TYPE_CHECKING, Any

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf

from eval import CONFIG_DIR
from eval.jobs import fail

if TYPE_CHECKING:
    import numpy as np
    import torch

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff")
# Hydra command-line flags that take the next argument as their value.
_FLAGS_WITH_VALUE = {
    "--cfg", "-c", "--package", "-p", "--config-path", "-cp", "--config-name", "-cn",
    "--config-dir", "-cd", "--experimental-rerun",
}  # fmt: skip

_images: list[Path] = []
_named: set[Path] = set()


def split_argv(argv: list[str]) -> tuple[list[Path], list[str]]:
    """Image paths (files or folders) versus Hydra arguments (``key=value`` overrides, flags).

    Hydra would read every argument as an override, so the paths are taken out first: an argument
    that exists on disk is a path; one with ``=`` or a leading ``-`` goes to Hydra (with the value
    of a flag that takes one); anything else is a path that does not exist.
    """
    paths: list[Path] = []
    hydra_args: list[str] = []
    i = 0
    while i < len(argv):
        arg = argv[i]
        if arg.startswith("-"):
            take = 2 if arg in _FLAGS_WITH_VALUE else 1
            hydra_args += argv[i : i + take]
            i += take
            continue
        if Path(arg).exists():
            paths.append(Path(arg))
        elif "=" in arg:
            hydra_args.append(arg)
        else:
            raise FileNotFoundError(f"no such image or folder: {arg}")
        i += 1
    return paths, hydra_args


def list_images(paths: list[Path]) -> list[Path]:
    """The files among ``paths`` and the images directly inside its folders (sorted)."""
    images = []
    for path in paths:
        if path.is_dir():
            found = sorted(p for p in path.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
            if not found:
                raise FileNotFoundError(
                    f"folder {path} holds no images (looked for {', '.join(IMAGE_SUFFIXES)})"
                )
            images += found
        else:
            images.append(path)
    return images


def group_options(*groups: str) -> str:
    """``"group: option, option"`` lines of the config groups under ``conf/`` (for ``--help``)."""
    conf = Path(CONFIG_DIR)
    return "\n".join(
        f"{g}: {', '.join(sorted(p.stem for p in (conf / g).glob('*.yaml')))}" for g in groups
    )


def readable_images(images: list[Path], named: Collection[Path]) -> tuple[list[Path], list[str]]:
    """The ``images`` that decode, and a message for each skipped one (checked before any model
    loads, so a bad input costs no model load).

    Raises:
        DataFileError: one of the ``named`` files (given on the command line, not found in a
            folder) does not decode (all of them named), or no image does.
    """
    from eval.datasets.base import DataFileError, read_image

    good, bad_named, skipped = [], [], []
    for path in images:
        try:
            read_image(path)
            good.append(path)
        except DataFileError as e:
            (bad_named if path in named else skipped).append(str(e))
    if bad_named:
        raise DataFileError("; ".join(bad_named) + " (give image files or folders of images)")
    if not good:
        raise DataFileError(f"none of the {len(images)} images could be read: {'; '.join(skipped)}")
    for message in skipped:
        print(f"warning: {message}; skipped", file=sys.stderr)
    return good, skipped


FITS = ("pad", "crop")


def pad_to_square(image: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int]]:
    """Float ``(3, H, W)`` -> ``(3, S, S)`` with ``S = max(H, W)``, the image centred and its edge
    pixels repeated around it; and ``(top, left)``, where the image lies in the square."""
    import torch.nn.functional as F

    h, w = image.shape[-2:]
    side = max(h, w)
    top, left = (side - h) // 2, (side - w) // 2
    pad = (left, side - w - left, top, side - h - top)
    return F.pad(image[None], pad, mode="replicate")[0], (top, left)


def labels_for_image(
    labels: torch.Tensor, side: int, corner: tuple[int, int], size: tuple[int, int]
) -> torch.Tensor:
    """Model labels ``(R, R)`` of a padded square back onto the image: resized (nearest) to the
    square's ``side``, the ``size = (H, W)`` image at ``corner = (top, left)`` cut out, its ids
    renumbered 0..K-1 in order. Returns int64 ``(H, W)``."""
    import torch

    from diffseg.preprocess import resize_label

    (top, left), (h, w) = corner, size
    square = resize_label(labels.long(), side)
    ids = square[top : top + h, left : left + w]
    return torch.unique(ids, return_inverse=True)[1]


def model_input(image: np.ndarray, resolution: int, fit: str) -> tuple[torch.Tensor, Any]:
    """uint8 ``(H, W, 3)`` -> float ``(3, R, R)`` for the model and what maps its labels back
    (``None`` for ``crop``: the labels stay ``R`` square). See the module's ``fit=``."""
    from diffseg.preprocess import channels_first, preprocess_image, resize_image

    if fit == "crop":
        return preprocess_image(image, resolution), None
    square, corner = pad_to_square(channels_first(image).float() / 255.0)
    back = (square.shape[-1], corner, image.shape[:2])
    return resize_image(square, resolution).clamp_(0.0, 1.0), back


def segment_images(
    cfg: DictConfig, images: list[Path], named: Collection[Path] = ()
) -> list[tuple[Path, int]]:
    """Segment ``images`` one by one; write their label maps and pictures to the run directory.
    Unreadable images are skipped with a warning, except the ``named`` ones, which are an error
    (see :func:`readable_images`).

    Returns:
        ``(image path, number of segments)`` per segmented image.
    """
    import torch
    from omegaconf import OmegaConf

    from eval.datasets.base import read_image
    from eval.models.model import load_model
    from eval.results import visualize
    from eval.runtime import resolve_device, seed_everything
    from eval.segmenters import GT, segment_batch, segmenter_call

    if cfg.fit not in FITS:
        raise ValueError(
            f"fit={cfg.fit}: use fit=pad (the whole image, at its size) or fit=crop (the central "
            "square, as the benchmarks; conf/segment.yaml)"
        )
    images, skipped = readable_images(images, named)
    out_dir = Path(HydraConfig.get().runtime.output_dir)
    device = resolve_device(cfg.device)
    seed_everything(cfg.seed)
    call = segmenter_call(
        OmegaConf.to_container(cfg.segmenter, resolve=True), cfg.resolution, cfg.seed
    )
    if call.get("n_clusters") == GT:
        raise ValueError(
            f"segmenter={call['name']} takes its cluster count from ground truth, which a plain "
            "image does not have; use segmenter=kmeans_c or segmenter.n_clusters=N"
        )
    pipeline = load_model(cfg.model, device)

    results, used = [], set()
    for path in images:
        pixels = read_image(path)
        image, back = model_input(pixels, cfg.resolution, cfg.fit)
        name = path.stem
        while name in used:  # same file name in two folders
            name += "_"
        used.add(name)
        labels = segment_batch(pipeline, image[None], [{"id": name}], call)[0].cpu()
        if back is not None:
            labels = labels_for_image(labels, *back)
        kind = visualize.save_label_png(labels, out_dir / f"{name}_labels.png")
        shown = visualize.to_uint8_image(image) if back is None else pixels
        visualize.save_segmentation(shown, labels, out_dir / f"{name}_segments.png")
        n = int(torch.unique(labels).numel())
        print(
            f"{path}: {visualize.segments_text(n)} -> {name}_labels.png ({kind}), "
            f"{name}_segments.png"
        )
        results.append((path, n))
    print(f"Outputs in {out_dir}")
    if skipped:
        print(f"Skipped {len(skipped)} unreadable file(s):", *skipped, sep="\n  ", file=sys.stderr)
    return results


@hydra.main(config_path=CONFIG_DIR, config_name="segment", version_base="1.3")
def _hydra_main(cfg: DictConfig) -> None:
    try:
        segment_images(cfg, _images, _named)
    except Exception as e:
        # A failure before any image was written (no model, a bad setting) leaves no folder
        # holding Hydra's records alone (.hydra/, the job's log); pictures written are kept.
        hydra_cfg = HydraConfig.get()
        out_dir = Path(hydra_cfg.runtime.output_dir)
        own = {".hydra", f"{hydra_cfg.job.name}.log"}
        if out_dir.is_dir() and all(p.name in own for p in out_dir.iterdir()):
            shutil.rmtree(out_dir, ignore_errors=True)
        fail(e)


def main() -> None:
    try:
        paths, hydra_args = split_argv(sys.argv[1:])
        images = list_images(paths)
    except FileNotFoundError as e:
        fail(e)
    informational = any(
        a in ("--cfg", "-c", "--help", "-h", "--hydra-help", "--info") for a in hydra_args
    )
    if not images and not informational:
        print(__doc__, file=sys.stderr)
        fail(ValueError("give at least one image file or folder"))
    _images[:] = images
    _named.update(p for p in paths if not p.is_dir())
    # conf/segment.yaml's help template lists the groups it composes through this resolver.
    OmegaConf.register_new_resolver("segment_groups", group_options, replace=True)
    sys.argv = [sys.argv[0], *hydra_args]
    _hydra_main()


if __name__ == "__main__":
    main()
