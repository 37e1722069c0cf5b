# The two commands of README.md:
#   make run    set up (virtualenv with .[all], Fashion-MNIST) and run the main job
#   make test   set up and run the test suite
# Both are idempotent: the virtualenv is rebuilt only when setup.cfg/pyproject.toml change, and
# preparing the data is a no-op once done.

PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.grassq-installed
CONFIG ?= experiments/configs/main.py
WORKDIR ?= runs/main
RESULTS ?= results
PYTEST_ARGS ?=

.PHONY: run test setup data clean-runs

run: setup data
	$(BIN)/python -m experiments.main --config $(CONFIG) --workdir $(WORKDIR) --results $(RESULTS)

test: setup data
	$(BIN)/python -m pytest -q $(PYTEST_ARGS)

setup: $(STAMP)

$(STAMP): setup.cfg pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --upgrade pip
	$(BIN)/python -m pip install -e ".[all]"
	touch $(STAMP)

data: setup
	bash tools/fashion_mnist.sh
	$(BIN)/python -m grassq.data prepare

clean-runs:
	rm -rf runs
