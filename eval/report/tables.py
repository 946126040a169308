"""Paper tables and sweep plots from the run ledger: ``python -m eval.report.tables``.

Each table (``eval.results.paper``) puts our numbers beside the published ones (``eval/report/published.csv``, one
number per line with its paper and table), fractions shown as percentages, with a delta column. A
cell is filled only by a *comparable* run: a ledger row with no deviations from the cell's published
setting (``eval.results.paper.deviations``); the most recent one (by ``timestamp``, then by position in the
ledger) when there are several. Other runs of the same method and dataset are listed under the table
with their deviations, never in a cell; ``--explain`` says for every ledger row which cell it fills
or why none. A cell with no comparable run says ``not run``. Written as Markdown, a LaTeX
``booktabs`` tabular fragment and a tidy CSV (one line per cell, full precision, with the ledger
``run_id`` behind each of our numbers), and printed.

``python -m eval.report.tables --sweep kl_threshold`` instead plots a sweep (``eval.report.sweeps``).
``python -m eval.report.tables --verify`` is the gate after a full reproduction: it exits non-zero when a
filled cell of a published column lies further from the published number than the dataset's
tolerance (``eval.results.paper.VERIFY_TOLERANCE``), or when no cell is filled, listing each such cell.
"""

from __future__ import annotations

import argparse
import functools
import math
import os
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import pandas as pd
from omegaconf import OmegaConf

from eval import PROJECT_ROOT, description, home
from eval.atomic import write_text_atomic
from eval.results import ledger as ledger_io
from eval.results import paper
from eval.results.columns import METRICS
from eval.results.ledger import by_recency

PUBLISHED_CSV = Path(__file__).with_name("published.csv")
NOT_PUBLISHED = "—"
NOT_RUN = "not run"
_TEXT_COLUMNS = {"Method", "Dataset", "Source"}  # left-aligned; the others hold numbers


# --------------------------------------------------------------------------------------------
# Reading


@functools.cache
def dataset_titles(conf_dir: Path = PROJECT_ROOT / "conf") -> dict[str, str]:
    """Dataset name -> the title tables print: ``name`` and ``title`` of each
    ``conf/dataset/*.yaml`` (read as text, so the tables need neither Hydra nor the loaders)."""
    titles = {}
    for path in sorted((conf_dir / "dataset").glob("*.yaml")):
        cfg = OmegaConf.load(path)
        if cfg.get("name") and cfg.get("title"):
            titles[cfg.name] = cfg.title
    return titles


def read_ledger(path: str | os.PathLike) -> list[dict[str, Any]]:
    """The ledger's rows, JSON columns decoded, in file order; none for a missing or empty file.
    A malformed line raises :class:`eval.results.ledger.LedgerError` naming the file and the line."""
    return [ledger_io.parse_row(r) for r in ledger_io.read_rows(path)]


def read_published(path: str | os.PathLike = PUBLISHED_CSV) -> pd.DataFrame:
    """Published numbers (percent): columns ``table, method, dataset, metric, value, source``."""
    return pd.read_csv(path, dtype={"value": float})


def _only_experiments(
    rows: Sequence[Mapping[str, Any]], experiments: Sequence[str] | None
) -> list[Mapping[str, Any]]:
    if not experiments:
        return list(rows)
    return [r for r in rows if r.get("experiment") in set(experiments)]


def _fraction(row: Mapping[str, Any], metric: str) -> float:
    value = float(row[metric])
    if not 0.0 <= value <= 1.0:
        raise ValueError(
            f"ledger run {row.get('run_id', '?')!r} has {metric}={row[metric]!r}; the ledger "
            "holds fractions in [0, 1]"
        )
    return value


def comparable_runs(rows: Sequence[Mapping[str, Any]]) -> dict[str, Mapping[str, Any]]:
    """Cell key (``eval.results.paper.Cell.key``) -> the most recent run without deviations."""
    filled: dict[str, Mapping[str, Any]] = {}
    for row in by_recency(rows):
        cell = paper.target(row)
        if cell is not None and not paper.deviations(row):
            filled[cell.key] = row
    return filled


