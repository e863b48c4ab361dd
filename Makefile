# Quick start: `make demo` runs the main job, `make test` the test suite.
# Both create .venv and install what they need first; running them again installs nothing new.
PY ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-$(shell cat pyproject.toml | cksum | cut -d' ' -f1)

.PHONY: demo test lint format bench docs clean

$(BIN)/python:
	$(PY) -m venv $(VENV) || python3 -m venv $(VENV)

$(STAMP): $(BIN)/python pyproject.toml
	bash scripts/system-deps.sh
	$(BIN)/pip install --disable-pip-version-check -q torch==2.13.0 faiss-cpu==1.15.1
	$(BIN)/pip install --disable-pip-version-check -q -e '.[all,test]'
	rm -f $(VENV)/.installed-* && touch $(STAMP)

demo: $(STAMP)
	$(BIN)/headwise demo --out report/

test: $(STAMP)
	$(BIN)/ruff check src tests
	$(BIN)/ruff format --check src tests
	$(BIN)/python -m pytest

lint: $(STAMP)
	$(BIN)/ruff check src tests && $(BIN)/ruff format --check src tests

format: $(STAMP)
	$(BIN)/ruff format src tests && $(BIN)/ruff check --fix src tests

bench: $(STAMP)
	$(BIN)/headwise bench kernels --report benchmarks/results

docs: $(STAMP)
	$(BIN)/headwise docs

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
