"""What fingerprinting a model folder's weights costs (``eval.models.digests.weights_fingerprint``): the
first time (every weight file's SHA-256) against later runs (the hashes read back by each file's
size, mtime and inode, ``eval.models.digests``), on a folder of SD 1.x's layout with random bytes in
place of the weights.

    python bench/bench_fingerprint.py [--unet-mib 1640] [--vae-mib 160] [--text-mib 235]
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from timing import timed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--unet-mib", type=int, default=1640)  # SD 1.5's fp16 UNet
    parser.add_argument("--vae-mib", type=int, default=160)
    parser.add_argument("--text-mib", type=int, default=235)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        os.environ["DIFFSEG_HOME"] = tmp  # the hash record goes there
        from eval.models.digests import weights_fingerprint

        model = Path(tmp) / "model"
        for part, mib in (
            ("unet", args.unet_mib),
            ("vae", args.vae_mib),
            ("text_encoder", args.text_mib),
        ):
            (model / part).mkdir(parents=True)
            (model / part / "config.json").write_text("{}")
            with open(model / part / "model.safetensors", "wb") as f:
                for _ in range(mib):
                    f.write(os.urandom(2**20))
        (model / "model_index.json").write_text("{}")
        cfg = {"model": str(model)}
        cold, first = timed("cpu", weights_fingerprint, cfg)
        warm, again = timed("cpu", weights_fingerprint, cfg)
        assert first == again
    total = args.unet_mib + args.vae_mib + args.text_mib
    print("\n| weights (MiB) | first run (s) | later runs (s) | first / later |")
    print("|---:|---:|---:|---:|")
    print(f"| {total} | {cold:.2f} | {warm:.4f} | {cold / warm:.0f}x |")


if __name__ == "__main__":
    main()
