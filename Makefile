# Set-up and the two commands of the README. Everything runs in .venv, created on first use.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
# The CPU build of PyTorch is pinned and installed first, so nothing pulls a multi-GB CUDA build.
TORCH_PIN := torch==2.13.0

.PHONY: setup demo bench test lint docs clean

# The set-up says what it does; times measured on this project's 2-core machine.
$(BIN)/activate:
	@echo "setup 1/4: virtual environment in $(VENV), newest pip (about 5 s)"
	@$(PYTHON) -m venv $(VENV)
	@$(BIN)/pip install --quiet --upgrade pip

$(VENV)/.installed: $(BIN)/activate pyproject.toml
	@echo "setup 2/4: $(TORCH_PIN), CPU build (about 30 s)"
	@$(BIN)/pip install --quiet $(TORCH_PIN)
	@echo "setup 3/4: sparsa (editable) with its test, benchmark, documentation and integration tools (about 40 s)"
	@$(BIN)/pip install --quiet -e '.[dev,bench]'
	@echo "setup 4/4: the compiled AVX2 kernels (entmax rows, the decoder's sketch), if this machine can build them (about 30 s)"
	@$(BIN)/python -c "from sparsa.normalize import _native; _native.ENTMAX_ROWS.built()"
	@$(BIN)/python -c "from sparsa.attention import sketch_kernels; sketch_kernels.calibration('cpu', 128)"
	@touch $@
	@echo "setup done: $(VENV)"

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

# The documentation site (MkDocs, Material, API reference from the docstrings) in site/; strict:
# a broken link, a missing page or an unresolvable reference fails. The test suite builds it too.
docs: setup
	NO_MKDOCS_2_WARNING=1 $(BIN)/mkdocs build --strict

clean:
	rm -rf $(VENV) results site .pytest_cache .ruff_cache .hypothesis
