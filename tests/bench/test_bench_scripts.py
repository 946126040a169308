"""Each benchmark of ``bench/`` runs to its table on the tiny model with small sizes: the scripts
reach into the harness's internals (the loop, the pipeline's passes, the caches), so a change
there that a bench does not follow is caught here, not by the next person timing it. Timings are
not asserted (benchmarks measure, tests check)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers import offline_env

ROOT = Path(__file__).resolve().parents[2]
TINY = ("--models", "tiny", "--resolution", "128")
SCRIPTS = {
    "bench_harness.py": ("--images", "3", "--repeats", "1", "--batch-sizes", "1", "2"),
    "bench_attention_cache.py": TINY,
    "bench_pipeline.py": (*TINY, "--warmup", "0"),
    "bench_segmenters.py": (*TINY, "--repeats", "1"),
    "bench_data.py": (
        "--n-cityscapes",
        "4",
        "--n-coco",
        "4",
        "--resolution",
        "64",
        "--workers",
        "0",
        "--batch-size",
        "2",
    ),
    "bench_fingerprint.py": ("--unet-mib", "1", "--vae-mib", "1", "--text-mib", "1"),
    "bench_merge.py": ("--skip-reference", "--repeat", "1"),
    "bench_toy_model.py": (
        str(ROOT / "models" / "tiny_trained"),
        "--images",
        "2",
        "--tune-images",
        "2",
        "--resolution",
        "128",
    ),
}


def test_every_bench_script_is_listed() -> None:
    listed = set(SCRIPTS) | {"bench_config_errors.py"}  # times CLI refusals: test_preflight's
    assert {p.name for p in (ROOT / "bench").glob("bench_*.py")} == listed


@pytest.mark.slow
@pytest.mark.parametrize("script", sorted(SCRIPTS))
def test_a_bench_runs_to_its_table(script: str, tmp_path: Path) -> None:
    env = offline_env(DIFFSEG_HOME=str(tmp_path))
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    done = subprocess.run(
        [sys.executable, str(ROOT / "bench" / script), *SCRIPTS[script]],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    lines = done.stdout.splitlines()
    tables = [  # a Markdown table: a header, its rule, a row
        i
        for i in range(1, len(lines) - 1)
        if set(lines[i]) <= set("|-: ") and "-" in lines[i]
        and lines[i - 1].startswith("|") and lines[i + 1].startswith("|")
    ]  # fmt: skip
    assert tables, done.stdout[-2000:]
