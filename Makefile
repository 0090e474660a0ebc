# gmp-dist — set-up, demo, tests, benchmarks. `make demo` and `make test` are the quickstart.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(VENV)/bin/pip
STAMP := $(VENV)/.installed-stamp
APT_PKGS := pkg-config libopencv-dev libturbojpeg0-dev g++

.PHONY: install demo study test test-fast bench gpu-check clean system-deps ffcv

install: $(STAMP)

# System libraries FFCV compiles against; installed only when missing and when we may (root + apt).
system-deps:
	@missing=""; for p in $(APT_PKGS); do dpkg -s $$p >/dev/null 2>&1 || missing="$$missing $$p"; done; \
	if [ -z "$$missing" ]; then echo "system libraries present"; \
	elif [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	  echo "installing:$$missing"; apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing >/dev/null; \
	else echo "WARNING: missing$$missing (need root + apt); FFCV will be unavailable, the torchvision loader is used"; fi

$(STAMP): pyproject.toml | system-deps
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip wheel setuptools
	$(PIP) install -q -e '.[test]'
	@$(MAKE) --no-print-directory ffcv
	@touch $(STAMP)

# FFCV is source-only: build it when the libraries are there; a failure leaves the torchvision path.
ffcv:
	@if $(PY) -c "import ffcv" 2>/dev/null; then echo "ffcv present"; \
	elif pkg-config --exists opencv4 libturbojpeg 2>/dev/null; then \
	  $(PIP) install -q numba opencv-python-headless && \
	  $(PIP) install -q --no-build-isolation ffcv==1.0.2 \
	  || echo "WARNING: FFCV failed to build; data.loader=auto will use torchvision"; \
	else echo "WARNING: opencv/turbojpeg not found by pkg-config; skipping FFCV"; fi

demo: install
	$(VENV)/bin/gmp-dist demo

# The paper's comparison on the bundled digits (README "What the study shows"); rerun to resume.
STUDY ?= configs/study/digits.yaml
STUDY_OUT ?= study-out/$(basename $(notdir $(STUDY)))
study: install
	$(VENV)/bin/gmp-dist study $(STUDY) --out $(STUDY_OUT)

# ruff first: a lint finding fails fast, before minutes of tests.
test: install
	$(VENV)/bin/ruff check .
	$(PY) -m pytest -q -ra

test-fast: install
	$(VENV)/bin/ruff check .
	$(PY) -m pytest -q -ra -m "not slow and not recipes"

bench: install
	$(PY) -m bench.run

# gpu-marked tests + GPU benchmark, time-boxed to 8 minutes, writes gpu-results.json; exits 0 without CUDA.
# On a lent GPU machine without this venv, the python3 that holds torch runs it (GPU_PY=... to choose).
GPU_PY ?= $(shell $(PY) -c "import torch" >/dev/null 2>&1 && echo $(PY) || echo python3)
gpu-check:
	PYTHONPATH=$(CURDIR)$${PYTHONPATH:+:$$PYTHONPATH} $(GPU_PY) -m bench.gpu_check

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache bench-results.json gpu-results.json
