# camseg: `make demo` runs the whole pipeline on the synthetic dataset, `make test` the tests.
# Both set everything up first (a .venv with camseg installed editable).
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.camseg-installed
EXTRAS ?= dev

.PHONY: install demo test test-all check-wheel lint format bench clean

install: $(STAMP)

# Re-installs only when pyproject.toml or constraints.txt (the tested torch) changes.
$(STAMP): pyproject.toml constraints.txt
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -c constraints.txt -e ".[$(EXTRAS)]"
	@touch $(STAMP)

demo: install
	$(BIN)/camseg experiment=synthetic

test: install
	$(BIN)/pytest -q

# Builds the wheel, installs it into a fresh venv outside the checkout and runs the demo there.
check-wheel: install
	scripts/check_wheel.sh $(VENV)

test-all: install
	$(BIN)/pytest -q -m "slow or not slow"

lint: install
	$(BIN)/ruff check src tests scripts
	$(BIN)/ruff format --check src tests scripts
	$(BIN)/mypy

format: install
	$(BIN)/ruff format src tests scripts
	$(BIN)/ruff check --fix src tests scripts

bench: install
	$(BIN)/python scripts/bench_cam.py
	$(BIN)/python scripts/bench_pseudo.py
	$(BIN)/python scripts/bench_train.py

clean:
	rm -rf runs logs .pytest_cache
