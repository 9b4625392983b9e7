# The two commands: `make train` runs the default job, `make test` runs the test suite.
# Each creates .venv when it is missing, installs torch first (the CPU build unless a CUDA torch
# is already importable), then skipjack with its dependencies, then runs.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
TORCH_VERSION ?= 2.13.0
STAMP := $(VENV)/.skipjack-installed

.PHONY: install train test lint clean

$(PY):
	$(PYTHON) -m venv $(VENV)

$(STAMP): $(PY) pyproject.toml
	@if $(PY) -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; then \
		echo "CUDA torch already importable: keeping it"; \
	else \
		$(PY) -m pip install --quiet "torch==$(TORCH_VERSION)"; \
	fi
	$(PY) -m pip install --quiet -e ".[dev]"
	@$(PY) -c "import torch; print('torch', torch.__version__)"
	@touch $(STAMP)

install: $(STAMP)

train: $(STAMP)
	$(VENV)/bin/skipjack train $(ARGS)

test: $(STAMP)
	$(VENV)/bin/ruff check .
	$(PY) -m pytest -m "not gpu" --durations=20 $(PYTEST_ARGS)

lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

clean:
	rm -rf $(VENV) outputs .pytest_cache
