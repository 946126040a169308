"""Tuning without peeking, step 1 -> step 2: the best KL threshold per dataset among the ledger rows
of a tuning sweep on training images (``+experiment=tune_kl``), and the command that evaluates that
single value on the validation split (``+experiment=tune_kl_val``).

    python -m eval.analysis.tune [--ledger outputs/ledger.csv] [--experiment tune_kl] [--metric miou]

Rows of the experiment whose segmenter uses one threshold for its three iterations count; a
threshold run twice counts with its latest row; rescorings (``rescored_from``) do not count. Ties
go to the smaller threshold. Torch-free.
"""

from __future__ import annotations

import argparse
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from eval import description
from eval.results import ledger as ledger_io


@dataclass(frozen=True)
class Choice:
    """The threshold chosen for one dataset, and what it was chosen on."""

    dataset: str
    kl: float
    value: float
    split: str
    n_images: int
    scores: Mapping[float, float]  # every threshold tried -> its metric
    run_dir: str  # a run of the sweep: its per_image.csv lists the tuning images


def _threshold(row: Mapping[str, Any]) -> float | None:
    values = row.get("kl_threshold")
    if isinstance(values, list) and values and len(set(values)) == 1:
        return float(values[0])
    return None


def choose(
    rows: Sequence[Mapping[str, Any]], experiment: str = "tune_kl", metric: str = "miou"
) -> list[Choice]:
    """The best single KL threshold per dataset among the (parsed) ledger ``rows`` of
    ``experiment``, in ledger order (later rows replace earlier ones of the same threshold)."""
    latest: dict[str, dict[float, Mapping[str, Any]]] = {}
    for row in rows:
        if row.get("experiment") != experiment or row.get("rescored_from"):
            continue
        kl = _threshold(row)
        if kl is not None and ledger_io.version(row) >= 2:
            latest.setdefault(str(row["dataset"]), {})[kl] = row
    choices = []
    for dataset, by_kl in sorted(latest.items()):
        scores = {kl: float(r[metric]) for kl, r in sorted(by_kl.items())}
        best = max(scores, key=lambda kl: (scores[kl], -kl))
        row = by_kl[best]
        choices.append(
            Choice(
                dataset,
                best,
                scores[best],
                str(row.get("split", "")),
                int(row["n_images"]),
                scores,
                str(row.get("run_dir", "")),
            )
        )
    return choices


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m eval.analysis.tune", description=description(__doc__)
    )
    parser.add_argument("--ledger", default="outputs/ledger.csv", help="run ledger CSV")
    parser.add_argument("--experiment", default="tune_kl", help="the tuning sweep's experiment")
    parser.add_argument("--metric", default="miou", choices=("miou", "pixel_accuracy"))
    args = parser.parse_args(argv)
    try:
        rows = [ledger_io.parse_row(r) for r in ledger_io.read_rows(args.ledger)]
    except ledger_io.LedgerError as e:
        raise SystemExit(f"Error: {e}") from None
    choices = choose(rows, args.experiment, args.metric)
    if not choices:
        raise SystemExit(
            f"Error: {args.ledger} has no rows of experiment {args.experiment} with one KL "
            "threshold; run the sweep first: python -m eval -m +experiment=tune_kl"
        )
    for c in choices:
        tried = ", ".join(f"{kl:g}: {100 * v:.2f}" for kl, v in c.scores.items())
        print(f"{c.dataset}: {args.metric} % on {c.n_images} {c.split} images ({tried})")
        print(f"  chosen KL {c.kl:g}; the tuning images are listed in {c.run_dir}/per_image.csv")
        print(
            f"  python -m eval +experiment=tune_kl_val dataset={c.dataset} "
            f"segmenter.kl_threshold={c.kl:g}"
        )


if __name__ == "__main__":
    main()
