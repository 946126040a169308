"""The preprocessed Arrow cache and the Parquet source, checked against the file loaders."""

from __future__ import annotations

import os
import warnings

import numpy as np
import pytest
import torch

from eval.datasets import DataFileError, get_dataset
from eval.datasets.synthetic import SyntheticScenes
from eval.tools.prepare import main as prepare_main
from tests import fixtures as fx

pytestmark = pytest.mark.filterwarnings("ignore::eval.datasets.SplitSizeWarning")

CS_STEMS = [("aachen", "aachen_000000_000019"), ("bonn", "bonn_000001_000019"),
            ("bonn", "bonn_000002_000019")]  # fmt: skip


def _cityscapes(root, n=3):
    rng = np.random.default_rng(0)
    labels = {s: rng.integers(0, 36, (20, 30)).astype(np.uint8) for s in CS_STEMS[:n]}
    for lab in labels.values():
        lab[lab > 33] = 255  # labelIds 0..33 and 255: both void (ignored) and classes
    fx.make_cityscapes(root, labels)


def _coco(root):
    """Two JPEG/stuffthingmaps pairs, one portrait, one landscape (different crops)."""
    a = fx.grid_label([*range(182), 255], 21, 14)
    b = fx.grid_label([0, 91, 255, 181, 17], 12, 18)
    fx.make_coco(root, {"000000000139": a, "000000000285": b})


def _items(ds):
    return [ds[i] for i in range(len(ds))]


def assert_same(got, want):
    assert len(got) == len(want)
    for g, w in zip(got, want, strict=True):
        assert g["id"] == w["id"]
        assert g["image"].dtype == torch.float32 and g["label"].dtype == torch.int64
        assert torch.equal(g["image"], w["image"]), g["id"]
        assert torch.equal(g["label"], w["label"]), g["id"]


def _caches(root):
    return sorted(p.name for p in (root / ".cache").iterdir() if p.is_dir())


@pytest.mark.parametrize("name", ["cityscapes", "coco_stuff27"])
def test_cache_equals_source_files(tmp_path, name, capsys):
    (_cityscapes if name == "cityscapes" else _coco)(tmp_path)
    src = get_dataset(name, tmp_path, resolution=16)
    cached = get_dataset(name, tmp_path, resolution=16, cache=True)
    assert "caching" in capsys.readouterr().out  # size estimate printed before writing
    assert (cached.class_names, cached.n_class) == (src.class_names, src.n_class)
    assert_same(_items(cached), _items(src))
    assert cached.table.features["label"].dtype == "int8"  # 27 classes
    assert (cached[0]["label"] == -1).any()  # ignore survives the int8 round trip
    again = get_dataset(name, tmp_path, resolution=16, cache=True)
    assert capsys.readouterr().out == ""  # fresh: memory-mapped, not rebuilt
    assert_same(_items(again), _items(src))


def test_cache_synthetic_and_uint8(tmp_path):
    opts = dict(resolution=24, length=3, seed=4, n_class=6)
    want = _items(SyntheticScenes(**opts))
    assert_same(_items(get_dataset("synthetic", tmp_path, cache=True, **opts)), want)
    small = get_dataset("synthetic", tmp_path, cache=True, cache_dtype="uint8", **opts)
    assert small.table.features["image"].dtype == "uint8"
    for g, w in zip(_items(small), want, strict=True):
        assert torch.equal(g["image"], torch.round(w["image"] * 255) / 255)
        assert torch.equal(g["label"], w["label"])
    with pytest.raises(ValueError, match=r"dataset\.root"):
        get_dataset("synthetic", None, cache=True, **opts)


def test_ade20k_uses_int16_labels(tmp_path):
    fx.make_ade(tmp_path, {"ADE_val_00000001": fx.grid_label(range(151), 13, 13)})
    cached = get_dataset("ade20k", tmp_path, resolution=13, cache=True)
    assert cached.table.features["label"].dtype == "int16"  # 150 classes do not fit int8
    assert_same(_items(cached), _items(get_dataset("ade20k", tmp_path, resolution=13)))
    assert cached[0]["label"].max() == 149


