"""Paper tables and sweep plots generated from a ledger written here."""

import re

import pandas as pd
import pytest

from eval.tables import main, plot_sweep, to_latex, write_tables

# The ledger columns agreed in .dev/COMMON.md.
COLUMNS = [
    "run_id", "timestamp", "experiment", "protocol", "dataset", "split", "model", "segmenter",
    "timestep", "kl_threshold", "num_points", "refine", "weights", "resolution", "n_images",
    "pixel_accuracy", "miou", "mean_segments", "seconds", "images_per_s", "device", "seed",
    "versions", "git_commit", "run_dir",
]  # fmt: skip

PAPER = {
    "protocol": "diffseg",
    "model": "sd14",
    "segmenter": "diffseg",
    "timestep": 300,
    "kl_threshold": "1.1,1.1,1.1",
    "num_points": 16,
    "refine": False,
    "weights": "",
    "resolution": 512,
    "split": "val",
}


def run(run_id, timestamp, experiment, dataset, acc, miou, n=2175, **settings):
    return {
        **dict.fromkeys(COLUMNS, ""),
        **PAPER,
        **settings,
        "run_id": run_id,
        "timestamp": timestamp,
        "experiment": experiment,
        "dataset": dataset,
        "pixel_accuracy": acc,
        "miou": miou,
        "n_images": n,
    }


def write_ledger(path, rows):
    pd.DataFrame(rows, columns=COLUMNS).to_csv(path, index=False)
    return path


@pytest.fixture
def ledger(tmp_path):
    rows = [
        # Newest matching COCO run listed first: recency is by timestamp, not file order.
        run("coco-new", "2025-03-01T10:00:00", "table1_coco", "coco_stuff27", 0.731, 0.4412),
        run("coco-old", "2025-01-01T10:00:00", "table1_coco", "coco_stuff27", 0.70, 0.40),
        # Newest of all but another KL threshold: not the paper setting, never in Table 1.
        run(
            "coco-kl",
            "2025-04-01T10:00:00",
            "ablation_kl",
            "coco_stuff27",
            0.9,
            0.9,
            kl_threshold="0.9,0.9,0.9",
        ),
        run("kmc", "2025-02-01T10:00:00", "kmeans", "coco_stuff27", 0.5, 0.2, segmenter="kmeans_c"),
        run(
            "voc",
            "2025-02-01T10:00:00",
            "diffcut",
            "voc",
            0.8,
            0.5,
            n=1449,
            protocol="diffcut",
            kl_threshold="1.0,1.0,1.0",
            resolution=1024,
        ),
    ]
    return write_ledger(tmp_path / "ledger.csv", rows)


def markdown_table(text):
    lines = [line for line in text.splitlines() if line.startswith("|")]
    split = [re.split(r"(?<!\\)\|", line)[1:-1] for line in lines]
    return lines, [[cell.strip() for cell in cells] for cells in split]


def test_table1_cells_deltas_and_missing(ledger, tmp_path):
    write_tables(ledger, tmp_path / "out", ["table1"])
    _, rows = markdown_table((tmp_path / "out" / "table1.md").read_text())
    header = rows[0]
    assert header[:8] == [
        "Method",
        "Dataset",
        "Acc paper",
        "Acc ours",
        "Δ Acc",
        "mIoU paper",
        "mIoU ours",
        "Δ mIoU",
    ]
    body = {(r[0], r[1]): dict(zip(header, r, strict=True)) for r in rows[2:]}
    assert len(body) == 10 * 2  # 7 baselines, 2 K-Means, DiffSeg x 2 datasets

    coco = body[("DiffSeg", "COCO-Stuff-27")]
    assert (coco["Acc paper"], coco["Acc ours"], coco["Δ Acc"]) == ("72.5", "73.1", "+0.6")
    assert (coco["mIoU paper"], coco["mIoU ours"], coco["Δ mIoU"]) == ("43.6", "44.1", "+0.5")
    assert coco["n"] == "2175"

    city = body[("DiffSeg", "Cityscapes")]
    assert (city["Acc paper"], city["Acc ours"], city["Δ Acc"]) == ("76.0", "missing", "")
    assert (city["mIoU paper"], city["mIoU ours"]) == ("21.2", "missing")

    stego = body[("STEGO", "Cityscapes")]
    assert (stego["mIoU paper"], stego["mIoU ours"], stego["Acc paper"]) == ("21.0", "", "—")
    kmc = body[("K-Means-C", "COCO-Stuff-27")]
    assert (kmc["Acc ours"], kmc["mIoU ours"], kmc["mIoU paper"], kmc["Δ mIoU"]) == (
        "50.0",
        "20.0",
        "—",
        "",
    )
    assert body[("K-Means-S", "COCO-Stuff-27")]["mIoU ours"] == "missing"