# --------------------------------------------------------------------------------------------
# Tables


def build_table(
    table: paper.Table, rows: Sequence[Mapping[str, Any]], published: pd.DataFrame
) -> pd.DataFrame:
    """Tidy table: one line per (method, dataset, metric, variant), numbers in percent.

    Columns: ``table, method, dataset, metric, variant, published, ours, delta, status, n_images,
    run_id, run_timestamp, source``; ``status`` is ``ok``, ``not run`` (no comparable run) or
    ``quoted`` (a method this project does not implement).
    """
    filled = comparable_runs(rows)
    quoted = published[published["table"] == table.name]
    lines = []
    for method in table.methods:
        for dataset in table.datasets:
            for metric in table.metrics:
                pub = quoted[
                    (quoted["method"] == method.name)
                    & (quoted["dataset"] == dataset)
                    & (quoted["metric"] == metric)
                ]
                pub_value = float(pub["value"].iloc[0]) if len(pub) else math.nan
                for variant in table.variants:
                    cell = paper.Cell(table, method, dataset, variant)
                    run = filled.get(cell.key)
                    ours = 100.0 * _fraction(run, metric) if run is not None else math.nan
                    status = "quoted" if method.segmenter is None else NOT_RUN
                    lines.append(
                        {
                            "table": table.name,
                            "method": method.name,
                            "dataset": dataset,
                            "metric": metric,
                            "variant": variant.key,
                            "published": pub_value,
                            "ours": ours,
                            "delta": ours - pub_value,
                            "status": "ok" if run is not None else status,
                            "n_images": run["n_images"] if run is not None else "",
                            "run_id": run["run_id"] if run is not None else "",
                            "run_timestamp": run["timestamp"] if run is not None else "",
                            "source": pub["source"].iloc[0] if len(pub) else "",
                        }
                    )
    return pd.DataFrame(lines)


def other_runs(table: paper.Table, rows: Sequence[Mapping[str, Any]]) -> list[dict[str, str]]:
    """The runs that target a cell of ``table`` but deviate from its setting (never in a cell)."""
    out = []
    for row in rows:
        cell = paper.target(row)
        problems = paper.deviations(row)
        if cell is None or cell.table is not table or not problems:
            continue
        scores = ", ".join(
            f"{METRICS[m]} {100 * float(row[m]):.1f}" for m in table.metrics if row.get(m, "") != ""
        )
        out.append(
            {
                "run_id": str(row["run_id"]),
                "method": cell.method.name,
                "dataset": dataset_titles().get(cell.dataset, cell.dataset),
                "column": cell.variant.label,
                "scores": scores,
                "deviations": "; ".join(problems),
            }
        )
    return out


def explain(rows: Sequence[Mapping[str, Any]]) -> list[str]:
    """For every ledger row: the cell it fills, or why it fills none."""
    shown = {id(r): key for key, r in comparable_runs(rows).items()}
    lines = []
    for row in rows:
        cell, problems = paper.target(row), paper.deviations(row)
        name = f"{row.get('run_id', '?')} ({row.get('timestamp', '')}):"
        if cell is None:
            lines.append(f"{name} fills no cell: {'; '.join(problems)}")
        elif problems:
            lines.append(f"{name} targets {cell.key} but is not comparable: {'; '.join(problems)}")
        elif id(row) in shown:
            lines.append(f"{name} fills {cell.key}")
        else:
            lines.append(f"{name} comparable with {cell.key}, but a more recent run fills it")
    return lines


