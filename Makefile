# marrowdx: the README's two commands are `make demo` and `make test`; each does its own set-up.
SHELL := /bin/bash
PYTHON ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
# Extras this machine can use. `gpu` (TensorRT) is added only where NVIDIA's packages install.
EXTRAS ?= client,server,export,slides,loadtest,dev
STAMP := $(VENV)/.installed-$(subst $(comma),-,$(EXTRAS))
comma := ,
PYTEST_ARGS ?=

.PHONY: setup test demo build serve lint clean loadtest soak bench sheet audit browser dicomtools

setup: $(STAMP)

# Re-installs only when pyproject.toml changes; a second `make setup` is instant.
$(STAMP): pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check --upgrade pip
	$(BIN)/python -m pip install --quiet --disable-pip-version-check -e ".[$(EXTRAS)]"
	@rm -f $(VENV)/.installed-*
	@touch $@

# The review page's test renders it in a real headless Chromium (Debian's package). Installed
# only when missing and we are root; elsewhere that test skips and says why.
browser:
	@command -v chromium >/dev/null 2>&1 || { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null \
	  && apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium \
	  || echo "chromium not installed (needs root and apt-get): the browser test will skip"; }

# DICOM checks: dicom3tools' validator (dciodvfy), Orthanc with its DICOMweb plugin, which
# the DICOMweb and viewer tests start themselves on loopback (the package starts no service),
# and npm, with which the viewer test installs the pinned viewer into build/viewer-npm.
# Installed only what is missing and only as root with apt-get; elsewhere those tests skip.
DICOM_TOOLS := dicom3tools:dciodvfy orthanc:/usr/sbin/Orthanc orthanc-dicomweb:/usr/share/orthanc/plugins/libOrthancDicomWeb.so npm:npm
dicomtools:
	@missing=""; for pair in $(DICOM_TOOLS); do pkg=$${pair%%:*}; probe=$${pair#*:}; \
	  { [ -e "$$probe" ] || command -v "$$probe" >/dev/null 2>&1; } || missing="$$missing $$pkg"; done; \
	  [ -z "$$missing" ] || { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null \
	  && apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing \
	  || echo "not installed (needs root and apt-get):$$missing; the DICOM validity/DICOMweb/viewer tests will skip"; }

test: setup browser dicomtools
	$(BIN)/python -m pytest $(PYTEST_ARGS)

demo: setup
	$(BIN)/python -m marrowdx.demo

build: setup
	$(BIN)/marrowdx build

serve: build
	$(BIN)/marrowdx serve

sheet: setup
	$(BIN)/marrowdx sheet --out docs/cell_classes.png --field docs/simulated_field.jpg --table docs/cell_classes.md

bench: build
	$(BIN)/marrowdx bench --json build/bench.json

loadtest: build
	$(BIN)/python -m marrowdx.bench.loadtest --html build/locust_report.html

SOAK_MINUTES ?= 10
soak: build
	$(BIN)/python -m marrowdx.bench.loadtest --soak --minutes $(SOAK_MINUTES) --html build/soak_report.html

# pip-audit over the installed, pinned set (also run inside `make test` by tests/test_security.py).
audit: setup
	$(BIN)/python .ci/audit.py

lint: setup
	$(BIN)/ruff check src client models training export tests loadtests model_repository
	$(BIN)/ruff format --check src client models training export tests loadtests model_repository
	$(BIN)/python .ci/lint_imports.py

clean:
	rm -rf build .pytest_cache .ruff_cache
	find model_repository -path '*/[0-9]*/*' \( -name '*.onnx' -o -name '*.plan' -o -name '*.json' \) -delete
	find . -name __pycache__ -prune -exec rm -rf {} +
