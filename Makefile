# Two commands do all the set-up:  `make demo`  and  `make test`.
# Each creates .venv and installs what it needs the first time.

PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test lint bench compile uncompile clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip 'setuptools>=77'
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

## test: lint, then the whole test suite against the pure-Python and the compiled data path
test: lint
	$(MAKE) --no-print-directory uncompile
	TOKEN_PROXY_BUILD=pure $(BIN)/pytest
	$(MAKE) --no-print-directory compile
	TOKEN_PROXY_BUILD=compiled $(BIN)/pytest
	$(MAKE) --no-print-directory uncompile

## compile: build the data path with mypyc, in place (as the container image does; see setup.py)
compile: $(STAMP)
	TOKEN_PROXY_COMPILE=1 $(BIN)/python setup.py --quiet build_ext --inplace

## uncompile: remove the compiled modules (back to pure Python)
uncompile:
	rm -rf build
	find proxy -name '*.so' -delete

## bench: throughput and latency against nginx, then gRPC unary calls (installs nginx and wrk)
bench: compile
	$(BIN)/python -m bench
	$(BIN)/python -m bench.grpc_unary

clean: uncompile
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
