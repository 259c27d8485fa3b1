# Two commands on a fresh machine:  `make quickstart`  and  `make test`  (CI runs `make test`).
VENV ?= .venv
PY := $(VENV)/bin/python

$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# The CPU build of torch first: an unpinned torch pulled in by a dependency would fetch a multi-GB CUDA build.
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e ".[test]"
	touch $@

.PHONY: setup quickstart test test-slow fmt
setup: $(VENV)/.installed

quickstart: setup
	$(VENV)/bin/sft-toolkit quickstart

test: setup
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(PY) -m pytest

# Tests marked slow: extra to CI, e.g. the GPU suite with repeated runs (its full sizes on a CUDA machine).
test-slow: setup
	$(PY) -m pytest -m slow

fmt: setup
	$(VENV)/bin/ruff check --fix .
	$(VENV)/bin/ruff format .
