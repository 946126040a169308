"""Loaders checked pixel by pixel on fixtures in each dataset's real on-disk format."""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import pytest
import simplejpeg
import torch
from omegaconf import OmegaConf
from PIL import Image

from eval.datasets import DataFileError, SplitSizeWarning, collate, get_dataset
from eval.datasets.base import decode_image, read_image
from eval.datasets.classes import (
    COCO_OBJECT_CLASSES,
    COCO_STUFF27_CLASSES,
    COCO_STUFF_FINE,
    coco_fine_to_coarse,
)
from eval.datasets.coco import object81_lut, stuff27_lut
from tests import fixtures as fx

pytestmark = pytest.mark.filterwarnings("ignore::eval.datasets.SplitSizeWarning")

# STEGO data.py `Coco.fine_to_coarse` (and PiCIE's fine_to_coarse_dict.pickle), written as runs
# (first fine id, last fine id, coarse class) of the published table.
STEGO_RUNS = [(0, 0, 9), (1, 8, 11), (9, 14, 8), (15, 24, 7), (25, 32, 6), (33, 42, 10),
              (43, 50, 5), (51, 60, 2), (61, 70, 3), (71, 76, 0), (77, 82, 1), (83, 90, 4)]  # fmt: skip
STEGO_STUFF = [17, 17, 22, 20, 20, 22, 15, 25, 16, 13, 12, 12, 17, 17, 23, 15, 15, 17, 15, 21,
               15, 25, 13, 13, 13, 13, 13, 22, 26, 14, 14, 15, 22, 21, 21, 24, 20, 22, 15, 17,
               16, 15, 22, 24, 21, 17, 25, 16, 21, 17, 22, 16, 21, 21, 25, 21, 26, 21, 24, 20,
               17, 14, 21, 26, 15, 23, 20, 21, 24, 15, 24, 22, 25, 15, 20, 17, 17, 22, 14, 18,
               18, 18, 18, 18, 18, 18, 26, 26, 19, 19, 24]  # fmt: skip
STEGO = {f: c for a, b, c in STEGO_RUNS for f in range(a, b + 1)}
STEGO.update({91 + k: c for k, c in enumerate(STEGO_STUFF)})
UNUSED = {11, 25, 28, 29, 44, 65, 67, 68, 70, 82, 90}  # COCO ids 12 26 29 30 45 66 68 69 71 83 91


def tf_nearest(label: np.ndarray, size: int) -> np.ndarray:
    """TF2 nearest resize (half-pixel centres): source index floor((i + 0.5) * in / out)."""
    h, w = label.shape
    ys = np.minimum(np.floor((np.arange(size) + 0.5) * h / size).astype(int), h - 1)
    xs = np.minimum(np.floor((np.arange(size) + 0.5) * w / size).astype(int), w - 1)
    return label[ys][:, xs]


def tf_bilinear(img: np.ndarray, size: int) -> np.ndarray:
    """TF2 bilinear resize (half-pixel centres, no antialias) of float ``(H, W, C)``."""

    def axis(n):
        src = np.maximum((np.arange(size) + 0.5) * n / size - 0.5, 0.0)
        lo = np.floor(src).astype(int)
        return lo, np.minimum(lo + 1, n - 1), src - lo

    (y0, y1, fy), (x0, x1, fx_) = axis(img.shape[0]), axis(img.shape[1])
    top = img[y0][:, x0] * (1 - fx_)[None, :, None] + img[y0][:, x1] * fx_[None, :, None]
    bot = img[y1][:, x0] * (1 - fx_)[None, :, None] + img[y1][:, x1] * fx_[None, :, None]
    return top * (1 - fy)[:, None, None] + bot * fy[:, None, None]