def verify(
    rows: Sequence[Mapping[str, Any]], published: pd.DataFrame, names: Sequence[str] | None = None
) -> tuple[int, list[str]]:
    """The filled cells of the published columns (each table's first variant) checked against
    their published numbers: the number of cells checked and one line per cell further than
    ``eval.results.paper.VERIFY_TOLERANCE`` from it (expected, got, tolerance, run)."""
    checked, failures = 0, []
    for name in names or paper.TABLES:
        table = paper.TABLES[name]
        tidy = build_table(table, rows, published)
        filled = tidy[(tidy["status"] == "ok") & (tidy["variant"] == table.variants[0].key)]
        for cell in filled.itertuples(index=False):
            if math.isnan(cell.published):
                continue
            checked += 1
            tolerance = paper.VERIFY_TOLERANCE[cell.dataset]
            if abs(cell.delta) > tolerance:
                failures.append(
                    f"{cell.table}/{cell.method}/{cell.dataset}/{cell.variant} "
                    f"{METRICS[cell.metric]}: expected {_fmt(cell.published)}, got "
                    f"{cell.ours:.2f} ({_fmt(cell.delta, True)}), tolerance {tolerance} "
                    f"(run {cell.run_id})"
                )
    return checked, failures


def _fmt(value: float, signed: bool = False) -> str:
    return f"{value:+.1f}" if signed else f"{value:.1f}"


def display_table(tidy: pd.DataFrame, table: paper.Table) -> pd.DataFrame:
    """One line per (method, dataset); per metric: paper, ours per variant, delta of the first
    variant (the published protocol's) -- strings, one decimal."""
    out = []
    for (method, dataset), group in tidy.groupby(["method", "dataset"], sort=False):
        line = {"Method": method, "Dataset": dataset_titles().get(dataset, dataset)}
        for metric in table.metrics:
            cells = group[group["metric"] == metric]
            name = METRICS[metric]
            published = cells["published"].iloc[0]
            line[f"{name} paper"] = NOT_PUBLISHED if math.isnan(published) else _fmt(published)
            for k, variant in enumerate(table.variants):
                cell = cells[cells["variant"] == variant.key].iloc[0]
                shown = {"ok": _fmt(cell["ours"]), NOT_RUN: NOT_RUN}.get(cell["status"], "")
                line[f"{name} {variant.label}"] = shown
                if k == 0:
                    delta = cell["delta"]
                    line[f"Δ {name}"] = "" if math.isnan(delta) else _fmt(delta, True)
        ns = [str(n) for n in group["n_images"] if str(n)]
        line["n"] = ns[0] if ns else ""
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


def _other_runs_markdown(table: paper.Table, rows: Sequence[Mapping[str, Any]]) -> str:
    others = other_runs(table, rows)
    if not others:
        return ""
    lines = [
        f"- `{o['run_id']}` {o['method']}, {o['dataset']} [{o['column']}]: {o['scores']}; "
        f"not comparable: {o['deviations']}"
        for o in others
    ]
    return "\nOther runs (listed, never in a cell):\n\n" + "\n".join(lines) + "\n"


def render_tables(
    ledger_path: str | os.PathLike,
    names: Sequence[str] | None = None,
    experiments: Sequence[str] | None = None,
    published_path: str | os.PathLike = PUBLISHED_CSV,
) -> dict[str, dict[str, str]]:
    """Table name -> ``{".md": ..., ".tex": ..., ".csv": ...}``. A missing or empty ledger gives
    the published tables with every one of our cells ``not run``."""
    names = list(paper.TABLES) if names is None else list(names)
    unknown = [n for n in names if n not in paper.TABLES]
    if unknown:
        raise ValueError(f"unknown table(s) {unknown}; choose from {list(paper.TABLES)}")
    rows = _only_experiments(read_ledger(ledger_path), experiments)
    published = read_published(published_path)
    out = {}
    for name in names:
        table = paper.TABLES[name]
        tidy = build_table(table, rows, published)
        frame = display_table(tidy, table)
        note = (
            f"Percent. paper: as published (Source); ours: the most recent run in "
            f"`{ledger_path}` with no deviation from the published setting (model, dtype, "
            f"resolution, split and all its images, segmenter, protocol, preprocessing), n = "
            f"images scored; Δ = ours − paper; {NOT_RUN} = no comparable run; {NOT_PUBLISHED} = "
            "no published number on file (eval/report/published.csv); blank = a method this project "
            "does not run. `python -m eval.report.tables --explain` says why a run fills no cell.\n"
        )
        markdown = f"### {table.title}\n\n{to_markdown(frame)}\n{note}"
        markdown += _other_runs_markdown(table, rows)
        out[name] = {".md": markdown, ".tex": to_latex(frame), ".csv": tidy.to_csv(index=False)}
    return out


