# brainage-hpc: one command each for the demo, the tests and the benchmarks.
# GPU clusters: override TORCH_SPEC, e.g.
#   make venv TORCH_SPEC="torch==2.13.0 --index-url https://download.pytorch.org/whl/cu126"
PYTHON ?= python3
VENV ?= .venv
TORCH_SPEC ?= torch==2.13.0
PY := $(VENV)/bin/python
PYTEST_ARGS ?=
export TORCH_EXTENSIONS_DIR ?= $(CURDIR)/.torch_extensions
export OMP_NUM_THREADS ?= 1

.PHONY: venv demo test test-fast lint bench tensorboard slurm-up slurm-down clean

venv: $(VENV)/.installed

$(VENV)/.installed: setup.cfg pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --upgrade pip wheel setuptools
	# torch first, explicitly, so no dependency drags in a multi-GB CUDA build.
	$(PY) -m pip install $(TORCH_SPEC)
	$(PY) -m pip install -e '.[test]'
	touch $@

demo: venv
	$(PY) -m brainage_hpc.demo --out demo_out

test: venv lint
	bash slurm/local/maybe_start.sh
	PY=$(PY) bash tests/run_suite.sh $(PYTEST_ARGS)

lint: venv
	$(VENV)/bin/ruff check .

test-fast: venv
	$(PY) -m pytest -m "not slow and not slurm" $(PYTEST_ARGS)

bench: venv
	$(PY) -m benchmarks.run_all

tensorboard: venv
	$(VENV)/bin/tensorboard --logdir checkpoints --bind_all

slurm-up:
	bash slurm/local/start.sh

slurm-down:
	bash slurm/local/stop.sh

clean:
	rm -rf $(VENV) demo_out bench_out .pytest_cache
