# Two commands for a fresh machine: `make run` and `make test`.
# torch==2.13.0 is installed first and on its own: it is a CPU build that this machine keeps on disk,
# while a bare `torch` requirement would make pip fetch a multi-GB CUDA build.

PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.ckptd-installed
CONFIG ?= config.toml

.PHONY: run test lint tools bench clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet torch==2.13.0
	DS_BUILD_OPS=0 $(BIN)/python -m pip install --quiet -e '.[dev,s3,report]'
	touch $(STAMP)

run: $(STAMP)
	mkdir -p runs backup
	$(BIN)/ckptd run --config $(CONFIG)

lint: $(STAMP)
	$(BIN)/ruff check ckptd tests benchmarks
	$(BIN)/ruff format --check ckptd tests benchmarks
	$(BIN)/mypy

# The unit tests run the real systemd-analyze; Debian images have it, and this installs it where missing.
tools:
	@command -v systemd-analyze >/dev/null || (apt-get update -qq && apt-get install -y -qq systemd)

test: $(STAMP) lint tools
	$(BIN)/pytest

bench: $(STAMP)
	$(BIN)/python benchmarks/verify.py

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
