"""The published cells this harness regenerates, the setting behind each, and how a run deviates.

A run *targets* a cell when its protocol (name and label rules), segmenter and dataset are the
cell's; where a table has several lines of one segmenter (DiffCut with SSD-1B, without PAMR, with
SD 1.4), the line whose model and protocol the run uses (:func:`target`). It *fills* the cell only
when nothing else differs from the published setting: model and its dtype, input resolution,
split and every one of its images, the segmenter's parameters, the protocol's parameters, the
dataset's preprocessing and source; the weights must be the published hub snapshot's (its default
revision, a recorded ``hub:`` fingerprint), and a noised UNet pass must draw its noise on the
published device kind. :func:`deviations` lists what differs, in words a reader can check
(``model=tiny; images 2 of 2175; dtype=float16``); an empty list is a comparable run.
``eval.run`` writes that list to the ledger and ``eval.report.tables`` recomputes it, so a cell never
shows a number that was not produced under its setting.

Torch-free: ``eval.report.tables`` loads fast.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

SD14 = "CompVis/stable-diffusion-v1-4"
NO_CELL = "no published cell"


@dataclass(frozen=True)
class Variant:
    """A column of our numbers in a table: the protocol (name and label rules) a run must use."""

    key: str
    label: str
    protocol: Mapping[str, Any]


@dataclass(frozen=True)
class Method:
    """A method's line. ``segmenter``: the segmenter settings of the published runs (None: the
    number is only quoted from the literature); ``per_dataset`` adds per-dataset settings.

    What the line's published runs set apart from its table's common setting: ``model`` (the
    Hydra model choice), ``model_id`` (its hub id), ``dtype`` (None: the table's) and
    ``protocol`` (protocol parameters replacing the variant's, e.g. ``{"pamr": False}``)."""

    name: str
    segmenter: Mapping[str, Any] | None = None
    per_dataset: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)
    model: str | None = None
    model_id: str | None = None
    dtype: str | None = None
    protocol: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Table:
    """A published table: its datasets (name -> split), the setting common to its cells."""

    name: str
    title: str
    datasets: Mapping[str, str]
    metrics: tuple[str, ...]
    methods: tuple[Method, ...]
    variants: tuple[Variant, ...]
    # Model (Hydra choice), its hub id, its dtype, model input side, dataset preprocessing.
    model: str = "sd14"
    model_id: str = SD14
    dtype: str = "float32"
    resolution: int = 512
    dataset: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Cell:
    table: Table
    method: Method
    dataset: str
    variant: Variant

    @property
    def key(self) -> str:
        return f"{self.table.name}/{self.method.name}/{self.dataset}/{self.variant.key}"

    # The published model: Hydra choice, hub id, dtype (the method's, else the table's).
    @property
    def model(self) -> str:
        return self.method.model or self.table.model

    @property
    def model_id(self) -> str:
        return self.method.model_id or self.table.model_id

    @property
    def dtype(self) -> str:
        return self.method.dtype or self.table.dtype

    @property
    def protocol(self) -> dict[str, Any]:
        """The published protocol: the variant's, with the method's parameters."""
        return {**self.variant.protocol, **self.method.protocol}


# DiffSeg's official notebook: one UNet pass at timestep 300, empty prompt, no noise, 16x16 anchors,
# no K-means refinement, aggregation weights proportional to resolution, and the official code's
# float16 arithmetic in the first merge iteration (float64 changes what is merged: README
# "Method"); DiffCut's re-evaluation ran DiffSeg's code, so the same holds for its cells.
_DIFFSEG = {
    "name": "diffseg",
    "timestep": 300,
    "num_points": 16,
    "refine": False,
    "first_merge_dtype": "float16",
    "weights": None,
    "prompt": "",
    "noise": False,
}
_KMEANS = {"timestep": 300, "weights": None, "prompt": "", "noise": False}
# The official preprocessing: square centre crop, bilinear resize without antialiasing, JPEGs
# decoded as TF's decode_jpeg (fast integer DCT); the float32 cache is bit-identical to the files.
# source: the original files (a Parquet or hub copy may hold re-encoded images or remapped labels).
_OFFICIAL_DATA = {"antialias": False, "keep_size": False, "jpeg_decoder": "tf", "source": None}

TABLE1 = Table(
    name="table1",
    title="DiffSeg Table 1: unsupervised zero-shot segmentation (protocol=diffseg)",
    datasets={"coco_stuff27": "curated", "cityscapes": "val"},
    metrics=("pixel_accuracy", "miou"),
    methods=(
        *(Method(m) for m in ("IIC", "MDC", "PiCIE", "STEGO", "HP", "ReCo", "MaskCLIP")),
        Method("K-Means-C", {**_KMEANS, "name": "kmeans_c", "n_clusters": 6}),
        Method("K-Means-S", {**_KMEANS, "name": "kmeans_s", "n_clusters": "gt"}),
        Method(
            "DiffSeg",
            _DIFFSEG,
            {
                "coco_stuff27": {"kl_threshold": [1.1, 1.1, 1.1]},
                "cityscapes": {"kl_threshold": [0.9, 0.9, 0.9]},
            },
        ),
    ),
    variants=(
        Variant(
            "ours",
            "ours",
            {
                "name": "diffseg",
                "compat": False,
                "resolution": None,
                "crop": "dataset",
                "score_resolution": None,
                "pamr": False,
                "background": None,
            },
        ),
    ),
    dataset=_OFFICIAL_DATA,
)

# DiffCut (Couairon et al., NeurIPS 2024) re-ran DiffSeg under its own protocol (eval.scoring.protocol,
# conf/protocol/diffcut.yaml): 1024 input, labels sampled at 128, background merge, PAMR, KL 1.0.
# Its published numbers were computed with its label rules (protocol.compat=true): the "ours"
# column; the corrected rules get a column of their own.
_DIFFCUT_PROTOCOL = {
    "name": "diffcut",
    "resolution": 1024,
    "model_resolution": None,
    "crop": "min_minus_one",
    "score_resolution": 128,
    "pamr": True,
    "pamr_iterations": 10,
    "pamr_dilations": [1, 2, 4, 8],
}
_DIFFCUT_BACKGROUND = {"voc", "coco_object", "pascal_context59"}
# DiffCut's own runs (PaulCouairon/DiffCut): the defaults of eval_diffcut.py and tools/ldm.py,
# which loads the model in float16 (conf/segmenter/diffcut.yaml).
_DIFFCUT = {
    "name": "diffcut",
    "tau": 0.5,
    "alpha": 10.0,
    "timestep": 50,
    "prompt": "",
    "noise": True,
    "seed": 42,
}
_SSD1B = {"model": "ssd1b", "model_id": "segmind/SSD-1B", "dtype": "float16"}
DIFFCUT = Table(
    name="diffcut",
    title="DiffCut's table: DiffSeg re-evaluated and DiffCut, under its protocol (protocol=diffcut), mIoU",
    datasets={
        "voc": "val",
        "pascal_context59": "val",
        "coco_object": "curated",
        "coco_stuff27": "curated",
        "cityscapes": "val",
        "ade20k": "val",
    },
    metrics=("miou",),
    # DiffCut's own rows (conf/experiment/diffcut_ssd1b.yaml): SSD-1B features with PAMR (its
    # main result), without PAMR, and with SD 1.4 features; float16 as DiffCut's code loads them.
    methods=(
        Method("DiffSeg", {**_DIFFSEG, "kl_threshold": [1.0, 1.0, 1.0]}),
        Method("DiffCut (SSD-1B)", _DIFFCUT, **_SSD1B),
        Method("DiffCut (SSD-1B, no PAMR)", _DIFFCUT, **_SSD1B, protocol={"pamr": False}),
        # tau 0.2, not the default 0.5: DiffCut's author in PaulCouairon/DiffCut issue #5 (the
        # paper's Table 7 omits it); conf/experiment/diffcut_sd14.yaml.
        Method("DiffCut (SD 1.4)", {**_DIFFCUT, "tau": 0.2}, model="sd14", dtype="float16"),
    ),
    variants=(
        Variant(
            "ours",
            "ours (DiffCut's labels)",
            {**_DIFFCUT_PROTOCOL, "compat": True, "background": "background"},
        ),
        Variant(
            "corrected",
            "ours (corrected labels)",
            {**_DIFFCUT_PROTOCOL, "compat": False, "background": "background"},
        ),
    ),
    # DiffCut's loader decodes with torchvision's read_image; Pillow gives the same pixels (tested
    # against torchvision's own: tests/data/jpeg_decoded.npz).
    dataset={"antialias": False, "keep_size": True, "jpeg_decoder": "pil", "source": None},
)

TABLES = {t.name: t for t in (TABLE1, DIFFCUT)}

# ``python -m eval.report.tables --verify``: how far (percentage points) a filled cell may lie from its
# published number, per dataset. No two published runs of one of these settings exist to measure
# a spread from, so these are stated choices: half a point (five times the rounding of a published
# decimal) covers the arithmetic that no port reproduces bit for bit (TF's or CUDA's summation
# order flipping a few merge or cut decisions near their thresholds); a point on Cityscapes, whose
# 500 images and rare classes move its mIoU most per flipped decision.
VERIFY_TOLERANCE = {
    "coco_stuff27": 0.5,
    "cityscapes": 1.0,
    "voc": 0.5,
    "pascal_context59": 0.5,
    "coco_object": 0.5,
    "ade20k": 0.5,
}


def _identity(row: Mapping[str, Any]) -> tuple[str, bool, str, str]:
    protocol = row.get("protocol_settings") or {}
    compat = bool(protocol.get("compat", False)) if isinstance(protocol, Mapping) else False
    return str(row.get("protocol", "")), compat, str(row.get("segmenter", "")), str(row["dataset"])


def _uses(row: Mapping[str, Any], cell: Cell) -> bool:
    """Whether ``row`` runs ``cell``'s model choice and its protocol on each parameter that some
    line of the table sets apart (``Method.protocol``)."""
    protocol = row.get("protocol_settings") or {}
    keys = {key for method in cell.table.methods for key in method.protocol}
    return row.get("model") == cell.model and not any(
        _differs(protocol.get(key), cell.protocol.get(key)) for key in keys
    )


def target(row: Mapping[str, Any]) -> Cell | None:
    """The published cell a (parsed) ledger row aims at, or None: among the table's lines of the
    row's segmenter, the one whose model and protocol the row uses (:func:`_uses`), else the first
    (so that a run on another model is listed with its deviations)."""
    protocol, compat, segmenter, dataset = _identity(row)
    for table in TABLES.values():
        if dataset not in table.datasets:
            continue
        for variant in table.variants:
            if (variant.protocol["name"], variant.protocol["compat"]) != (protocol, compat):
                continue
            cells = [
                Cell(table, method, dataset, variant)
                for method in table.methods
                if method.segmenter is not None and method.segmenter["name"] == segmenter
            ]
            if cells:
                return next((cell for cell in cells if _uses(row, cell)), cells[0])
    return None


def _int(value: Any) -> int | None:
    try:
        return int(value)
    except (TypeError, ValueError):
        return None


def _differs(got: Any, expected: Any) -> bool:
    if isinstance(expected, list | tuple):
        return not isinstance(got, list | tuple) or list(got) != list(expected)
    return got != expected


def scoring_rule(cell: Cell) -> str:
    """The cell's scoring rule (``eval.analysis.rescore``): DiffCut merges unmatched clusters into
    background on its datasets with one, every other cell is the per-image Hungarian matching."""
    merges = cell.protocol.get("background") and cell.dataset in _DIFFCUT_BACKGROUND
    return "background_merge" if merges else "hungarian"


# The revisions that name the published weights: the hub's default branch.
PUBLISHED_REVISIONS = ("", "main")
# Noised UNet passes: the device kind of the published runs' generator (DiffCut's code draws its
# noise from a CUDA generator, tools/ldm.py); a device the ledger names by its type alone is none.
PUBLISHED_NOISE_DEVICE = "cuda"
_NOT_CUDA = ("", "cpu", "mps", "xpu")


def _weights_deviations(row: Mapping[str, Any], cell: Cell) -> list[str]:
    """The weights behind the run: the published revision, and a fingerprint that says they are
    the hub's snapshot (``eval.models.digests.weights_fingerprint``: ``hub:<commit>``). A local folder
    (``dir:``) or no fingerprint cannot be told from other weights: never in a cell."""
    if row.get("model") != cell.model:
        return []  # another model: already listed
    out = []
    revision = str(row.get("model_revision") or "")
    if revision not in PUBLISHED_REVISIONS:
        out.append(f"model_revision={revision}")
    fingerprint = str(row.get("model_hash") or "")
    if not fingerprint.startswith("hub:"):
        what = f"model_hash={fingerprint}" if fingerprint else "no weights fingerprint recorded"
        out.append(f"weights unverified ({what}; published: the {cell.model_id} hub snapshot)")
    return out


def _noise_deviations(row: Mapping[str, Any], cell: Cell) -> list[str]:
    """A noised pass of the published setting drawn on another device kind: other noise."""
    published = cell.method.segmenter or {}
    segmenter = row.get("segmenter_settings") or {}
    if not (published.get("noise") and segmenter.get("noise")):
        return []
    device = str(row.get("device") or "")
    if device.lower() in _NOT_CUDA:
        where = device or "an unrecorded device"
        return [f"noise drawn on {where} (published: {PUBLISHED_NOISE_DEVICE})"]
    return []


def _model_deviations(row: Mapping[str, Any], cell: Cell) -> list[str]:
    """The model, its dtype, the attention cache's storage and the model's input side."""
    out = []
    if row.get("model") != cell.model:
        out.append(f"model={row.get('model')}")
    model_id = str(row.get("model_id") or "")
    # A local path is the user's copy of the weights (its fingerprint: _weights_deviations); a
    # hub id other than the published one is other weights.
    if "/" in model_id and not model_id.startswith(("/", ".")) and model_id != cell.model_id:
        out.append(f"model_id={model_id}")
    if row.get("dtype") != cell.dtype:
        out.append(f"dtype={row.get('dtype')}")
    if row.get("attention_cache") not in ("", None, "float32"):
        out.append(f"attention cache in {row.get('attention_cache')}")
    if _int(row.get("resolution")) != (cell.protocol.get("resolution") or cell.table.resolution):
        out.append(f"resolution={row.get('resolution')}")
    return out


def _data_deviations(row: Mapping[str, Any], cell: Cell) -> list[str]:
    """The split, every one of its images, the preprocessing."""
    table, out = cell.table, []
    split = table.datasets[cell.dataset]
    if row.get("split") != split:
        out.append(f"split={row.get('split')} (published: {split})")
    n, size, skipped = (_int(row.get(k)) for k in ("n_images", "split_size", "n_skipped"))
    if size is None:
        out.append(f"images {n} of an unknown split size")
    elif n != size:
        out.append(f"images {n} of {size}")
    if skipped:
        out.append(f"{skipped} skipped")
    data = row.get("dataset_settings") or {}
    out += [
        f"dataset.{key}={data[key]}"
        for key, expected in table.dataset.items()
        if key in data and _differs(data[key], expected)
    ]
    if data.get("cache") and data.get("cache_dtype", "float32") != "float32":
        out.append(f"dataset.cache_dtype={data.get('cache_dtype')}")
    return out


def _protocol_deviations(row: Mapping[str, Any], cell: Cell) -> list[str]:
    """Each protocol parameter but the name (the identity, checked by :func:`target`), and the
    scoring rule of a rescoring."""
    protocol, out = row.get("protocol_settings") or {}, []
    for key, expected in cell.protocol.items():
        got = protocol.get(key)
        if key == "background":
            got = (protocol.get("background") or {}).get(cell.dataset)
            expected = expected if cell.dataset in _DIFFCUT_BACKGROUND else None
        if key != "name" and _differs(got, expected):
            out.append(f"protocol.{key}={got}")
    rule = row.get("scoring") or ""  # empty in rows written before the column
    if rule and rule != scoring_rule(cell):
        out.append(f"scoring={rule} (published: {scoring_rule(cell)})")
    return out


def _segmenter_deviations(row: Mapping[str, Any], cell: Cell) -> list[str]:
    segmenter = row.get("segmenter_settings") or {}
    wanted = {**(cell.method.segmenter or {}), **cell.method.per_dataset.get(cell.dataset, {})}
    return [
        f"segmenter.{key}={segmenter.get(key)}"
        for key, expected in wanted.items()
        if _differs(segmenter.get(key), expected)
    ]


def cell_deviations(row: Mapping[str, Any], cell: Cell) -> list[str]:
    """How the (parsed, version 2) ledger ``row`` differs from ``cell``'s published setting.

    A model input side set by the protocol (``protocol.resolution``, ``protocol.model_resolution``)
    is listed once, as the protocol's setting."""
    checks = (
        _model_deviations,
        _weights_deviations,
        _data_deviations,
        _protocol_deviations,
        _segmenter_deviations,
        _noise_deviations,
    )
    problems = [problem for check in checks for problem in check(row, cell)]
    if any(p.startswith(("protocol.resolution=", "protocol.model_resolution=")) for p in problems):
        problems = [p for p in problems if not p.startswith("resolution=")]
    return problems


def deviations(row: Mapping[str, Any]) -> list[str]:
    """What keeps a (parsed) ledger row out of a published cell; empty for a comparable run."""
    if _int(row.get("ledger_version")) is None or int(row["ledger_version"]) < 2:
        return ["ledger_version 1: written before every setting was recorded; run it again"]
    cell = target(row)
    if cell is None:
        protocol, compat, segmenter, dataset = _identity(row)
        rules = "[compat]" if compat else ""
        return [f"{NO_CELL} for protocol={protocol}{rules} segmenter={segmenter} dataset={dataset}"]
    return cell_deviations(row, cell)
