# Two entry points on a fresh machine: `make demo` (the embedded end-to-end job) and `make test`.
# Both install from the lock file, so every machine runs the same versions.
VENV ?= .venv
PY := $(VENV)/bin/python
PYTHON ?= python3
LOCK := requirements/cpu.lock
LOCK_VENV := .lock-venv

.PHONY: setup demo test lint bench lock

setup: $(VENV)/.installed

# CPU torch first (an unconstrained torch pulls CUDA wheels), then the project with its dev and bench
# extras (bench: TRL, for bench.compare_trl only; never imported at run time), all constrained by the lock.
$(VENV)/.installed: pyproject.toml $(LOCK)
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q -c $(LOCK) pip
	$(PY) -m pip install -q -c $(LOCK) torch
	$(PY) -m pip install -q -c $(LOCK) -e ".[dev,bench]"
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
	$(PY) -m bench.data_plane
	$(PY) -m bench.overlap
	$(PY) -m bench.omni_shape
	$(PY) -m bench.grad_checkpointing
	$(PY) -m bench.compare_trl
	$(PY) -m bench.real_size_step

# Re-resolve the lock from pyproject.toml's ranges in a throw-away venv. transformers stays inside the
# range that the gpu extra's vLLM pins, so the CPU suite tests what GPU users run.
lock:
	rm -rf $(LOCK_VENV)
	$(PYTHON) -m venv $(LOCK_VENV)
	$(LOCK_VENV)/bin/python -m pip install -q --upgrade pip
	$(LOCK_VENV)/bin/python -m pip install -q torch==2.13.0
	$(LOCK_VENV)/bin/python -m pip install -q -e ".[dev,bench]" "transformers>=5.16.1,<5.21"
	mkdir -p $(dir $(LOCK))
	{ echo "# CPU lock for Python 3.11: 'make lock' rewrites it; 'make setup' installs with -c."; \
	  $(LOCK_VENV)/bin/python -m pip freeze --all --exclude-editable; } > $(LOCK)
	rm -rf $(LOCK_VENV)
