# Two commands do all the set-up:  `make demo`  and  `make test`.
# Each creates .venv and installs what it needs the first time.

PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test lint bench clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[test,speed]'
	touch $(STAMP)

## demo: a self-contained local demo (token endpoint, protected API and the proxy on loopback)
demo: $(STAMP)
	$(BIN)/token-proxy demo

## lint: ruff, formatting and strict mypy
lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy proxy

## test: lint, then the whole test suite
test: lint
	$(BIN)/pytest

## bench: throughput and latency against nginx (installs nginx and wrk)
bench: $(STAMP)
	$(BIN)/python -m bench

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
