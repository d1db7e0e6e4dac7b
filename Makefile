# Two commands set everything up on a fresh machine:  make train  and  make test
PYTHON ?= python3
VENV ?= .venv
TORCH ?= torch==2.13.0
TORCH_INDEX ?=
ARGS ?=
BIN := $(VENV)/bin
INSTALLED := $(VENV)/.installed

.PHONY: install train test test-fast lint format tensorboard clean

install: $(INSTALLED)

# torch is pinned here. Which build pip takes depends on the index: TORCH_INDEX=<a PyTorch wheel index URL>
# picks a CPU-only or a CUDA build of the same version (see the README).
$(INSTALLED): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q "$(TORCH)" $(if $(TORCH_INDEX),--index-url $(TORCH_INDEX))
	$(BIN)/python -m pip install -q -e ".[dev,fp8]"
	touch $(INSTALLED)

train: $(INSTALLED)
	$(BIN)/python train.py $(ARGS)

test: lint
	$(BIN)/python -m pytest -q $(ARGS)

# One formatter and one linter (ruff, configured in pyproject.toml); `make test` runs this first.
lint: $(INSTALLED)
	$(BIN)/ruff format --check .
	$(BIN)/ruff check .

format: $(INSTALLED)
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

test-fast: $(INSTALLED)
	$(BIN)/python -m pytest -q -m "not slow" $(ARGS)

# The latest sweep (a folder holding multirun.yaml, at any depth) or single run; LOGDIR=... picks another.
tensorboard: $(INSTALLED)
	@latest=$$(ls -td $$(find outputs/multirun -name multirun.yaml -printf '%h\n' 2>/dev/null) outputs/runs/*/ 2>/dev/null | head -n 1); \
	$(BIN)/tensorboard --logdir "$${LOGDIR:-$${latest:-outputs}}"

clean:
	rm -rf .cache outputs/runs outputs/multirun
