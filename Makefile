# lalm: three commands a newcomer needs: `make demo`, `make test`, `lalm ... --model PATH`.
SHELL := /bin/bash
VENV  ?= .venv
PY    := $(VENV)/bin/python
PIP   := $(VENV)/bin/pip
TORCH_VERSION ?= 2.13.0
# Debian packages: voices and recorded audio for the corpus, chromium for the browser test.
DEB_PKGS := espeak-ng flite sox sonic-pi-samples pocketsphinx-testdata alsa-utils chromium

.PHONY: setup test test-fast demo lint clean

setup: $(VENV)/.lalm-setup
$(VENV)/.lalm-setup: pyproject.toml Makefile
	@missing=""; for p in $(DEB_PKGS); do dpkg -s $$p >/dev/null 2>&1 || missing="$$missing $$p"; done; \
	if [ -n "$$missing" ]; then \
	  echo "installing Debian packages:$$missing"; \
	  SUDO=""; [ "$$(id -u)" = 0 ] || SUDO=sudo; \
	  $$SUDO apt-get update -q && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -q $$missing; \
	fi
	@test -x $(PY) || python3 -m venv $(VENV)
	@# No CUDA here: install the CPU wheel first so nothing pulls a multi-GB CUDA build.
	@if ! $(PY) -c "import torch" 2>/dev/null; then \
	  if command -v nvidia-smi >/dev/null 2>&1; then $(PIP) install -q torch==$(TORCH_VERSION); \
	  else $(PIP) install -q --timeout 10 --retries 0 torch==$(TORCH_VERSION) --index-url https://download.pytorch.org/whl/cpu 2>/dev/null \
	       || $(PIP) install -q torch==$(TORCH_VERSION); fi; \
	fi
	$(PIP) install -q -e ".[dev]"
	@touch $@

test: setup
	$(PY) -m pytest -q -m "not slow" --timeout=900

test-fast: setup
	$(PY) -m pytest -q -x -m "not slow and not browser" --timeout=600

demo: setup
	$(VENV)/bin/lalm demo

lint: setup
	$(VENV)/bin/ruff check src tests bench

clean:
	rm -rf $(VENV) build *.egg-info
