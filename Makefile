# Set-up and the two commands of the README. Everything runs in .venv, created on first use.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
# The CPU build of PyTorch is pinned and installed first, so nothing pulls a multi-GB CUDA build.
TORCH_PIN := torch==2.13.0

.PHONY: setup demo bench test lint clean

$(BIN)/activate:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip

$(VENV)/.installed: $(BIN)/activate pyproject.toml
	$(BIN)/pip install --quiet $(TORCH_PIN)
	$(BIN)/pip install --quiet -e '.[dev,bench,plots]'
	touch $@

setup: $(VENV)/.installed

# The main job: length generalization of softmax, SSMax, 1.5-entmax and ASEntmax (CPU, minutes).
demo: setup
	$(BIN)/sparsa demo --out results/demo

bench: setup
	$(BIN)/sparsa bench normalizers --out results/bench
	$(BIN)/sparsa bench attention --out results/bench

lint: setup
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

test: lint
	$(BIN)/python -m pytest -q

clean:
	rm -rf $(VENV) results .pytest_cache .ruff_cache .hypothesis
