# Two entry points for a fresh machine: `make demo` and `make test`.
# Both create (or reuse) a virtualenv cached under ~/.cache/splitbits, keyed by a hash of
# pyproject.toml, so a second run installs nothing.
SHELL := /bin/bash
PYTHON ?= python3
HASH := $(shell $(PYTHON) -c "import hashlib,sys;print(hashlib.sha256(open('pyproject.toml','rb').read()+sys.version.encode()).hexdigest()[:12])")
VENV ?= $(HOME)/.cache/splitbits/venv-$(HASH)
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
PYTEST_ARGS ?= -n 2

.PHONY: venv demo test lint clean help

help:
	@echo "make demo   - set up, then train, export, run and report on the builtin dataset (runs/demo)"
	@echo "make test   - set up, then run the whole test suite"
	@echo "make lint   - ruff"
	@echo "venv: $(VENV)"

$(STAMP):
	rm -rf $(VENV)
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip "setuptools>=68" wheel
	$(BIN)/pip install -q -e ".[dev]"
	rm -rf *.egg-info  # the build's metadata copy: on sys.path from the checkout, it would shadow the venv's
	touch $(STAMP)

# The cached venv may point at another checkout: re-point it here (no dependency changes).
venv: $(STAMP)
	@$(BIN)/python -c "import os,sys,splitbits.runtime as r;sys.exit(os.path.dirname(r.__file__)!=os.path.abspath('runtime'))" 2>/dev/null \
		|| $(BIN)/pip install -q --no-deps --no-build-isolation -e .

demo: venv
	$(BIN)/splitbits demo --out runs/demo

test: venv
	$(BIN)/python -m pytest -q $(PYTEST_ARGS)

lint: venv
	$(BIN)/ruff check .

clean:
	rm -rf runs .pytest_cache .ruff_cache
