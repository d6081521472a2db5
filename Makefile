# flashlab: `make lab` opens the course, `make test` proves it. Both set everything up first.
# Idempotent: the virtual environment is (re)installed only when pyproject.toml changes.

PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.flashlab-installed
PORT   ?= 8888

.PHONY: setup lab test test-fast html clean distclean

setup: $(STAMP)

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

$(STAMP): pyproject.toml | $(BIN)/python
	@echo "flashlab: installing the course into $(VENV) (first run: a few minutes, torch alone is ~200 MB)"
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --progress-bar on -e '.[dev]'
	$(BIN)/python -m ipykernel install --sys-prefix --name flashlab --display-name "flashlab (Python 3)"
	$(BIN)/python -m flashlab.lab settings
	touch $(STAMP)

# Your work in a chapter stays yours: git ignores outputs and execution counts in notebooks/ (nbstripout's
# filter, installed into this clone's .git/config), so `git status` and `git pull` see only real edits.
lab: setup
	$(BIN)/python -m flashlab.lab strip-filter
	$(BIN)/python -m flashlab.lab --port $(PORT)

test: setup
	$(BIN)/python -m pytest

# The inner loop of development: unit tests only (no notebooks, no browser), stop at the first failure.
test-fast: setup
	$(BIN)/python -m pytest -x -q -n auto -m "not notebook and not browser"

html: setup
	rm -rf build/html
	$(BIN)/python -m flashlab.lab html --out build/html
	@echo "open build/html/00_attention.html"

clean:
	rm -rf build .pytest_cache .ruff_cache .hypothesis *.egg-info
	find . -name __pycache__ -not -path './$(VENV)/*' -prune -exec rm -rf {} +

distclean: clean
	rm -rf $(VENV)
