# Every target creates .venv from pyproject.toml on first use.
PYTHON ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
BENCH_STAMP := $(VENV)/.installed-bench

.PHONY: setup test test-all demo profile sweep bench bench-quick clean

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

sweep: $(STAMP)
	$(BIN)/hi-jax sweep --config=experiments/configs/equilibrium.py

# The bench extra pins the PyTorch CPU build that the baselines run on.
$(BENCH_STAMP): $(STAMP)
	$(BIN)/pip install --quiet -e '.[test,bench]'
	touch $(BENCH_STAMP)

# All benchmarks, the demo included; writes bench.json (docs/benchmarks.md).
bench: $(BENCH_STAMP)
	$(BIN)/python -m benchmarks.run --output bench.json

# A smaller sweep without the demo, a few minutes on 2 CPU cores.
bench-quick: $(BENCH_STAMP)
	$(BIN)/python -m benchmarks.run --quick --output bench.json

clean:
	rm -rf $(VENV) runs
