"""Paper tables and sweep plots from the run ledger: ``python -m eval.tables``.

Each table puts our numbers (the ledger, fractions shown as percentages) beside the published ones
(``eval/published.csv``, one number per line with its paper and table) with a delta column, and is
written as Markdown, a LaTeX ``booktabs`` tabular fragment and a tidy CSV (one line per cell, full
precision, with the ledger ``run_id`` behind each of our numbers). A cell we have no run for says
``missing``; it is never filled in. When several ledger rows match a cell, the most recent one (by
``timestamp``, then by position in the ledger) is used.

``python -m eval.tables --sweep kl_threshold`` instead plots mIoU and pixel accuracy against the
swept parameter, one figure per ledger ``experiment`` that varies it, one curve per dataset.
"""

from __future__ import annotations

import argparse
import math
import os
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from eval.columns import SETTING_COLUMNS
from eval.logging import atomic_open, write_text_atomic

PUBLISHED_CSV = Path(__file__).with_name("published.csv")
METRICS = {"pixel_accuracy": "Acc", "miou": "mIoU"}
DATASET_NAMES = {
    "coco_stuff27": "COCO-Stuff-27",
    "cityscapes": "Cityscapes",
    "voc": "VOC",
    "pascal_context59": "Pascal Context",
    "coco_object": "COCO-Object",
    "ade20k": "ADE20K",
    "synthetic": "Synthetic",
}
NOT_PUBLISHED = "—"
_TEXT_COLUMNS = {"Method", "Dataset", "Source"}  # left-aligned; the others hold numbers
MISSING = "missing"


@dataclass(frozen=True)
class Row:
    """A method's line in a table.

    ``ours``: the ledger columns and values our run must have (``None`` means the method is only
    quoted from the literature); ``ours_per_dataset`` adds per-dataset requirements.
    """

    method: str
    ours: dict[str, object] | None = None
    ours_per_dataset: dict[str, dict[str, object]] = field(default_factory=dict)


@dataclass(frozen=True)
class TableSpec:
    name: str
    title: str
    datasets: tuple[str, ...]
    metrics: tuple[str, ...]
    rows: tuple[Row, ...]


_PAPER_SETTING = {
    "protocol": "diffseg",
    "model": "sd14",
    "resolution": 512,
    "timestep": 300,
}
_BASELINES = ("IIC", "MDC", "PiCIE", "STEGO", "HP", "ReCo", "MaskCLIP")
_DIFFCUT_DATASETS = (
    "voc",
    "pascal_context59",
    "coco_object",
    "coco_stuff27",
    "cityscapes",
    "ade20k",
)

TABLES = {
    "table1": TableSpec(
        name="table1",
        title="DiffSeg Table 1: unsupervised zero-shot segmentation (protocol=diffseg)",
        datasets=("coco_stuff27", "cityscapes"),
        metrics=("pixel_accuracy", "miou"),
        rows=(
            *(Row(m) for m in _BASELINES),
            Row("K-Means-C", {**_PAPER_SETTING, "segmenter": "kmeans_c"}),
            Row("K-Means-S", {**_PAPER_SETTING, "segmenter": "kmeans_s"}),
            Row(
                "DiffSeg",
                {
                    **_PAPER_SETTING,
                    "segmenter": "diffseg",
                    "num_points": 16,
                    "refine": False,
                    "weights": None,
                },
                {
                    "coco_stuff27": {"kl_threshold": (1.1, 1.1, 1.1)},
                    "cityscapes": {"kl_threshold": (0.9, 0.9, 0.9)},
                },
            ),
        ),
    ),
    "diffcut": TableSpec(
        name="diffcut",
        title="DiffSeg re-evaluated under the DiffCut protocol (protocol=diffcut), mIoU",
        datasets=_DIFFCUT_DATASETS,
        metrics=("miou",),
        rows=(
            Row(
                "DiffSeg",
                {
                    "protocol": "diffcut",
                    "model": "sd14",
                    "segmenter": "diffseg",
                    "kl_threshold": (1.0, 1.0, 1.0),
                },
            ),
            Row("DiffCut"),
        ),
    ),
}


# --------------------------------------------------------------------------------------------
# Reading