def test_tidy_csv_keeps_full_precision_and_the_run_behind_each_number(ledger, tmp_path):
    write_tables(ledger, tmp_path, ["table1"])
    tidy = pd.read_csv(tmp_path / "table1.csv", keep_default_na=False)
    cell = tidy[
        (tidy["method"] == "DiffSeg")
        & (tidy["dataset"] == "coco_stuff27")
        & (tidy["metric"] == "miou")
    ].iloc[0]
    assert cell["run_id"] == "coco-new"
    assert float(cell["ours"]) == pytest.approx(44.12)
    assert float(cell["delta"]) == pytest.approx(44.12 - 43.6)
    assert cell["status"] == "ok"
    statuses = tidy.groupby("method")["status"].unique().to_dict()
    assert list(statuses["IIC"]) == ["not run"]
    cityscapes = tidy[(tidy["method"] == "DiffSeg") & (tidy["dataset"] == "cityscapes")]
    assert set(cityscapes["status"]) == {"missing"}
    assert set(cityscapes["ours"]) == {""}


def test_diffcut_table(ledger, tmp_path):
    write_tables(ledger, tmp_path, ["diffcut"])
    _, rows = markdown_table((tmp_path / "diffcut.md").read_text())
    header = rows[0]
    body = {(r[0], r[1]): dict(zip(header, r, strict=True)) for r in rows[2:]}
    assert len(body) == 12
    voc = body[("DiffSeg", "VOC")]
    assert (voc["mIoU paper"], voc["mIoU ours"], voc["Δ mIoU"], voc["n"]) == (
        "49.8",
        "50.0",
        "+0.2",
        "1449",
    )
    assert body[("DiffSeg", "ADE20K")]["mIoU ours"] == "missing"
    assert (
        body[("DiffCut", "Cityscapes")]["mIoU paper"],
        body[("DiffCut", "Cityscapes")]["mIoU ours"],
    ) == ("30.6", "")


def test_markdown_structure(ledger, tmp_path):
    write_tables(ledger, tmp_path)
    for name in ("table1", "diffcut"):
        lines, rows = markdown_table((tmp_path / f"{name}.md").read_text())
        assert all(len(r) == len(rows[0]) for r in rows)
        assert re.fullmatch(r"\|( :?-{3,}:? \|)+", lines[1])
        assert all(line.endswith("|") for line in lines)


def test_latex_structure(ledger, tmp_path):
    write_tables(ledger, tmp_path)
    for name in ("table1", "diffcut"):
        tex = (tmp_path / f"{name}.tex").read_text().strip().splitlines()
        spec = re.fullmatch(r"\\begin\{tabular\}\{([lrc]+)\}", tex[0])
        assert spec is not None
        assert tex[-1] == r"\end{tabular}"
        rules = [
            i for i, line in enumerate(tex) if line in (r"\toprule", r"\midrule", r"\bottomrule")
        ]
        assert [tex[i] for i in rules] == [r"\toprule", r"\midrule", r"\bottomrule"]
        rows = [line for line in tex[1:-1] if not line.startswith("\\") or "&" in line]
        assert rows and all(line.endswith(r"\\") for line in rows)
        assert all(len(re.findall(r"(?<!\\)&", line)) + 1 == len(spec.group(1)) for line in rows)
        text = "\n".join(tex)
        assert "Δ" not in text and "—" not in text and r"$\Delta$ mIoU" in text


def test_latex_cells_are_escaped():
    tex = to_latex(pd.DataFrame({"Method": ["a_b & 5%"], "mIoU ours": ["1.0"]}))
    assert r"a\_b \& 5\%" in tex


