# Two entry points: `make demo` and `make test`; `make lab` to explore. Each builds .venv first.
SHELL := /bin/bash
VENV := .venv
BIN := $(VENV)/bin
PYTHON ?= python3
export TF_CPP_MIN_LOG_LEVEL := 2
export PYTHONHASHSEED := 0

.PHONY: install demo lab pretrain test export-check nbtest pytest clean

# Install order matters: CPU torch first (a plain `torch` would pull a CUDA
# build), then the locked set, then this package (editable, nothing new).
# Last, the kernel spec `prompt_tuning_nb` inside .venv: the experiment notebooks
# name it, so JupyterLab, papermill and the tests all run this environment's Python.
$(BIN)/.installed: settings.ini setup.py requirements-lock.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet pip==26.3
	$(BIN)/pip install --quiet torch==2.13.0
	$(BIN)/pip install --quiet -r requirements-lock.txt
	$(BIN)/pip install --quiet --no-build-isolation -e ".[dev]"
	$(BIN)/pip check
	$(BIN)/python -m ipykernel install --sys-prefix --name prompt_tuning_nb --display-name "Python (prompt_tuning_nb)"
	touch $@

install: $(BIN)/.installed

# The main job: Figure 1 on SmolLM2-135M (and the miniature ladder once `make pretrain` cached it), then every figure.
demo: install
	mkdir -p experiments/out
	$(BIN)/papermill experiments/scale.ipynb experiments/out/scale.ipynb --cwd . --log-output
	$(BIN)/papermill experiments/figures.ipynb experiments/out/figures.ipynb --cwd .
	@echo "Figure 1: experiments/figures/scale.png (this run: experiments/out/scale/scale.png)"

# JupyterLab on this environment, at the repository root, on the loopback interface only; it prints its URL and token.
# As root (a container, a cloud VM) Jupyter needs --allow-root.
LAB_PORT ?= 8888
lab: install
	$(BIN)/jupyter lab --no-browser --ServerApp.ip=127.0.0.1 --ServerApp.port=$(LAB_PORT) \
	  --ServerApp.root_dir="$(CURDIR)" $(if $(filter 0,$(shell id -u)),--allow-root)

# Build (or resume) the zoo; FACTOR=8 pretrains eight times longer, for hours.
FACTOR ?= 1
pretrain: install
	$(BIN)/python -m prompt_tuning_nb.zoo --sizes mini_xs,mini_s,mini_m,mini_l --factor $(FACTOR)

test: install export-check nbtest pytest

# The notebooks and the tests compile many of the same XLA programs (the same models, steps and evaluators):
# one persistent compilation cache for the whole run lets each be compiled once. It starts empty in a clone.
nbtest pytest: export JAX_COMPILATION_CACHE_DIR := $(CURDIR)/build/jax_cache
nbtest pytest: export JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS := 1

export-check:
	$(BIN)/nbdev_export
	@if [ -n "$$(git status --porcelain -- prompt_tuning_nb)" ]; then \
	  echo "nbdev_export changed the exported library: export the notebooks and commit both"; \
	  git status --porcelain -- prompt_tuning_nb; exit 1; fi

nbtest:
	$(BIN)/nbdev_test --n_workers 2 --do_print --flags slow

# Two workers, a test file each at a time (its module fixtures built once), the longest files first (tests/conftest.py):
# most of a test's time is single-threaded (compiling, papermill and subprocess start-up), so two overlap well.
pytest:
	$(BIN)/python -m pytest -q -n 2 --dist loadfile --no-loadscope-reorder tests

clean:
	rm -rf $(VENV) build *.egg-info
