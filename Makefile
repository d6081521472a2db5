# flashlab: `make lab` opens the course, `make test` proves it. Both set everything up first.
# Idempotent: the virtual environment is (re)installed only when pyproject.toml changes.

PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.flashlab-installed
PORT   ?= 8888

.PHONY: setup lab test html clean distclean

setup: $(STAMP)

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

$(STAMP): pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	$(BIN)/python -m ipykernel install --sys-prefix --name flashlab --display-name "flashlab (Python 3)"
	$(BIN)/python -m flashlab.lab settings
	touch $(STAMP)

lab: setup
	$(BIN)/python -m flashlab.lab --port $(PORT)

test: setup
	$(BIN)/python -m pytest

html: setup
	rm -rf build/html
	$(BIN)/python -m flashlab.lab html --out build/html
	@echo "open build/html/00_attention.html"

clean:
	rm -rf build .pytest_cache .ruff_cache .hypothesis *.egg-info
	find . -name __pycache__ -not -path './$(VENV)/*' -prune -exec rm -rf {} +

distclean: clean
	rm -rf $(VENV)
