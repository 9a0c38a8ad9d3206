# Every target creates .venv from pyproject.toml on first use.
PYTHON ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: setup test test-all demo profile clean

setup: $(STAMP)

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[test]'
	touch $(STAMP)

# Fast suite: statistical checks at reduced sample counts, slow ones skipped.
test: $(STAMP)
	$(BIN)/python -m pytest -q -n 2

# Everything, including the long statistical and end-to-end checks.
test-all: $(STAMP)
	$(BIN)/python -m pytest -q -n 2 --runslow

demo: $(STAMP)
	$(BIN)/hi-jax demo

profile: $(STAMP)
	$(BIN)/hi-jax profile --config=experiments/configs/profile.py

clean:
	rm -rf $(VENV) runs
