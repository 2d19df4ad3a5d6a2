# The two commands a newcomer runs on a fresh machine (see README.md):
#   make quickstart   set up, then run the quickstart sweep end to end (plan, train, fit, plot)
#   make test         set up, then lint and run the whole test suite
# Setup installs torch 2.13.0 first (the CPU build on the machine's disk), so that the
# project's own torch range installs nothing more.

PYTHON ?= python3
VENV ?= .venv
BIN = $(VENV)/bin
STAMP = $(VENV)/.installed

.PHONY: setup quickstart test lint clean

setup: $(STAMP)

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet torch==2.13.0
	$(BIN)/pip install --quiet -e '.[dev]'
	touch $(STAMP)

quickstart: $(STAMP)
	$(BIN)/scaling run sweeps/quickstart.yaml

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

test: lint
	scripts/slurm-local.sh start || echo "no local SLURM cluster: the SLURM tests will be skipped"
	$(BIN)/pytest -ra

clean:
	rm -rf $(VENV)
