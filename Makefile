# Every target sets itself up: it creates .venv and installs the project with the pinned
# constraints the first time (and again when pyproject.toml or constraints.txt change).
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

# Use the shared Fashion-MNIST copy beside the checkout when there is one and the caller did
# not choose a data directory.
ifneq ($(wildcard ../shared/data/fashion-mnist),)
export CAHFP_DATA_DIR ?= $(abspath ../shared/data)
endif

.PHONY: demo test lint bench install clean audit-trained

install: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -c constraints.txt -e ".[dev,demo,ray,tensorboard,mlflow]"
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/cahfp demo --download

test: $(STAMP)
	$(BIN)/python -m pytest

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/lint-imports

bench: $(STAMP)
	$(BIN)/python -m benchmarks.run_all

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .ruff_cache

# Tests that assert a number training produces, under torch threads 1 and 2 and seeds 0-2 (the
# build machines' CPUs differ; see tests/conftest.py).
audit-trained: $(STAMP)
	for t in 1 2; do for s in 0 1 2; do \
	  echo "== threads $$t, seed offset $$s"; \
	  CAHFP_TEST_THREADS=$$t CAHFP_TEST_SEED=$$s $(BIN)/python -m pytest -q -m trained || exit 1; \
	done; done