def test_stale_cache_is_rebuilt(tmp_path, capsys):
    _cityscapes(tmp_path)
    get_dataset("cityscapes", tmp_path, resolution=12, cache=True)
    label = tmp_path / "gtFine/val/bonn/bonn_000001_000019_gtFine_labelIds.png"
    st = label.stat()
    os.utime(label, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))  # touched, content unchanged
    capsys.readouterr()
    get_dataset("cityscapes", tmp_path, resolution=12, cache=True)
    out = capsys.readouterr().out
    assert "stale" in out and "bonn_000001_000019" in out and "caching" in out
    fx.save_grey(label, np.full((20, 30), 7, np.uint8))  # now all road (class 0)
    cached = get_dataset("cityscapes", tmp_path, resolution=12, cache=True)
    assert "stale" in capsys.readouterr().out
    assert (cached[1]["label"] == 0).all()
    assert_same(_items(cached), _items(get_dataset("cityscapes", tmp_path, resolution=12)))
    assert len(_caches(tmp_path)) == 1  # rebuilt in place, no leftovers
    assert not [p for p in (tmp_path / ".cache").iterdir() if ".tmp-" in p.name]


def test_flipped_bytes_in_the_arrow_data_rebuild_the_cache(tmp_path, capsys):
    _cityscapes(tmp_path)
    want = _items(get_dataset("cityscapes", tmp_path, resolution=12))
    get_dataset("cityscapes", tmp_path, resolution=12, cache=True)
    (shard,) = (tmp_path / ".cache").glob("*/data/*.arrow")
    data = bytearray(shard.read_bytes())
    for i in range(len(data) // 3, 2 * len(data) // 3, 97):  # the image values, mid-file
        data[i] ^= 0x04
    st = shard.stat()
    shard.write_bytes(bytes(data))
    os.utime(shard, ns=(st.st_atime_ns, st.st_mtime_ns))  # as if untouched
    capsys.readouterr()
    cached = get_dataset("cityscapes", tmp_path, resolution=12, cache=True)
    out = capsys.readouterr().out
    assert f"cache {shard.parents[1]} has files that changed since it was built" in out
    assert "rebuilding" in out
    assert_same(_items(cached), want)


def test_removed_file_makes_cache_stale(tmp_path, capsys):
    _cityscapes(tmp_path)
    get_dataset("cityscapes", tmp_path, resolution=12, cache=True)
    (tmp_path / "leftImg8bit/val/aachen/aachen_000000_000019_leftImg8bit.png").unlink()
    (tmp_path / "gtFine/val/aachen/aachen_000000_000019_gtFine_labelIds.png").unlink()
    capsys.readouterr()
    cached = get_dataset("cityscapes", tmp_path, resolution=12, cache=True)
    assert "3 -> 2 items" in capsys.readouterr().out
    assert [x["id"] for x in _items(cached)] == [s for _, s in CS_STEMS[1:]]


def test_other_options_use_another_cache(tmp_path):
    _cityscapes(tmp_path, n=1)
    variants = [
        {"resolution": 12},
        {"resolution": 10},
        {"resolution": 12, "antialias": True},
        {"resolution": 12, "cache_dtype": "uint8"},
    ]
    for v in variants:
        get_dataset("cityscapes", tmp_path, cache=True, **v)
    names = _caches(tmp_path)
    assert len(names) == 4 and sum(n.startswith("cityscapes-val-10-") for n in names) == 1
    # on_error changes what is done with a bad pair when reading, not what is stored.
    get_dataset("cityscapes", tmp_path, resolution=12, on_error="skip", cache=True)
    assert len(_caches(tmp_path)) == 4
    antialiased = get_dataset("cityscapes", tmp_path, cache=True, resolution=12, antialias=True)
    plain = get_dataset("cityscapes", tmp_path, resolution=12, antialias=True)
    assert_same(_items(antialiased), _items(plain))


def test_jpeg_decoder_uses_another_cache(tmp_path):
    _coco(tmp_path)
    for decoder in ("tf", "pil"):
        cached = get_dataset(
            "coco_stuff27", tmp_path, resolution=16, cache=True, jpeg_decoder=decoder
        )
        files = get_dataset("coco_stuff27", tmp_path, resolution=16, jpeg_decoder=decoder)
        assert_same(_items(cached), _items(files))
    assert len(_caches(tmp_path)) == 2


def test_bad_pair_stored_as_error_and_on_error_applies(tmp_path):
    _coco(tmp_path)
    fx.save_grey(tmp_path / "annotations/val2017/000000000285.png", np.full((12, 18), 200))
    with pytest.raises(DataFileError, match="200"):
        get_dataset("coco_stuff27", tmp_path, resolution=8)[1]
    cached = get_dataset("coco_stuff27", tmp_path, resolution=8, cache=True)
    assert cached[0]["id"] == "000000000139"
    with pytest.raises(DataFileError, match=r"000000000285\.png.*200"):
        cached[1]
    skipping = get_dataset("coco_stuff27", tmp_path, resolution=8, cache=True, on_error="skip")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert skipping[1] is None
    assert skipping.skipped == 1 and "200" in str(caught[0].message)


def test_unwritable_root_names_cache_dir_which_moves_the_cache(tmp_path):
    root = tmp_path / "data"
    _cityscapes(root, n=2)
    # ROOT/.cache cannot be created, as on a read-only root (chmod is no test when run as root).
    (root / ".cache").write_text("")
    with pytest.raises(OSError, match=r"data/\.cache .*set dataset\.cache_dir=WRITABLE_PATH"):
        get_dataset("cityscapes", root, resolution=12, cache=True)
    elsewhere = tmp_path / "scratch" / "caches"
    cached = get_dataset("cityscapes", root, resolution=12, cache=True, cache_dir=elsewhere)
    assert_same(_items(cached), _items(get_dataset("cityscapes", root, resolution=12)))
    (name,) = [p.name for p in elsewhere.iterdir() if p.is_dir()]
    assert name.startswith("cityscapes-val-12-") and (root / ".cache").is_file()
    # No root at all: the cache directory alone is enough.
    synth = get_dataset("synthetic", None, cache=True, cache_dir=elsewhere, resolution=8, length=2)
    assert_same(_items(synth), _items(SyntheticScenes(resolution=8, length=2)))


def test_keep_size_cannot_be_cached(tmp_path):
    _cityscapes(tmp_path, n=1)
    with pytest.raises(ValueError, match="keep_size"):
        get_dataset("cityscapes", tmp_path, keep_size=True, cache=True)


# ---------------------------------------------------------------- Parquet source


def _coco_parquet(root, path):
    """The COCO fixture's own JPEG/PNG bytes as Parquet rows with hub-style column names."""
    from datasets import Dataset, Features, Image, Value

    ids = ["000000000139", "000000000285"]
    rows = {
        "name": ids,
        "jpg": [{"bytes": (root / f"images/val2017/{i}.jpg").read_bytes()} for i in ids],
        "annotation": [
            {"bytes": (root / f"annotations/val2017/{i}.png").read_bytes()} for i in ids
        ],
    }
    features = Features({"name": Value("string"), "jpg": Image(), "annotation": Image()})
    Dataset.from_dict(rows, features=features).to_parquet(str(path))


COLUMNS = {"image": "jpg", "label": "annotation", "id": "name"}


def test_parquet_source_gives_the_file_loader_tensors(tmp_path):
    _coco(tmp_path / "files")
    _coco_parquet(tmp_path / "files", tmp_path / "pq" / "val-00000.parquet")
    opts = dict(resolution=16, root=tmp_path / "files", columns=COLUMNS)
    table = get_dataset("coco_stuff27", source=f"parquet:{tmp_path}/pq/*.parquet", **opts)
    files = get_dataset("coco_stuff27", tmp_path / "files", resolution=16)
    assert (table.n_class, table.class_names) == (27, files.class_names)
    assert_same(_items(table), _items(files))
    # The table's JPEG bytes are decoded as dataset.jpeg_decoder says, not by the table's Pillow.
    pil = dict(opts, jpeg_decoder="pil")
    table_pil = get_dataset("coco_stuff27", source=f"parquet:{tmp_path}/pq/*.parquet", **pil)
    files_pil = get_dataset("coco_stuff27", tmp_path / "files", resolution=16, jpeg_decoder="pil")
    assert_same(_items(table_pil), _items(files_pil))
    # Mapped with the dataset's own table: fine 0 (person) -> coarse 9, 255 -> ignore (STEGO).
    raw = fx.grid_label([0, 91, 255, 181, 17], 12, 18)
    keep = get_dataset("coco_stuff27", source=f"parquet:{tmp_path}/pq", keep_size=True, **opts)
    lab = keep[1]["label"].numpy()
    assert (lab[raw == 0] == 9).all() and (lab[raw == 255] == -1).all()
    cached = get_dataset("coco_stuff27", source=f"parquet:{tmp_path}/pq", cache=True, **opts)
    assert_same(_items(cached), _items(files))


def test_parquet_source_errors(tmp_path):
    _coco(tmp_path / "files")
    _coco_parquet(tmp_path / "files", tmp_path / "x.parquet")
    with pytest.raises(ValueError, match=r"\['name', 'jpg', 'annotation'\]"):
        get_dataset("coco_stuff27", source=f"parquet:{tmp_path}/x.parquet")  # default columns
    with pytest.raises(FileNotFoundError, match="matches no file"):
        get_dataset("coco_stuff27", source=f"parquet:{tmp_path}/none/*.parquet")
    with pytest.raises(ValueError, match="parquet:PATH_OR_GLOB"):
        get_dataset("voc", source="s3://bucket/voc")
    with pytest.raises(ValueError, match="not supported"):
        get_dataset("synthetic", source=f"parquet:{tmp_path}/x.parquet")


def test_parquet_label_must_hold_ids_not_colours(tmp_path):
    from datasets import Dataset, Features, Image

    rgb = fx.rgb(6, 6, seed=1)
    rows = {"image": [rgb], "label": [rgb]}  # a colour-coded mask where ids are expected
    Dataset.from_dict(rows, features=Features({"image": Image(), "label": Image()})).to_parquet(
        str(tmp_path / "v.parquet")
    )
    ds = get_dataset("voc", source=f"parquet:{tmp_path}/v.parquet", resolution=6)
    with pytest.raises(DataFileError, match=r"row 0.*'RGB'"):
        ds[0]


def test_prepare_builds_the_cache(tmp_path, capsys):
    _cityscapes(tmp_path)
    argv = ["dataset=cityscapes", f"dataset.root={tmp_path}", "dataset.sources=[]", "cache=true"]
    assert prepare_main(argv) == 0
    assert "caching 3 images" in capsys.readouterr().out
    (name,) = _caches(tmp_path)
    assert (tmp_path / ".cache" / name / "fingerprint.json").is_file()
    assert prepare_main(argv) == 0
    assert "caching" not in capsys.readouterr().out  # second run reuses it


def test_parquet_pascal_context_takes_the_background_option(tmp_path):
    from datasets import Dataset, Features, Image

    raw = fx.grid_label([0, 1, 59, 255], 6, 6)  # Context ids: 0 background, 1..59, 255 ignore
    rows = {"image": [fx.rgb(6, 6, seed=2)], "label": [raw]}
    Dataset.from_dict(rows, features=Features({"image": Image(), "label": Image()})).to_parquet(
        str(tmp_path / "c.parquet")
    )
    source = f"parquet:{tmp_path}/c.parquet"
    for background, n_class, zero in ((False, 59, -1), (True, 60, 0)):
        ds = get_dataset("pascal_context59", source=source, resolution=6, background=background)
        assert ds.n_class == n_class and (ds.class_names[0] == "background") == background
        label = ds[0]["label"].numpy()
        assert (label[raw == 0] == zero).all() and (label[raw == 255] == -1).all()
        assert (label[raw == 59] == 59 - (not background)).all()
