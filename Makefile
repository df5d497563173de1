# Two commands for a fresh machine: `make run` and `make test`.
# torch==2.13.0 is installed first and on its own: it is a CPU build that this machine keeps on disk,
# while a bare `torch` requirement would make pip fetch a multi-GB CUDA build.

PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
RUN_STAMP := $(VENV)/.ckptd-run-installed
DEV_STAMP := $(VENV)/.ckptd-dev-installed
CONFIG ?= config.toml

.PHONY: run test lint tools bench clean

# What running needs: ckptd, the S3 backend and the report extra (a venv of about 1.2 GB, two thirds of it torch;
# the dev toolchain below adds 0.4 GB).
$(RUN_STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet torch==2.13.0
	$(BIN)/python -m pip install --quiet -e '.[s3,report]'
	touch $(RUN_STAMP)

# What testing adds: the real trainers the tests run (Lightning, transformers, accelerate, DeepSpeed,
# nshtrainer), moto's S3 server, ruff and mypy.
$(DEV_STAMP): $(RUN_STAMP)
	DS_BUILD_OPS=0 $(BIN)/python -m pip install --quiet -e '.[dev,s3,report]'
	touch $(DEV_STAMP)

run: $(RUN_STAMP)
	mkdir -p runs backup
	$(BIN)/ckptd run --config $(CONFIG)

lint: $(DEV_STAMP)
	$(BIN)/ruff check ckptd tests benchmarks
	$(BIN)/ruff format --check ckptd tests benchmarks
	$(BIN)/mypy

# The unit tests run the real systemd-analyze, and check docs/alerts.yml with Prometheus's own promtool;
# Debian images have systemd, and this installs what is missing (prometheus: about 15 s, no recommends).
tools:
	@command -v systemd-analyze >/dev/null || (apt-get update -qq && apt-get install -y -qq systemd)
	@command -v promtool >/dev/null || (apt-get update -qq && apt-get install -y -qq --no-install-recommends prometheus)

test: $(DEV_STAMP) lint tools
	$(BIN)/pytest

bench: $(DEV_STAMP)
	$(BIN)/python benchmarks/verify.py

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
