# Two entry points for a fresh machine: `make demo` (the main job) and `make test`.
# Tests in tiers: `make test` is ruff and the whole suite (what CI runs, in TEST_WORKERS processes);
# `make test-fast` is ruff and the unit and golden tiers (`pytest -m "not slow"`), the loop while developing
# (under 3 minutes on 2 cores).
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
# pytest-xdist processes for `make test`: most of the slow tier waits (batch jobs, servers, lifetimes), so two
# processes finish the suite sooner on 2 cores; the SLURM tests run first, one at a time, in one of them.
# (Three loaded 2 cores enough to make SLURM worker jobs miss their walltimes.)
TEST_WORKERS ?= 2

.PHONY: demo test test-fast lint install clean reliability-doc

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# The CPU wheel of torch 2.13.0 (a plain `torch` requirement would pull a multi-GB CUDA build).
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e ".[dev]"
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(PY) -m flows.production

test: $(STAMP)
	$(VENV)/bin/ruff check .
	$(PY) -m pytest -q -n $(TEST_WORKERS) --dist loadgroup

test-fast: $(STAMP)
	$(VENV)/bin/ruff check .
	$(PY) -m pytest -q -m "not slow"

reliability-doc: $(STAMP)
	EVEREST_WRITE_RELIABILITY_DOC=1 $(PY) -m pytest -q tests/reliability

lint: $(STAMP)
	$(VENV)/bin/ruff check .

clean:
	rm -rf $(VENV) output data
