# `make setup` then `make test`. Everything runs from the project's own virtual environment.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# Without CUDA, pin the CPU build of torch first: a bare `torch` requirement would pull a
# multi-GB CUDA wheel. With a GPU, let pip pick the default (CUDA) build.
TORCH_SPEC ?= $(shell command -v nvidia-smi >/dev/null 2>&1 && echo "torch>=2.2" || echo "torch==2.13.0")

.PHONY: setup test lint format bench demo clean

setup:
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --upgrade pip
	$(PY) -m pip install "$(TORCH_SPEC)"
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

demo:
	WANDB_MODE=offline $(PY) -m eval dataset=synthetic model=tiny

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