def read_ledger(path: str | os.PathLike) -> pd.DataFrame:
    """The ledger as strings (empty string for empty cells), in file order."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(
            f"ledger {str(path)!r} not found; every `python -m eval ...` run appends its row to "
            "outputs/ledger.csv, or pass --ledger PATH"
        )
    return pd.read_csv(path, dtype=str, keep_default_na=False)


def read_published(path: str | os.PathLike = PUBLISHED_CSV) -> pd.DataFrame:
    """Published numbers (percent): columns ``table, method, dataset, metric, value, source``."""
    return pd.read_csv(path, dtype={"value": float})


def _require_columns(ledger: pd.DataFrame, columns: Sequence[str], what: str) -> None:
    absent = sorted(set(columns) - set(ledger.columns))
    if absent:
        raise ValueError(
            f"the ledger lacks column(s) {absent} needed for {what}; it has {list(ledger.columns)}"
        )


def _parse_floats(text: str) -> tuple[float, ...] | None:
    parts = [p for p in re.split(r"[\s,\[\]()]+", str(text)) if p]
    try:
        return tuple(float(p) for p in parts)
    except ValueError:
        return None


def _cell_matches(value: str, expected: object) -> bool:
    text = str(value).strip()
    if expected is None:
        return text.lower() in {"", "none", "null", "nan", "proportional"}
    if isinstance(expected, bool):
        return text.lower() in ({"true", "1"} if expected else {"false", "0"})
    if isinstance(expected, tuple):
        got = _parse_floats(text)
        return (
            got is not None
            and len(got) == len(expected)
            and all(math.isclose(a, b, rel_tol=1e-6) for a, b in zip(got, expected, strict=True))
        )
    if isinstance(expected, int | float):
        got = _parse_floats(text)
        return got is not None and len(got) == 1 and math.isclose(got[0], expected, rel_tol=1e-6)
    return text == str(expected)


def _by_recency(ledger: pd.DataFrame) -> pd.DataFrame:
    """Oldest first: by timestamp, ties (and unparsable times, first) in file order."""
    times = pd.to_datetime(ledger["timestamp"], errors="coerce", utc=True, format="ISO8601")
    order = times.reset_index(drop=True).sort_values(kind="stable", na_position="first").index
    return ledger.iloc[order]


def latest_match(ledger: pd.DataFrame, selector: dict[str, object]) -> pd.Series | None:
    """The most recent ledger row whose columns match ``selector`` (None when none does)."""
    _require_columns(ledger, [*selector, "timestamp"], f"selecting runs by {sorted(selector)}")
    mask = pd.Series(True, index=ledger.index)
    for column, expected in selector.items():
        mask &= ledger[column].map(lambda v, e=expected: _cell_matches(v, e))
    hits = _by_recency(ledger[mask])
    return None if hits.empty else hits.iloc[-1]


def _only_experiments(ledger: pd.DataFrame, experiments: Sequence[str] | None) -> pd.DataFrame:
    if not experiments:
        return ledger
    _require_columns(ledger, ["experiment"], "--experiment")
    return ledger[ledger["experiment"].isin(list(experiments))]


def _fraction(row: pd.Series, metric: str) -> float:
    value = float(row[metric])
    if not 0.0 <= value <= 1.0:
        raise ValueError(
            f"ledger run {row.get('run_id', '?')!r} has {metric}={row[metric]!r}; the ledger "
            "holds fractions in [0, 1]"
        )
    return value


# --------------------------------------------------------------------------------------------
# Tables


def build_table(spec: TableSpec, ledger: pd.DataFrame, published: pd.DataFrame) -> pd.DataFrame:
    """Tidy table: one line per (method, dataset, metric), numbers in percent.

    Columns: ``table, method, dataset, metric, published, ours, delta, status, n_images, run_id,
    run_timestamp, source``; ``status`` is ``ok``, ``missing`` (no matching run) or ``not run``
    (a method this project does not implement).
    """
    _require_columns(
        ledger, ["run_id", "timestamp", "dataset", "n_images", *spec.metrics], spec.name
    )
    quoted = published[published["table"] == spec.name]
    lines = []
    for row in spec.rows:
        for dataset in spec.datasets:
            run = None
            if row.ours is not None:
                selector = {**row.ours, **row.ours_per_dataset.get(dataset, {}), "dataset": dataset}
                run = latest_match(ledger, selector)
            for metric in spec.metrics:
                pub = quoted[
                    (quoted["method"] == row.method)
                    & (quoted["dataset"] == dataset)
                    & (quoted["metric"] == metric)
                ]
                pub_value = float(pub["value"].iloc[0]) if len(pub) else math.nan
                ours = 100.0 * _fraction(run, metric) if run is not None else math.nan
                status = "not run" if row.ours is None else "ok" if run is not None else "missing"
                lines.append(
                    {
                        "table": spec.name,
                        "method": row.method,
                        "dataset": dataset,
                        "metric": metric,
                        "published": pub_value,
                        "ours": ours,
                        "delta": ours - pub_value,
                        "status": status,
                        "n_images": run["n_images"] if run is not None else "",
                        "run_id": run["run_id"] if run is not None else "",
                        "run_timestamp": run["timestamp"] if run is not None else "",
                        "source": pub["source"].iloc[0] if len(pub) else "",
                    }
                )
    return pd.DataFrame(lines)


def _fmt(value: float, signed: bool = False) -> str:
    return f"{value:+.1f}" if signed else f"{value:.1f}"


def display_table(tidy: pd.DataFrame, spec: TableSpec) -> pd.DataFrame:
    """One line per (method, dataset); per metric: paper, ours, delta (strings, one decimal)."""
    out = []
    for (method, dataset), group in tidy.groupby(["method", "dataset"], sort=False):
        line = {"Method": method, "Dataset": DATASET_NAMES.get(dataset, dataset)}
        for metric in spec.metrics:
            cell = group[group["metric"] == metric].iloc[0]
            name = METRICS[metric]
            line[f"{name} paper"] = (
                NOT_PUBLISHED if math.isnan(cell["published"]) else _fmt(cell["published"])
            )
            line[f"{name} ours"] = {"ok": _fmt(cell["ours"]), "missing": MISSING}.get(
                cell["status"], ""
            )
            line[f"Δ {name}"] = "" if math.isnan(cell["delta"]) else _fmt(cell["delta"], True)
        line["n"] = group["n_images"].iloc[0]
        sources = [s for s in group["source"] if s]
        line["Source"] = sources[0] if sources else "this project"
        out.append(line)
    return pd.DataFrame(out)


def to_markdown(frame: pd.DataFrame) -> str:
    """A GitHub-flavoured Markdown table (text left-aligned, every other column right-aligned)."""

    def cells(values: Iterable[object]) -> str:
        return "| " + " | ".join(str(v).replace("|", r"\|") for v in values) + " |"

    rule = ["---" if c in _TEXT_COLUMNS else "---:" for c in frame.columns]
    lines = [cells(frame.columns), cells(rule)]
    lines += [cells(values) for values in frame.itertuples(index=False)]
    return "\n".join(lines) + "\n"


def to_latex(frame: pd.DataFrame) -> str:
    """A ``booktabs`` tabular fragment (needs ``\\usepackage{booktabs}``), cells LaTeX-escaped."""
    column_format = "".join("l" if c in _TEXT_COLUMNS else "r" for c in frame.columns)
    styler = (
        frame.style.hide(axis="index").format(escape="latex").format_index(escape="latex", axis=1)
    )
    latex = styler.to_latex(hrules=True, column_format=column_format)
    # pdflatex without extra packages knows neither of these characters.
    return latex.replace("Δ", r"$\Delta$").replace(NOT_PUBLISHED, "---")


def write_tables(
    ledger_path: str | os.PathLike,
    out_dir: str | os.PathLike,
    names: Sequence[str] | None = None,
    experiments: Sequence[str] | None = None,
    published_path: str | os.PathLike = PUBLISHED_CSV,
) -> list[Path]:
    """Write ``<name>.md``, ``<name>.tex`` and ``<name>.csv`` for each table; return the paths.

    ``experiments``: only ledger rows of these experiments count (e.g. keep ablation runs with a
    ``limit`` out of Table 1); by default every row matching a cell's settings does.
    """
    names = list(TABLES) if names is None else list(names)
    unknown = [n for n in names if n not in TABLES]
    if unknown:
        raise ValueError(f"unknown table(s) {unknown}; choose from {list(TABLES)}")
    ledger = _only_experiments(read_ledger(ledger_path), experiments)
    published = read_published(published_path)
    out_dir = Path(out_dir)
    written = []
    for name in names:
        spec = TABLES[name]
        tidy = build_table(spec, ledger, published)
        frame = display_table(tidy, spec)
        note = (
            f"Percent. paper: as published (Source); ours: the most recent matching run in "
            f"`{ledger_path}` (by timestamp), n = images scored; Δ = ours − paper; "
            f"{MISSING} = no matching run; {NOT_PUBLISHED} = no published number on file "
            "(eval/published.csv); blank = not run by this project.\n"
        )
        markdown = f"### {spec.title}\n\n{to_markdown(frame)}\n{note}"
        for suffix, text in (
            (".md", markdown),
            (".tex", to_latex(frame)),
            (".csv", tidy.to_csv(index=False)),
        ):
            path = out_dir / f"{name}{suffix}"
            write_text_atomic(path, text)
            written.append(path)
    return written


# --------------------------------------------------------------------------------------------
# Sweeps


def _sweep_axis(values: pd.Series) -> pd.Series | None:
    """Numeric x for each value (a list of equal numbers counts as that number), else None."""
    numbers = []
    for text in values:
        parsed = _parse_floats(text)
        if not parsed or len(set(parsed)) != 1:
            return None
        numbers.append(parsed[0])
    return pd.Series(numbers, index=values.index)


def plot_sweep(
    ledger_path: str | os.PathLike,
    param: str,
    out_dir: str | os.PathLike,
    experiments: Sequence[str] | None = None,
) -> list[Path]:
    """Plot mIoU and pixel accuracy (percent) against ``param`` for each experiment varying it.

    One PNG per experiment (plus a CSV of the plotted points), one curve per dataset (and per
    value of any other setting that varies within the experiment). Repeated points keep the most
    recent run. Returns the written paths.
    """
    from matplotlib.figure import Figure  # the OO API renders with Agg, no display needed

    ledger = read_ledger(ledger_path)
    column = param.split(".")[-1]  # accept Hydra names such as segmenter.kl_threshold
    if column not in ledger.columns:
        raise ValueError(
            f"--sweep {param!r}: the ledger has no column {column!r}; sweepable columns are "
            f"{[c for c in SETTING_COLUMNS if c in ledger.columns]}"
        )
    _require_columns(ledger, ["experiment", "dataset", "timestamp", *METRICS], "a sweep plot")
    ledger = _only_experiments(ledger, experiments)
    out_dir = Path(out_dir)
    written: list[Path] = []
    for name, runs in _by_recency(ledger).groupby("experiment", sort=True):
        if runs[column].nunique() < 2:
            continue
        others = [c for c in SETTING_COLUMNS if c in runs.columns and c != column]
        varying = [c for c in others if runs[c].nunique() > 1]
        keys = ["dataset", *varying]
        points = runs.drop_duplicates([*keys, column], keep="last").copy()
        x = _sweep_axis(points[column])
        points["x"] = x if x is not None else points[column]
        for metric in METRICS:
            points[metric] = 100.0 * pd.to_numeric(points[metric])
        fig = Figure(figsize=(10, 4), layout="constrained")
        axes = fig.subplots(1, 2)
        for key, curve in points.groupby(keys, sort=True):
            curve = curve.sort_values("x")
            label = ", ".join(str(k) for k in (key if isinstance(key, tuple) else (key,)))
            for ax, metric in zip(axes, METRICS, strict=True):
                ax.plot(curve["x"], curve[metric], "o-", label=label)
        for ax, metric in zip(axes, METRICS, strict=True):
            ax.set_xlabel(column)
            ax.set_ylabel(f"{METRICS[metric]} (%)")
            ax.grid(alpha=0.3)
        axes[0].legend(fontsize="small")
        fig.suptitle(f"{name}: sweep of {column}")
        stem = re.sub(r"[^A-Za-z0-9_.-]+", "_", f"sweep_{name}_{column}")
        png, csv = out_dir / f"{stem}.png", out_dir / f"{stem}.csv"
        with atomic_open(png, "wb") as f:
            fig.savefig(f, format="png", dpi=120)
        columns = ["experiment", *keys, column, *METRICS, "n_images", "run_id", "timestamp"]
        write_text_atomic(
            csv, points[[c for c in columns if c in points.columns]].to_csv(index=False)
        )
        written += [png, csv]
    if not written:
        where = f"experiments {list(experiments)}" if experiments else "any experiment"
        raise ValueError(
            f"no ledger rows of {where} in {str(ledger_path)!r} vary {column!r} (need at least two "
            f"values); run a sweep first, e.g. `python -m eval -m +experiment=ablation_kl`"
        )
    return written


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m eval.tables", description=__doc__.split("\n")[0]
    )
    parser.add_argument("--ledger", default="outputs/ledger.csv", help="run ledger CSV")
    parser.add_argument("--out", default="outputs/tables", help="output folder")
    parser.add_argument(
        "--table", action="append", choices=list(TABLES), help="table(s) to write (default: all)"
    )
    parser.add_argument("--sweep", metavar="PARAM", help="plot metrics against this ledger column")
    parser.add_argument(
        "--experiment", action="append", help="only ledger rows of this experiment (repeatable)"
    )
    args = parser.parse_args(argv)
    if args.sweep:
        paths = plot_sweep(args.ledger, args.sweep, args.out, args.experiment)
    else:
        paths = write_tables(args.ledger, args.out, args.table, args.experiment)
    for path in paths:
        print(path)


if __name__ == "__main__":
    main()
