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

.PHONY: demo test lint bench install clean

install: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -c constraints.txt -e ".[dev,demo]"
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/cahfp demo --download

test: $(STAMP)
	$(BIN)/python -m pytest

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

bench: $(STAMP)
	$(BIN)/python -m benchmarks.run_all

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .ruff_cache
