# Every target creates (once) and reuses a virtual environment in .venv.
# On a machine without a GPU, torch is pinned to the CPU build 2.13.0 (a local wheel), so no
# multi-GB CUDA build is ever downloaded.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: setup demo demo-llm test lint bench clean

setup: $(STAMP)

$(STAMP): pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	@if ! $(PY) -c "import torch" 2>/dev/null; then \
		if command -v nvidia-smi >/dev/null 2>&1; then $(PY) -m pip install -q "torch>=2.4"; \
		else $(PY) -m pip install -q "torch==2.13.0"; fi; \
	fi
	$(PY) -m pip install -q -e ".[dev]"
	@touch $(STAMP)

demo: setup
	$(VENV)/bin/dk demo

demo-llm: setup
	$(VENV)/bin/dk demo llm

test: setup
	$(PY) -m pytest -n 2 --dist loadfile

lint: setup
	$(VENV)/bin/ruff check src tests benchmarks
	$(VENV)/bin/ruff format --check src tests benchmarks

bench: setup
	$(PY) -m pip install -q -e ".[bench]"
	$(PY) benchmarks/kd_loss.py

clean:
	rm -rf $(VENV) build dist *.egg-info .pytest_cache .ruff_cache
