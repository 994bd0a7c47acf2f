# The two commands of the README's quick start, plus helpers. Every target installs what it
# needs into .venv first; a second run skips what is already done.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
INSTALLED := $(VENV)/.installed
HOST ?= 127.0.0.1
PORT ?= 8000

.PHONY: serve test test-fast lint calibrate models export clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

# torch first, pinned: that CPU build lies on disk here; the project's range then adds nothing.
$(INSTALLED): pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet torch==2.13.0
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	touch $(INSTALLED)

serve: $(INSTALLED)
	$(BIN)/marginwatch-serve --host $(HOST) --port $(PORT)

test: $(INSTALLED)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy
	$(BIN)/python -m pytest

# For the edit-test loop: skips the tests marked slow (whole calibration runs, training, exports).
test-fast: lint
	$(BIN)/python -m pytest -m "not slow"

lint: $(INSTALLED)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy

calibrate: $(INSTALLED)
	$(BIN)/marginwatch-calibrate

# Retrain the shipped reference models on the full Fashion-MNIST training set (about 25 min on
# 2 cores; needs `apt-get install dataset-fashion-mnist`).
models: $(INSTALLED)
	$(BIN)/marginwatch-train --recipe pgd --epochs 8 --eps 0.1 --attack-steps 7 --seed 0 \
		--out models/weights/fmnist-cnn-pgd
	$(BIN)/marginwatch-train --recipe standard --epochs 5 --seed 0 \
		--out models/weights/fmnist-cnn-standard

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache .mypy_cache *.egg-info