def write_tables(
    ledger_path: str | os.PathLike,
    out_dir: str | os.PathLike,
    names: Sequence[str] | None = None,
    experiments: Sequence[str] | None = None,
    published_path: str | os.PathLike = PUBLISHED_CSV,
) -> list[Path]:
    """Write ``<name>.md``, ``<name>.tex`` and ``<name>.csv`` for each table; return the paths.

    ``experiments``: only ledger rows of these experiments count; by default every comparable
    row does.
    """
    written = []
    for name, texts in render_tables(ledger_path, names, experiments, published_path).items():
        for suffix, text in texts.items():
            path = Path(out_dir) / f"{name}{suffix}"
            write_text_atomic(path, text)
            written.append(path)
    return written


def _verify_gate(
    ledger_path: str, names: Sequence[str] | None, experiments: Sequence[str] | None
) -> None:
    """``--verify``: prints the verdict; ``SystemExit`` (non-zero) listing the cells outside
    their tolerance, or when no published cell is filled."""
    rows = _only_experiments(read_ledger(ledger_path), experiments)
    checked, failures = verify(rows, read_published(), names)
    if failures:
        lines = "\n".join(f"  {line}" for line in failures)
        raise SystemExit(
            f"verify: {len(failures)} of {checked} filled cell(s) outside the tolerance "
            f"(eval.results.paper.VERIFY_TOLERANCE, percentage points):\n{lines}"
        )
    if not checked:
        raise SystemExit(
            f"verify: no published cell is filled by {ledger_path}; nothing reproduced "
            "(python -m eval.report.tables --explain says why each run fills none)"
        )
    print(f"verify: {checked} filled cell(s), each within its dataset's tolerance")


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m eval.report.tables", description=description(__doc__)
    )
    outputs = home() / "outputs"
    parser.add_argument("--ledger", default=str(outputs / "ledger.csv"), help="run ledger CSV")
    parser.add_argument("--out", default=str(outputs / "tables"), help="output folder")
    parser.add_argument(
        "--table", action="append", choices=list(paper.TABLES), help="table(s) (default: all)"
    )
    parser.add_argument("--sweep", metavar="PARAM", help="plot metrics against this ledger column")
    parser.add_argument(
        "--experiment", action="append", help="only ledger rows of this experiment (repeatable)"
    )
    parser.add_argument(
        "--explain", action="store_true", help="say, for every ledger row, which cell it fills"
    )
    parser.add_argument(
        "--verify",
        action="store_true",
        help="exit non-zero unless every filled published cell is within its dataset's tolerance",
    )
    args = parser.parse_args(argv)
    try:
        if args.verify:
            _verify_gate(args.ledger, args.table, args.experiment)
            return
        if args.explain:
            rows = _only_experiments(read_ledger(args.ledger), args.experiment)
            print("\n".join(explain(rows)) if rows else f"{args.ledger}: no runs recorded")
            return
        if args.sweep:
            from eval.report.sweeps import plot_sweep

            paths = plot_sweep(args.ledger, args.sweep, args.out, args.experiment)
        else:
            if not ledger_io.read_rows(args.ledger):
                print(f"{args.ledger}: no runs recorded yet; our cells are all {NOT_RUN}\n")
            paths = write_tables(args.ledger, args.out, args.table, args.experiment)
            for path in paths:
                if path.suffix == ".md":
                    print(path.read_text(encoding="utf-8"))
    except (ledger_io.LedgerError, ValueError) as e:
        raise SystemExit(f"Error: {e}") from None
    for path in paths:
        print(path)


if __name__ == "__main__":
    main()