def crop(a: np.ndarray) -> np.ndarray:
    h, w = a.shape[:2]
    c = min(h, w)
    return a[(h - c) // 2 : (h - c) // 2 + c, (w - c) // 2 : (w - c) // 2 + c]


def pillow(path) -> np.ndarray:
    """Pillow's RGB pixels: the loaders' decoding before ``jpeg_decoder`` (now ``pil``)."""
    return np.asarray(Image.open(path).convert("RGB"))


def tf_jpeg(path) -> np.ndarray:
    """A JPEG as TF's ``tf.io.decode_jpeg`` defaults decode it: libjpeg-turbo's fast integer DCT
    (``JDCT_IFAST``) with fancy upsampling."""
    data = Path(path).read_bytes()
    return simplejpeg.decode_jpeg(data, colorspace="RGB", fastdct=True, fastupsample=False)


def decoded(path, jpeg_decoder: str = "tf") -> np.ndarray:
    img = tf_jpeg(path) if jpeg_decoder == "tf" else pillow(path)
    return img.astype(np.float64) / 255.0


# ---------------------------------------------------------------- mapping tables


def test_coco_fine_to_coarse_matches_stego_for_every_fine_id():
    table = coco_fine_to_coarse()
    assert len(STEGO) == 182 and len(COCO_STUFF_FINE) == 182
    assert {i for i, (_, s) in enumerate(COCO_STUFF_FINE) if s is None} == UNUSED
    for fine in range(182):
        if fine in UNUSED:
            assert fine not in table
        else:
            assert table[fine] == STEGO[fine], (fine, COCO_STUFF_FINE[fine])
    assert sorted(set(table.values())) == list(range(27))
    # 12 thing supercategories first, then 15 stuff ones.
    assert {table[f] for f in table if f < 91} == set(range(12))
    assert {table[f] for f in table if f >= 91} == set(range(12, 27))
    assert COCO_STUFF27_CLASSES[9] == "person" and COCO_STUFF27_CLASSES[23] == "sky"


def test_coco_luts_cover_every_8bit_value():
    s27, o81 = stuff27_lut(), object81_lut()
    things = [f for f in range(91) if f not in UNUSED]
    assert len(things) == 80
    for v in range(256):
        if v == 255 or v in UNUSED:
            assert s27[v] == -1 and o81[v] == -1
        elif v < 91:
            assert s27[v] == STEGO[v] and o81[v] == things.index(v) + 1
        elif v < 182:
            assert s27[v] == STEGO[v] and o81[v] == 0
        else:
            assert s27[v] == -2 and o81[v] == -2  # undefined: an error when met
    assert COCO_OBJECT_CLASSES[1] == "person" and COCO_OBJECT_CLASSES[80] == "toothbrush"
    assert COCO_OBJECT_CLASSES[o81[89]] == "toothbrush"


# ---------------------------------------------------------------- COCO


def _coco_fixture(root, layout="stego"):
    every = fx.grid_label([*range(182), 255], 14, 14)  # 196 px: every fine id and 255
    other = fx.grid_label([0, 91, 255, 181], 9, 12)
    fx.make_coco(root, {"000000000139": every, "000000000285": other}, layout)
    return every, other


@pytest.mark.parametrize("layout", ["stego", "notebook"])
def test_coco_stuff27_every_fine_id(tmp_path, layout):
    every, _ = _coco_fixture(tmp_path, layout)
    ds = get_dataset("coco_stuff27", tmp_path, split="curated", keep_size=True)
    assert (ds.n_class, len(ds), ds.class_names[0]) == (27, 2, "electronic")
    item = ds[0]
    assert item["id"] == "000000000139"
    expected = np.vectorize(lambda v: -1 if v == 255 or v in UNUSED else STEGO[v])(every)
    assert item["label"].dtype == torch.int64
    np.testing.assert_array_equal(item["label"].numpy(), expected)
    assert item["image"].shape == (3, 14, 14)


def test_coco_object_labels(tmp_path):
    every, _ = _coco_fixture(tmp_path)
    ds = get_dataset("coco_object", tmp_path, split="full", keep_size=True)
    assert ds.n_class == 81 and len(ds) == 2
    lab = ds[0]["label"].numpy()
    things = [f for f in range(91) if f not in UNUSED]
    for v in range(256):
        where = every == v
        if not where.any():
            continue
        want = -1 if v == 255 or v in UNUSED else (things.index(v) + 1 if v < 91 else 0)
        assert (lab[where] == want).all(), v


@pytest.mark.parametrize("jpeg_decoder", ["tf", "pil"])
def test_coco_crop_and_resize_pixelwise(tmp_path, jpeg_decoder):
    _, other = _coco_fixture(tmp_path)
    # split=val -> curated
    ds = get_dataset("coco_stuff27", tmp_path, resolution=20, jpeg_decoder=jpeg_decoder)
    item = ds[1]
    lut = np.vectorize(lambda v: -1 if v == 255 else STEGO[v])
    np.testing.assert_array_equal(item["label"].numpy(), lut(tf_nearest(crop(other), 20)))
    img = decoded(tmp_path / "images/val2017/000000000285.jpg", jpeg_decoder)
    want = tf_bilinear(crop(img), 20).transpose(2, 0, 1)
    np.testing.assert_allclose(item["image"].numpy(), want, atol=1e-5)


def test_coco_curated_list_selects_and_orders(tmp_path):
    labels = {f"{i:012d}": fx.grid_label([i], 4, 4) for i in (5, 3, 9)}
    fx.make_coco(tmp_path, labels, curated=["000000000009", "000000000003"])
    ds = get_dataset("coco_stuff27", tmp_path, split="curated", keep_size=True)
    assert [ds[i]["id"] for i in range(len(ds))] == ["000000000009", "000000000003"]
    assert len(get_dataset("coco_stuff27", tmp_path, split="full")) == 3
    (tmp_path / "curated/val2017/Coco164kFull_Stuff_Coarse_7.txt").unlink()
    with pytest.raises(FileNotFoundError, match=r"Coco164kFull_Stuff_Coarse_7\.txt"):
        get_dataset("coco_stuff27", tmp_path, split="curated")


# ---------------------------------------------------------------- Cityscapes


def test_cityscapes_every_label_id_and_crop(tmp_path):
    every = fx.grid_label([*range(34), 255], 10, 16)
    imgs = fx.make_cityscapes(
        tmp_path,
        {("frankfurt", "frankfurt_000000_000294"): every,
         ("lindau", "lindau_000001_000019"): fx.grid_label([7, 33], 6, 4)},
    )  # fmt: skip
    ds = get_dataset("cityscapes", tmp_path, keep_size=True)
    assert ds.n_class == 27 and ds.class_names[0] == "road" and ds.class_names[26] == "bicycle"
    assert [ds[i]["id"] for i in range(2)] == ["frankfurt_000000_000294", "lindau_000001_000019"]
    want = np.where((every >= 7) & (every <= 33), every.astype(int) - 7, -1)
    np.testing.assert_array_equal(ds[0]["label"].numpy(), want)
    # PNG images are lossless: the image resize is checked exactly against TF2's formula.
    ds = get_dataset("cityscapes", tmp_path, resolution=7)
    item = ds[0]
    np.testing.assert_array_equal(item["label"].numpy(), tf_nearest(crop(want), 7))
    want_img = tf_bilinear(crop(imgs["frankfurt_000000_000294"]) / 255.0, 7).transpose(2, 0, 1)
    np.testing.assert_allclose(item["image"].numpy(), want_img, atol=1e-5)
    # Crop offsets (h - c) // 2, (w - c) // 2: columns 3..12 of the 10x16 map.
    same = get_dataset("cityscapes", tmp_path, resolution=10)[0]["label"].numpy()
    np.testing.assert_array_equal(same, want[:, 3:13])


def test_cityscapes_undefined_label_id_is_refused_or_skipped(tmp_path):
    """labelIds are 0..33 (255: -1 as a byte); 200 is no id, not a void pixel to ignore."""
    fx.make_cityscapes(
        tmp_path,
        {("aachen", "aachen_000000_000019"): fx.grid_label([7, 200, 34], 4, 6),
         ("bonn", "bonn_000000_000019"): fx.grid_label([7, 255], 4, 6)},
    )  # fmt: skip
    ds = get_dataset("cityscapes", tmp_path, resolution=4)
    with pytest.raises(
        DataFileError, match=r"aachen_000000_000019_gtFine_labelIds\.png.*\[34, 200\]"
    ):
        ds[0]
    ds = get_dataset("cityscapes", tmp_path, resolution=4, on_error="skip")
    with pytest.warns(UserWarning, match="skipped.*aachen_000000_000019"):
        batch = collate([ds[0], ds[1]])
    assert batch["n_skipped"] == 1 and ds.skipped == 1 and batch["id"] == ["bonn_000000_000019"]


def test_16_bit_image_keeps_its_range_and_32_bit_is_refused(tmp_path):
    ramp = (np.arange(6 * 8).reshape(6, 8) * 1365).astype(np.uint16)  # 0 .. 64155
    Image.fromarray(ramp).save(tmp_path / "grey16.png")
    assert Image.open(tmp_path / "grey16.png").mode == "I;16"
    got = read_image(tmp_path / "grey16.png")
    assert got.shape == (6, 8, 3) and got.dtype == np.uint8
    # The high byte, as Pillow decodes 16-bit colour PNGs; clipping at 255 made it nearly white.
    np.testing.assert_array_equal(got, np.repeat((ramp >> 8).astype(np.uint8)[..., None], 3, -1))
    Image.fromarray(ramp.astype(np.int32)).save(tmp_path / "wide.tif")
    with pytest.raises(DataFileError, match=r"wide\.tif.*mode 'I'"):
        read_image(tmp_path / "wide.tif")


def test_antialias_option_changes_image_only_when_downscaling(tmp_path):
    fx.make_cityscapes(tmp_path, {("aachen", "aachen_000000_000019"): fx.grid_label([7], 32, 32)})
    plain = get_dataset("cityscapes", tmp_path, resolution=8)[0]
    smooth = get_dataset("cityscapes", tmp_path, resolution=8, antialias=True)[0]
    assert not torch.allclose(plain["image"], smooth["image"])
    assert torch.equal(plain["label"], smooth["label"])


# ---------------------------------------------------------------- ADE20K, VOC, Context


def test_ade20k_mapping_and_out_of_range(tmp_path):
    every = fx.grid_label(range(151), 13, 12)
    fx.make_ade(
        tmp_path, {"ADE_val_00000001": every, "ADE_val_00000002": fx.grid_label([151], 4, 4)}
    )
    ds = get_dataset("ade20k", tmp_path, keep_size=True)
    assert ds.n_class == 150 and ds.class_names[0] == "wall" and ds.class_names[-1] == "flag"
    np.testing.assert_array_equal(ds[0]["label"].numpy(), every.astype(int) - 1)
    with pytest.raises(DataFileError, match=r"ADE_val_00000002\.png.*\[151\]"):
        ds[1]
    # root may also be the ADEChallengeData2016 folder itself
    assert len(get_dataset("ade20k", tmp_path / "ADEChallengeData2016")) == 2


def test_voc_palette_png(tmp_path):
    every = fx.grid_label([*range(21), 255], 11, 9)
    fx.make_voc(tmp_path, {"2007_000033": every, "2007_000042": fx.grid_label([21], 3, 3)})
    path = tmp_path / "VOCdevkit/VOC2012/SegmentationClass/2007_000033.png"
    assert Image.open(path).mode == "P"
    ds = get_dataset("voc", tmp_path, keep_size=True)
    assert ds.n_class == 21 and ds.class_names[15] == "person"
    np.testing.assert_array_equal(
        ds[0]["label"].numpy(), np.where(every == 255, -1, every.astype(int))
    )
    with pytest.raises(DataFileError, match=r"2007_000042\.png.*\[21\]"):
        ds[1]


def test_pascal_context59(tmp_path):
    every = fx.grid_label([*range(60), 255], 8, 8)
    fx.make_voc(
        tmp_path, {"2008_000002": every, "2008_000003": fx.grid_label([60], 2, 2)}, "VOC2010"
    )
    ds = get_dataset("pascal_context59", tmp_path, keep_size=True)
    assert ds.n_class == 59 and ds.class_names[0] == "aeroplane" and ds.class_names[-1] == "wood"
    want = np.where((every == 0) | (every == 255), -1, every.astype(int) - 1)
    np.testing.assert_array_equal(ds[0]["label"].numpy(), want)
    with pytest.raises(DataFileError, match=r"\[60\]"):
        ds[1]
    with_bg = get_dataset("pascal_context59", tmp_path, keep_size=True, background=True)
    assert with_bg.n_class == 60 and with_bg.class_names[:2] == ["background", "aeroplane"]
    want = np.where(every == 255, -1, every.astype(int))
    np.testing.assert_array_equal(with_bg[0]["label"].numpy(), want)
    with pytest.raises(ValueError, match=r"unknown dataset options \['background'\]"):
        get_dataset("voc", tmp_path, background=True)


def test_pascal_context59_names_the_converter_label_values(tmp_path):
    # A Detail-API mask holding every kept original id (and 0), converted as the converter does:
    # the class name read back for each pixel must be the original id's own name.
    original = np.resize(np.array([0, *fx.CONTEXT_ORIGINAL_IDS]), 9 * 9).reshape(9, 9)
    fx.make_voc(tmp_path, {"2008_000002": fx.context_converter(original)}, "VOC2010")
    for background in (False, True):
        ds = get_dataset("pascal_context59", tmp_path, keep_size=True, background=background)
        label = ds[0]["label"].numpy()
        names = {0: "background" if background else None, **fx.CONTEXT_ORIGINAL_IDS}
        for original_id, name in names.items():
            (value,) = np.unique(label[original == original_id])
            assert (ds.class_names[value] if value >= 0 else None) == name, original_id


# ---------------------------------------------------------------- JPEG decoding


def _voc_with_jpeg(root, quality: int = 85) -> Path:
    """A one-image VOC fixture whose JPEG is a smooth random picture saved by Pillow at
    ``quality`` with 4:2:0 chroma subsampling (as most camera and COCO JPEGs)."""
    fx.make_voc(root, {"2007_000001": fx.grid_label([1], 24, 40)})
    path = root / "VOCdevkit/VOC2012/JPEGImages/2007_000001.jpg"
    Image.fromarray(fx.rgb(24, 40, seed=3)).save(path, quality=quality, subsampling=2)
    return path


def test_jpeg_decoder_tf_is_the_fast_dct_and_pil_is_pillow(tmp_path):
    path = _voc_with_jpeg(tmp_path)
    pixels = {}
    for decoder in ("tf", "pil"):
        ds = get_dataset("voc", tmp_path, keep_size=True, jpeg_decoder=decoder)
        pixels[decoder] = (ds[0]["image"] * 255).round().byte().permute(1, 2, 0).numpy()
        assert ds.jpeg_decoder == decoder
    np.testing.assert_array_equal(pixels["tf"], tf_jpeg(path))
    np.testing.assert_array_equal(pixels["pil"], pillow(path))  # the pixels before the option
    differ = (pixels["tf"] != pillow(path)).any(axis=-1).mean()
    assert differ > 0.05 and np.abs(pixels["tf"].astype(int) - pillow(path)).max() <= 4
    # The default is TF's decoding; PNG images are Pillow's whatever the option.
    np.testing.assert_array_equal(
        (get_dataset("voc", tmp_path, keep_size=True)[0]["image"] * 255).round().byte(),
        torch.from_numpy(pixels["tf"]).permute(2, 0, 1),
    )
    png = tmp_path / "x.png"
    Image.fromarray(fx.rgb(5, 7, seed=0)).save(png)
    np.testing.assert_array_equal(decode_image(png.read_bytes(), "tf", "x"), pillow(png))
    with pytest.raises(ValueError, match=r"jpeg_decoder must be one of \('tf', 'pil'\).*'fast'"):
        get_dataset("voc", tmp_path, jpeg_decoder="fast")


# ---------------------------------------------------------------- bad input


def test_missing_root_names_layout_and_command(tmp_path):
    for name, part in [("coco_stuff27", "annotations/val2017"), ("cityscapes", "gtFine"),
                       ("ade20k", "ADEChallengeData2016"), ("voc", "SegmentationClass"),
                       ("pascal_context59", "SegmentationClassContext")]:  # fmt: skip
        with pytest.raises(FileNotFoundError) as e:
            get_dataset(name, tmp_path / "nowhere")
        msg = str(e.value)
        assert part in msg and f"python -m eval.tools.prepare dataset={name}" in msg


def test_missing_label_raises_or_skips(tmp_path):
    fx.make_ade(tmp_path, {"ADE_val_00000001": fx.grid_label([1], 4, 4),
                           "ADE_val_00000002": fx.grid_label([2], 4, 4)})  # fmt: skip
    (tmp_path / "ADEChallengeData2016/annotations/validation/ADE_val_00000002.png").unlink()
    with pytest.raises(DataFileError, match=r"ADE_val_00000002\.png"):
        get_dataset("ade20k", tmp_path)
    with pytest.warns(UserWarning, match="ADE_val_00000002"):
        ds = get_dataset("ade20k", tmp_path, on_error="skip")
    assert len(ds) == 1 and ds.skipped == 1


def test_truncated_image_and_size_mismatch(tmp_path):
    fx.make_voc(tmp_path, {"a": fx.grid_label([1], 8, 8), "b": fx.grid_label([1], 8, 8),
                           "c": fx.grid_label([2], 8, 8)})  # fmt: skip
    jpg = tmp_path / "VOCdevkit/VOC2012/JPEGImages/a.jpg"
    jpg.write_bytes(jpg.read_bytes()[:100])
    fx.save_palette(tmp_path / "VOCdevkit/VOC2012/SegmentationClass/b.png", np.ones((8, 6)))
    ds = get_dataset("voc", tmp_path)
    with pytest.raises(DataFileError, match=r"a\.jpg"):
        ds[0]
    with pytest.raises(DataFileError, match=r"b\.jpg.*8x8.*b\.png.*6x8"):
        ds[1]
    ds = get_dataset("voc", tmp_path, on_error="skip", resolution=4)
    with pytest.warns(UserWarning, match="skipped"):
        batch = collate([ds[0], ds[1], ds[2]])
    assert batch["n_skipped"] == 2 and batch["id"] == ["c"] and batch["image"].shape == (1, 3, 4, 4)
    assert (batch["label"] == 2).all()


def test_rgb_label_is_refused(tmp_path):
    fx.make_ade(tmp_path, {"x": fx.grid_label([1], 4, 4)})
    Image.new("RGB", (4, 4)).save(tmp_path / "ADEChallengeData2016/annotations/validation/x.png")
    with pytest.raises(DataFileError, match=r"x\.png.*mode 'RGB'"):
        get_dataset("ade20k", tmp_path)[0]


def test_split_size_warning(tmp_path):
    fx.make_voc(tmp_path, {"a": fx.grid_label([1], 4, 4)})
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        get_dataset("voc", tmp_path)
    assert any(
        issubclass(w.category, SplitSizeWarning) and "1449" in str(w.message) for w in caught
    )


def test_get_dataset_options(tmp_path):
    with pytest.raises(ValueError, match="unknown dataset"):
        get_dataset("nope", tmp_path)
    with pytest.raises(ValueError, match="colour"):
        get_dataset("voc", tmp_path, colour=True)
    with pytest.raises(ValueError, match="on_error"):
        get_dataset("synthetic", on_error="ignore", length=1)[0]
    fx.make_voc(tmp_path, {"a": fx.grid_label([1], 4, 4)})
    with pytest.raises(ValueError, match="on_error"):
        get_dataset("voc", tmp_path, on_error="ignore")
    # prepare-only keys of a dataset config are accepted
    cfg = {"name": "voc", "root": tmp_path, "split": "val", "sources": [], "manual_steps": ""}
    assert len(get_dataset(**cfg)) == 1


# ---------------------------------------------------------------- synthetic


def test_synthetic_deterministic_and_masks_exact():
    a = get_dataset("synthetic", resolution=64, length=3, seed=1)
    b = get_dataset("synthetic", resolution=64, length=3, seed=1)
    c = get_dataset("synthetic", resolution=64, length=3, seed=2)
    assert len(a) == 3 and a.n_class == 5 and a.class_names[0] == "sky"
    for i in range(3):
        assert torch.equal(a[i]["image"], b[i]["image"]) and torch.equal(
            a[i]["label"], b[i]["label"]
        )
    assert not torch.equal(a[0]["label"], c[0]["label"])
    from eval.datasets.synthetic import _COLOURS

    item = a[0]
    lab, img = item["label"], item["image"]
    assert lab.dtype == torch.int64 and 2 <= lab.unique().numel() <= 3
    assert lab.min() >= 0 and lab.max() < 5
    for cls in lab.unique().tolist():
        ratio = img[:, lab == cls] / torch.tensor(_COLOURS[cls])[:, None]
        # every pixel of the mask shows its class colour within the +-15% texture amplitude
        assert ((ratio > 0.84) & (ratio < 1.16)).all() or img.max() == 1.0
    noisy = get_dataset("synthetic", resolution=64, length=1, seed=1, noise=0.1)[0]
    assert torch.equal(noisy["label"], a[0]["label"]) and not torch.equal(noisy["image"], img)
    with pytest.raises(IndexError):
        a[3]


# Small JPEGs and their pixels as TensorFlow's tf.io.decode_jpeg (DiffSeg's official pipeline) and
# torchvision's read_image (DiffCut's loader) decoded them, each run once in a throwaway
# environment by tests/data/make_jpeg_decoded.py: the decoders themselves, not stand-ins.
DECODED = Path(__file__).parents[2] / "data" / "jpeg_decoded.npz"
JPEGS = ("q85_420", "q95_444", "q75_422_odd", "q90_grey")


@pytest.mark.parametrize("name", JPEGS)
def test_tf_decoding_gives_tensorflows_own_pixels(name):
    fixture = np.load(DECODED)
    data = fixture[f"{name}.jpg"].tobytes()
    np.testing.assert_array_equal(decode_image(data, "tf", name), fixture[f"{name}.tf"])
    # The accurate DCT decodes otherwise: the comparison tells the decoders apart.
    assert (decode_image(data, "pil", name) != fixture[f"{name}.tf"]).any()


@pytest.mark.parametrize("name", JPEGS)
def test_diffcut_protocol_decodes_as_torchvision(name):
    fixture = np.load(DECODED)
    data = fixture[f"{name}.jpg"].tobytes()
    protocol = Path(__file__).parents[3] / "conf" / "dataset" / "protocol" / "diffcut.yaml"
    decoder = OmegaConf.load(protocol).jpeg_decoder
    np.testing.assert_array_equal(decode_image(data, decoder, name), fixture[f"{name}.torchvision"])
    assert (decode_image(data, "tf", name) != fixture[f"{name}.torchvision"]).any()
