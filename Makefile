# Quickstart: `make demo` and `make test` set up everything they need on a fresh machine.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# The CPU wheel lies on disk on the project's machines; on a GPU machine pick the CUDA build.
TORCH_SPEC ?= torch==2.13.0

.PHONY: install demo test lint format clean gpu-wheels

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q "$(TORCH_SPEC)"
	$(BIN)/python -m pip install -q -e ".[dev]"
	# DeepSpeed builds against the installed torch (its ops compile lazily, on first use)
	$(BIN)/python -m pip install -q --no-build-isolation "deepspeed>=0.14"
	touch $@

install: $(VENV)/.installed

demo: install
	$(BIN)/medmoe fit --config configs/demo.yaml --config callbacks/all.yaml

lint: install
	$(BIN)/ruff check src tests benchmarks
	$(BIN)/ruff format --check src tests benchmarks

test: lint
	$(BIN)/python -m pytest -q --durations=15

format: install
	$(BIN)/ruff check --fix src tests benchmarks
	$(BIN)/ruff format src tests benchmarks

# The wheels benchmarks/gpu_check.sh carries to a GPU machine without an index, built from
# scratch into .whl/ (DeepSpeed against this venv's torch, no op compiled); prints each wheel's
# size and the total. `bash benchmarks/gpu_check.sh --dry-run` then checks them.
gpu-wheels: install
	$(BIN)/python benchmarks/gpu_wheels.py build

clean:
	rm -rf $(VENV) runs lightning_logs .pytest_cache .whl gpu_check_out
