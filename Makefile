# medimg: the two commands a newcomer needs are `make demo` and `make test`.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# What `pip install` gets for PyTorch, installed before everything else. The default is the
# CPU build this machine has; with a GPU pick a CUDA build, for example
#   make demo TORCH="torch==2.13.0 --index-url https://download.pytorch.org/whl/cu128"
TORCH ?= torch==2.13.0
STAMP := $(VENV)/.medimg-installed
export PATH := $(abspath $(BIN)):$(PATH)
export PREFECT_SERVER_ANALYTICS_ENABLED ?= false

.PHONY: install demo test system-packages lint audit bench ui serve prefect-server clean

install: $(STAMP)

# Re-runs only when pyproject.toml changes, so a second `make demo` or `make test` starts at once.
$(STAMP): pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet $(TORCH)
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	@touch $@

# The demo's data is synthetic, so its pseudonym key may be public: that makes the demo's
# keys, splits and metrics the same on every machine. Real data gets a secret .medimg-salt.
demo: export MEDIMG_SALT ?= medimg-demo-synthetic-data-only
demo: $(STAMP)
	$(BIN)/dvc repro
	$(BIN)/medimg register --task segment
	$(BIN)/medimg register --task classify
	@echo "Metrics: .venv/bin/dvc metrics show    Runs and models: make ui"

test: $(STAMP) system-packages
	$(BIN)/python -m pytest $(PYTEST_ARGS)

# Debian packages the suite drives, as command:package pairs (a package's command may be
# named otherwise): Chromium for the UI tests, dciodvfy (dicom3tools) for the DICOM IOD
# checks. Installed with apt-get (as root, or through sudo when it asks no password);
# otherwise make stops at once and names the one command to run.
SYSTEM_PACKAGES := chromium:chromium dciodvfy:dicom3tools
system-packages:
	@missing=""; for pair in $(SYSTEM_PACKAGES); do \
	    command -v $${pair%%:*} >/dev/null || missing="$$missing $${pair#*:}"; done; \
	if [ -n "$$missing" ]; then \
	    if [ "$$(id -u)" -eq 0 ]; then sudo=""; \
	    elif sudo -n true 2>/dev/null; then sudo="sudo"; \
	    else echo "make test needs Debian packages:$$missing. Run: sudo apt-get install -y$$missing"; exit 1; fi; \
	    echo "installing Debian packages:$$missing"; \
	    $$sudo env DEBIAN_FRONTEND=noninteractive apt-get update -qq && \
	    $$sudo env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $$missing; \
	fi

lint: $(STAMP)
	$(BIN)/ruff format --check medimg pipelines tests bench .ci
	$(BIN)/ruff check medimg pipelines tests bench .ci
	$(BIN)/mypy
	$(BIN)/lint-imports

# The MLflow UI on 127.0.0.1 against the project's store (tracking.uri in params.yaml).
ui: $(STAMP)
	$(BIN)/medimg ui --port $(or $(PORT),5000)

# A Prefect server on 127.0.0.1:4200 (UI and API), and the scheduled deployments served
# against it: nightly-retrain runs the pipeline on orchestration.retrain_cron.
prefect-server: $(STAMP)
	$(BIN)/medimg prefect-server --port $(or $(PREFECT_PORT),4200)

serve: export PREFECT_API_URL ?= http://127.0.0.1:$(or $(PREFECT_PORT),4200)/api
serve: $(STAMP)
	$(BIN)/python -m pipelines.deployments

# Known vulnerabilities in the installed environment: pip-audit on every installed
# distribution's public version (a +cpu torch build as its release), PyPI's advisory data
# (needs network). Exit 0 clean, 1 vulnerable, 2 incomplete: what it could not look up is
# named, never counted as clean. Reviewed advisories with no fix are in .ci/audit.py.
audit: $(STAMP)
	$(BIN)/python .ci/audit.py

bench: $(STAMP)
	@set -e; for script in bench/*.py; do echo "== $$script"; $(BIN)/python $$script; done

clean:
	rm -rf data models metrics plots
