# medimg: the two commands a newcomer needs are `make demo` and `make test`.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# The environment is part of a result: `make install` installs the lock, every file checked
# against its hash (docs/installation.md). The lock names PyTorch's CPU build, TORCH_VERSION.
LOCK ?= requirements/cpu.lock
TORCH_VERSION := 2.13.0
# What `pip install` gets for PyTorch. The default is the lock's CPU build; with a GPU pick a
# CUDA build, for example
#   make demo TORCH="torch==2.13.0 --index-url https://download.pytorch.org/whl/cu128"
# which installs that torch (and its CUDA libraries, unlocked), then the rest of the lock.
TORCH ?= torch==$(TORCH_VERSION)
STAMP := $(VENV)/.medimg-installed
export PATH := $(abspath $(BIN)):$(PATH)
export PREFECT_SERVER_ANALYTICS_ENABLED ?= false

.PHONY: install lock lock-cuda demo test system-packages lint audit bench ui serve prefect-server clean

install: $(STAMP)

# Re-runs only when pyproject.toml or the lock changes, so a second `make demo` or `make test`
# starts at once. The lock goes in as it is (--no-deps: nothing that it does not name), then
# medimg itself; pip check proves the whole consistent. The copy of the lock in the
# environment is what every MLflow run and model card then compares the installed versions with.
$(STAMP): pyproject.toml $(LOCK)
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	@$(BIN)/python -c 'import sys; sys.exit(sys.version_info[:2] != (3, 11))' || { echo \
	    "$(LOCK) is for CPython 3.11: rm -r $(VENV), then make install PYTHON=python3.11"; exit 1; }
	$(BIN)/python -m pip install --quiet --upgrade pip
ifeq ($(TORCH),torch==$(TORCH_VERSION))
	$(BIN)/python -m pip install --quiet --no-deps --require-hashes -r $(LOCK)
else
	$(BIN)/python -m pip install --quiet $(TORCH)
	awk '/^[^ #]/ { skip = /^torch==/ } !skip' $(LOCK) > $(VENV)/lock-without-torch.txt
	$(BIN)/python -m pip install --quiet --no-deps --require-hashes -r $(VENV)/lock-without-torch.txt
endif
	$(BIN)/python -m pip install --quiet --no-deps -e .
	$(BIN)/python -m pip check
	cp $(LOCK) $(VENV)/medimg.lock
	@touch $@

# `make lock` regenerates requirements/cpu.lock with uv from pyproject.toml (its dependencies
# and the dev extra) for CPython 3.11 on x86-64 Linux: every package at its newest release
# within pyproject's bounds, torch at TORCH_VERSION's CPU build. One package only:
#   make lock LOCK_UPGRADE="--upgrade-package mlflow"
# PyPI has no CPU build of torch for Linux: uv takes it where pip does (PIP_FIND_LINKS), else
# from PyTorch's index. `make install` then installs the new lock; commit it with the reason.
LOCK_UPGRADE ?= --upgrade
TORCH_CPU_WHEELS ?= $(or $(PIP_FIND_LINKS),https://download.pytorch.org/whl/cpu/torch/)
UV_COMPILE = $(BIN)/uv pip compile --quiet pyproject.toml - --extra dev --generate-hashes \
	--python-version 3.11 --python-platform x86_64-manylinux_2_28
lock: $(STAMP)
	echo "torch==$(TORCH_VERSION)+cpu" | $(UV_COMPILE) $(LOCK_UPGRADE) \
	    --find-links $(TORCH_CPU_WHEELS) --custom-compile-command "make lock" -o requirements/cpu.lock

# `make lock-cuda`: requirements/cuda.lock, with a CUDA build of torch and its CUDA libraries
# and everything else as requirements/cpu.lock has it (uv keeps the pins of the file it
# rewrites, where they fit); then `make install LOCK=requirements/cuda.lock`. It needs a
# machine that reaches CUDA_WHEELS (docs/installation.md).
CUDA_TORCH ?= $(TORCH_VERSION)+cu128
CUDA_WHEELS ?= https://download.pytorch.org/whl/cu128/torch/
lock-cuda: $(STAMP)
	cp requirements/cpu.lock $(VENV)/cuda.lock
	echo "torch==$(CUDA_TORCH)" | $(UV_COMPILE) $(if $(CUDA_WHEELS),--find-links $(CUDA_WHEELS)) \
	    --custom-compile-command "make lock-cuda" -o $(VENV)/cuda.lock
	mv $(VENV)/cuda.lock requirements/cuda.lock

# The demo's data is synthetic, so its pseudonym key may be public: that makes the demo's
# keys, splits and metrics the same on every machine (medimg.dicom.deid.DEMO_SALT; medimg
# synth also writes it to .medimg-salt when there is none, for a later `dvc exp run`).
# Under it ingest refuses files medimg's generator did not write. Real data gets a secret
# .medimg-salt.
demo: export MEDIMG_SALT ?= medimg-demo-synthetic-data-only
demo: $(STAMP)
	$(BIN)/dvc repro
	$(BIN)/medimg register --task segment
	$(BIN)/medimg register --task classify
	@$(BIN)/medimg summary

test: $(STAMP) system-packages
	$(BIN)/python -m pytest $(PYTEST_ARGS)

# Debian packages the suite drives, as command:package pairs (a package's command may be
# named otherwise; a path instead of a command is checked as a file): Chromium for the UI
# tests, dciodvfy (dicom3tools) for the DICOM IOD checks, Orthanc and its DICOMweb plugin
# as the PACS of tests/integration/test_pacs.py, stunnel4 as its https front (Orthanc's
# own HTTPS crashes in Debian's 1.10.1). Installed with apt-get (as root, or
# through sudo when it asks no password); otherwise make stops at once and names the one
# command to run.
SYSTEM_PACKAGES := chromium:chromium dciodvfy:dicom3tools /usr/sbin/Orthanc:orthanc \
	/usr/share/orthanc/plugins/libOrthancDicomWeb.so:orthanc-dicomweb stunnel4:stunnel4
system-packages:
	@missing=""; for pair in $(SYSTEM_PACKAGES); do \
	    case $${pair%%:*} in /*) test -e $${pair%%:*} ;; *) command -v $${pair%%:*} >/dev/null ;; esac \
	        || missing="$$missing $${pair#*:}"; done; \
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
