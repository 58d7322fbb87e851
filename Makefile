# fewstep — the two commands of the quick start:
#   make demo   set everything up, then run the main job on the embedded default
#   make test   set everything up, then run the test suite
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
PIP    := $(VENV)/bin/pip
STAMP  := $(VENV)/.fewstep-installed

.PHONY: setup test test-all demo clean

# torch==2.13.0 goes in first: the CPU build is found locally, and installing it before the
# package means pip never resolves another (multi-GB CUDA) torch for our dependencies.
$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet --disable-pip-version-check torch==2.13.0
	$(PIP) install --quiet --disable-pip-version-check -e '.[test]'
	touch $(STAMP)

setup: $(STAMP)

test: setup
	$(PY) -m pytest -q

test-all: setup
	$(PY) -m pytest -q -m ''

# the main job on the embedded default: toy teacher -> 4-step DOLLAR student, eval, report
demo: setup
	$(VENV)/bin/fewstep demo --out runs/demo --overwrite

clean:
	rm -rf $(VENV) build src/*.egg-info .pytest_cache
