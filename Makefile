# quadrant: `make demo` runs the main job, `make test` the whole suite.
# Both create .venv on first use (Python 3.11+, packages from PyPI only).

PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
# Test processes: one per core, at most 4 (each test uses one torch thread;
# whole test files go to one process, so module fixtures are built once).
TEST_WORKERS ?= $(shell n=$$(nproc 2>/dev/null || echo 2); [ $$n -gt 4 ] && n=4; echo $$n)

.PHONY: demo test lint bench clean

$(BIN)/python:
	@$(PYTHON) -c 'import sys; assert sys.version_info >= (3, 11), "quadrant needs Python >= 3.11, found " + sys.version.split()[0]'
	@$(PYTHON) -m venv $(VENV) || { echo "could not create $(VENV): on Debian/Ubuntu run 'apt-get install python3-venv'"; exit 1; }
	$(BIN)/python -m pip install --quiet --upgrade pip

# The stamps re-install when pyproject.toml changes.
$(VENV)/.installed: pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install --quiet -e .
	@touch $@

$(VENV)/.installed-test: pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install --quiet -e ".[test]"
	@touch $@ $(VENV)/.installed

demo: $(VENV)/.installed
	$(BIN)/quadrant demo

test: $(VENV)/.installed-test
	$(BIN)/ruff check .
	$(BIN)/python -m pytest -n $(TEST_WORKERS) --dist loadfile

lint: $(VENV)/.installed-test
	$(BIN)/python -m pip install --quiet "mypy>=1.10"
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy

bench: $(VENV)/.installed-test
	$(BIN)/python benchmarks/extract.py

clean:
	rm -rf $(VENV) runs .pytest_cache .ruff_cache .mypy_cache
