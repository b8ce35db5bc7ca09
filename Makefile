# One-command set-up: every target creates the virtual environment it needs.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp
DATA ?=

.PHONY: demo test test-fast lint format clean-venv

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e ".[dev]"
	touch $(STAMP)

## demo: train ADTR on the built-in texture dataset (or DATA=path/to/mvtec-layout-folder) and show results
demo: $(STAMP)
	$(VENV)/bin/adtr-anomalib demo $(DATA)

## test: lint, run the test suite and execute every notebook (offline)
test: $(STAMP) lint
	HF_HUB_OFFLINE=1 $(PY) -m pytest tests --nbmake notebooks --nbmake-timeout=900 --durations=25

## test-fast: the unit tests without the slow end-to-end ones (export, several processes, wheels) or notebooks
test-fast: $(STAMP)
	HF_HUB_OFFLINE=1 $(PY) -m pytest tests -m "not slow"

lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

format: $(STAMP)
	$(VENV)/bin/ruff format .
	$(VENV)/bin/ruff check --fix .

clean-venv:
	rm -rf $(VENV)