def test_experiment_filter_and_latest_row(tmp_path):
    rows = [
        run("full", "2025-01-01T00:00:00", "table1_coco", "coco_stuff27", 0.7, 0.4),
        run("quick", "2025-06-01T00:00:00", "smoke", "coco_stuff27", 0.6, 0.3, n=4),
    ]
    ledger = write_ledger(tmp_path / "ledger.csv", rows)
    write_tables(ledger, tmp_path / "all", ["table1"])
    write_tables(ledger, tmp_path / "t1", ["table1"], experiments=["table1_coco"])

    def coco_run(folder):
        tidy = pd.read_csv(folder / "table1.csv", keep_default_na=False)
        return set(
            tidy[(tidy["method"] == "DiffSeg") & (tidy["dataset"] == "coco_stuff27")]["run_id"]
        )

    assert coco_run(tmp_path / "all") == {"quick"}
    assert coco_run(tmp_path / "t1") == {"full"}


def test_bad_ledgers(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"nowhere\.csv"):
        write_tables(tmp_path / "nowhere.csv", tmp_path)
    percent = write_ledger(
        tmp_path / "pct.csv", [run("p", "2025-01-01", "t", "coco_stuff27", 72.5, 43.6)]
    )
    with pytest.raises(ValueError, match="fractions"):
        write_tables(percent, tmp_path)
    pd.DataFrame({"run_id": ["x"]}).to_csv(tmp_path / "thin.csv", index=False)
    with pytest.raises(ValueError, match="lacks column"):
        write_tables(tmp_path / "thin.csv", tmp_path)
    with pytest.raises(ValueError, match="unknown table"):
        write_tables(percent, tmp_path, ["table9"])


def test_sweep_plot_and_points(tmp_path):
    rows = [
        run(
            f"{ds}-{kl}",
            "2025-01-02T00:00:00",
            "ablation_kl",
            ds,
            acc,
            miou,
            kl_threshold=f"{kl},{kl},{kl}",
        )
        for ds, kl, acc, miou in [
            ("coco_stuff27", 0.9, 0.70, 0.40),
            ("coco_stuff27", 1.1, 0.72, 0.43),
            ("cityscapes", 0.9, 0.75, 0.21),
            ("cityscapes", 1.1, 0.74, 0.20),
        ]
    ]
    # An older repeat of one point: the newer run is plotted.
    rows.append(
        run(
            "old",
            "2024-01-01T00:00:00",
            "ablation_kl",
            "cityscapes",
            0.1,
            0.1,
            kl_threshold="0.9,0.9,0.9",
        )
    )
    rows.append(run("other", "2025-01-01T00:00:00", "table1_coco", "coco_stuff27", 0.7, 0.4))
    ledger = write_ledger(tmp_path / "ledger.csv", rows)
    out = tmp_path / "plots"
    main(["--ledger", str(ledger), "--out", str(out), "--sweep", "segmenter.kl_threshold"])
    png = out / "sweep_ablation_kl_kl_threshold.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    points = pd.read_csv(out / "sweep_ablation_kl_kl_threshold.csv")
    assert len(points) == 4 and "old" not in set(points["run_id"])
    city = points[points["dataset"] == "cityscapes"].set_index("run_id")
    assert city.loc["cityscapes-0.9", "miou"] == pytest.approx(21.0)
    assert sorted(p.name for p in out.iterdir()) == [
        "sweep_ablation_kl_kl_threshold.csv",
        png.name,
    ]

    with pytest.raises(ValueError, match="no column 'guidance'"):
        plot_sweep(ledger, "guidance", out)
    with pytest.raises(ValueError, match="vary 'timestep'"):
        plot_sweep(ledger, "timestep", out)


def test_cli_writes_every_format_and_no_temporary_files(ledger, tmp_path, capsys):
    out = tmp_path / "tables"
    main(["--ledger", str(ledger), "--out", str(out)])
    names = sorted(p.name for p in out.iterdir())
    assert names == sorted(
        f"{t}.{ext}" for t in ("table1", "diffcut") for ext in ("md", "tex", "csv")
    )
    assert "table1.tex" in capsys.readouterr().out
