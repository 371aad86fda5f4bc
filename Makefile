# Two entry points on a fresh machine: `make demo` (the embedded end-to-end job) and `make test`.
VENV ?= .venv
PY := $(VENV)/bin/python
PYTHON ?= python3

.PHONY: setup demo test lint bench

setup: $(VENV)/.installed

# CPU torch first (pinned: an unpinned torch pulls CUDA wheels), then the project and its dev extras.
$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e ".[dev]"
	touch $@

demo: setup
	$(PY) -m launch.demo

test: setup
	$(PY) -m pytest -q -ra

lint: setup
	$(VENV)/bin/ruff check .

bench: setup
	$(PY) -m bench.weight_broadcast
	$(PY) -m bench.grpo_step
	$(PY) -m bench.overlap
