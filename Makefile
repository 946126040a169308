# `make setup` then `make test`. Everything runs from the project's own virtual environment.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# torch first, the build this machine can use. The package index's Linux wheel of torch is the
# CUDA build (GBs of nvidia-* and triton), so without an NVIDIA driver (no nvidia-smi) setup asks
# for the CPU build, torch==X+cpu: from a wheel pip already finds (its find-links), else from
# PyTorch's CPU index. With nvidia-smi: the index's CUDA build. macOS wheels are CPU builds.
TORCH_VERSION ?= 2.13.0
TORCH_CPU_INDEX ?= https://download.pytorch.org/whl/cpu
ifneq ($(shell command -v nvidia-smi 2>/dev/null),)
TORCH_BUILD ?= cuda
else ifeq ($(shell uname -s 2>/dev/null),Darwin)
TORCH_BUILD ?= default
else
TORCH_BUILD ?= cpu
endif

.PHONY: setup test lint format bench demo clean

setup:
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --upgrade pip
ifeq ($(TORCH_BUILD),cpu)
	$(PY) -m pip install "torch==$(TORCH_VERSION)+cpu" 2>/dev/null || { \
		echo "No local torch $(TORCH_VERSION)+cpu wheel: installing it from $(TORCH_CPU_INDEX)"; \
		$(PY) -m pip install "torch==$(TORCH_VERSION)+cpu" --index-url $(TORCH_CPU_INDEX); }
else
	$(PY) -m pip install "torch==$(TORCH_VERSION)"
endif
	$(PY) -m pip install -e ".[dev]"

# Two pytest workers on two cores: one torch thread each, or they oversubscribe and crawl.
test:
	OMP_NUM_THREADS=1 $(PY) -m pytest -q -n 2

lint:
	$(PY) -m ruff check diffseg eval tests bench
	$(PY) -m ruff format --check diffseg eval tests bench

format:
	$(PY) -m ruff check --fix diffseg eval tests bench
	$(PY) -m ruff format diffseg eval tests bench

bench:
	$(PY) bench/bench_merge.py
	$(PY) bench/bench_pipeline.py
	$(PY) bench/bench_data.py

# The toy trained model (models/tiny_trained: a toy, not Stable Diffusion) on 16 held-out hard
# scenes at 128 px, at its own KL threshold 0.02 (conf/segmenter/tuned/model/); `model=tiny` is
# the random-weight model. Seed 2: its mIoU is the mean over seeds 0-7 (README, Quick start).
demo:
	WANDB_MODE=offline $(PY) -m eval model=tiny_trained dataset.resolution=128 \
		dataset.seed=2 dataset.length=16 dataset.noise=0.05 dataset.hard=true

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
