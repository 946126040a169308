#!/usr/bin/env bash
# The GPU measurements of the scale-and-speed work, prepared to run in one go on a CUDA machine
# (none has been available where this was written, so it is meant for whoever next has one).
#
#   bench/gpu_check.sh wheels                   # on a machine with a package index: fill .whl/
#   bench/gpu_check.sh [STAGE ...]              # on the GPU machine; default: speed merge harness nccl
#
# Stages (each writes its Markdown/log under $OUT, default outputs/gpu_check/):
#   speed    bench_pipeline.py, SD 1.4 config, fp16, batch 1 4 8 16: images/s, peak memory, the
#            time per stage and the share of pixels labelled as by fp32 (goal: >= 20 images/s
#            with >= 99 % on one H100), plus bf16 at batch 8 and the capture variants. ~4 min.
#   merge    bench_merge.py --device cuda: the merge on the GPU (KL in float64, and in float32 with
#            the float64 re-check) against the elementwise form. ~1 min.
#   harness  bench_harness.py: the loop's host work per 512-px image (goal: <= 10 ms on the main
#            thread, for >= 100 images/s), then the whole loop on the GPU: the tiny model at 512 px,
#            256 synthetic images, batch 16 (images/s in harness_results.csv). ~2 min.
#   nccl     torchrun over all GPUs (NCCL) on the tiny model; results.csv lands in $OUT. ~1 min.
#   compile  bench_pipeline.py --compile (inductor) at batch 8; compiling takes minutes.
#   sdxl     the SDXL-shaped tiny model in fp16 on CUDA (VAE upcast, CUDA noise draw) with DiffSeg,
#            K-Means-C and DiffCut in one run, tests/diffseg/test_passes.py (DiffCut's pass in float16
#            under autocast against a transcription of its code), and bench_segmenters.py (shared
#            UNet passes against a pass each; DiffCut's pass with and without DiffSeg's capture)
#            on the SD 1.4 config at 512, batch 4. ~2 min.
#
# The machine needs a CUDA build of torch and the project's dependencies (`make setup` does both).
# An air-gapped node that has torch and transformers but not the rest can take the pure-Python
# wheels `wheels` downloads: copy .whl/ along and set WHEELS=.whl.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
OUT=${OUT:-outputs/gpu_check}

if [[ ${1:-} == wheels ]]; then
    # The versions of this environment; all pure Python. antlr4 4.9 ships only as source, so it
    # is built into a wheel here.
    mkdir -p .whl
    specs=$($PY - <<'EOF'
from importlib.metadata import version
print(" ".join(f"{n}=={version(n)}" for n in ("diffusers", "hydra-core", "omegaconf", "importlib-metadata")))
EOF
)
    # shellcheck disable=SC2086
    $PY -m pip download --quiet --no-deps --only-binary=:all: -d .whl $specs
    $PY -m pip wheel --quiet --no-deps -w .whl "antlr4-python3-runtime==4.9.3"
    ls -l .whl
    exit 0
fi

if [[ -n ${WHEELS:-} ]]; then
    site=$(mktemp -d)
    $PY -m pip install --quiet --no-index --no-deps --no-compile --target "$site" "$WHEELS"/*.whl
    export PYTHONPATH=$site
fi
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
export WANDB_MODE=offline HF_HUB_OFFLINE=1
mkdir -p "$OUT"
$PY -c "import torch; assert torch.cuda.is_available(), 'no CUDA device: this script is for a GPU machine'"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"
$PY -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda)" | tee -a "$OUT/gpu.txt"

stages=("$@")
[[ ${#stages[@]} -gt 0 ]] || stages=(speed merge harness nccl)
for stage in "${stages[@]}"; do
    echo "== $stage"
    case $stage in
    speed)
        $PY bench/bench_pipeline.py --device cuda --models sd14 --batch-sizes 1 4 8 16 \
            --warmup 1 --repeats 3 --compare-capture --append "$OUT/RESULTS.md"
        $PY bench/bench_pipeline.py --device cuda --dtype bfloat16 --models sd14 --batch-sizes 8 \
            --warmup 1 --repeats 3 --append "$OUT/RESULTS.md"
        ;;
    merge)
        $PY bench/bench_merge.py --device cuda | tee "$OUT/merge.md"
        ;;
    harness)
        $PY bench/bench_harness.py --images 64 --batch-sizes 1 8 16 --append "$OUT/RESULTS.md"
        run=outputs/gpu_check_harness
        rm -rf "$run"
        $PY -m eval dataset=synthetic model=tiny device=cuda dataset.resolution=512 limit=256 \
            batch_size=16 num_workers=8 logger=csv "hydra.run.dir=$run" \
            "paths.ledger=$run/ledger.csv" 2>&1 | tee "$OUT/harness.log"
        cp "$run/results.csv" "$OUT/harness_results.csv"
        ;;
    nccl)
        gpus=$(nvidia-smi -L | wc -l)
        run=outputs/gpu_check_nccl  # outside $OUT: a run writes many files
        rm -rf "$run"
        torchrun --standalone --nproc_per_node="$gpus" -m eval dataset=synthetic model=tiny \
            device=cuda limit=32 batch_size=8 logger=csv "hydra.run.dir=$run" \
            "paths.ledger=$run/ledger.csv" 2>&1 | tee "$OUT/nccl.log"
        cp "$run/results.csv" "$OUT/nccl_results.csv"
        ;;
    compile)
        $PY bench/bench_pipeline.py --device cuda --models sd14 --batch-sizes 8 --compile \
            --warmup 1 --repeats 3 --append "$OUT/RESULTS.md"
        ;;
    sdxl)
        run=outputs/gpu_check_sdxl
        rm -rf "$run"
        $PY -m eval dataset=synthetic model=tiny_xl model.dtype=float16 device=cuda limit=16 \
            batch_size=8 protocol=diffcut protocol.resolution=256 segmenter.num_points=16 \
            +segmenter@segmenters.kmeans_c=kmeans_c +segmenter@segmenters.diffcut=diffcut \
            logger=csv "hydra.run.dir=$run" "paths.ledger=$run/ledger.csv" 2>&1 | tee "$OUT/sdxl.log"
        cp "$run/ledger.csv" "$OUT/sdxl_ledger.csv"
        $PY -m pytest -q tests/diffseg/test_passes.py 2>&1 | tee "$OUT/passes.log"
        (cd bench && $PY bench_segmenters.py --device cuda --resolution 512 --batch 4 \
            --repeats 3 --append "../$OUT/RESULTS.md")
        ;;
    *)
        echo "unknown stage '$stage': use speed, merge, harness, nccl, compile, sdxl or wheels" >&2
        exit 2
        ;;
    esac
done
echo "done: $OUT (merge RESULTS.md into bench/RESULTS.md with the GPU's name)"
