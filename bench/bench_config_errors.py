"""How long a config mistake takes to be refused: Hydra's own error, a value our schemas refuse
(``eval.preflight``), and, as the baseline, importing the run's stack (what a schema error cost
when the checks ran inside ``eval.run``). Each command runs ``--repeat`` times in a fresh process
(median wall time); the table gives the ratio to Hydra's own error.

    python bench/bench_config_errors.py [--repeat 3]
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time

from eval import PROJECT_ROOT, description

CASES = {
    "Hydra's own error (dataset.foo=1)": ["-m", "eval", "dataset.foo=1"],
    "schema error (batch_size=0)": ["-m", "eval", "batch_size=0"],
    "unknown key (+bach_size=2)": ["-m", "eval", "+bach_size=2"],
    "segmenter error, needs torch (kl_threshold=-1)": ["-m", "eval", "segmenter.kl_threshold=-1"],
    "baseline: import eval.run": ["-c", "import eval.run"],
}


def seconds(args: list[str], repeat: int, home: str) -> float:
    env = {**os.environ, "DIFFSEG_HOME": home, "OMP_NUM_THREADS": "1"}
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        subprocess.run([sys.executable, *args], cwd=PROJECT_ROOT, env=env, capture_output=True)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=description(__doc__))
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as home:
        results = {name: seconds(cmd, args.repeat, home) for name, cmd in CASES.items()}
        left = os.listdir(home)
    base = next(iter(results.values()))
    print("| case | seconds (median) | x Hydra's error |\n|---|---|---|")
    for name, value in results.items():
        print(f"| {name} | {value:.2f} | {value / base:.1f} |")
    print(f"folders left in DIFFSEG_HOME: {left or 'none'}")


if __name__ == "__main__":
    main()
