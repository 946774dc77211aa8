# The two commands: `make demo` and `make test`. Both work from a fresh clone: they create
# .venv when missing and (re)install the project when pyproject.toml changed.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.her2jax-installed
DEMO   := runs/demo
PYTEST_ARGS ?=

.PHONY: demo test install lint clean-demo

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip

# torch==2.13.0 (the parity extra) is the CPU build on these machines' disk; the parity tests
# compare the Flax encoders with PyTorch / MONAI references.
$(STAMP): pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install -q -e '.[dev,parity]'
	touch $@

install: $(STAMP)

test: $(STAMP)
	$(BIN)/python -m pytest -q $(PYTEST_ARGS)

lint: $(STAMP)
	$(BIN)/ruff check her2jax tests benchmarks configs

# Phantom cohort -> TFDS dataset -> a look at the train / val / test splits and one global
# batch. Later stages (train, evaluate, analyse, report) extend this chain.
demo: $(STAMP)
	test -f $(DEMO)/cohort/clinical.csv || \
	  $(BIN)/her2jax-phantom --out=$(DEMO)/cohort --patients=120 --centers=3 --seed=0
	$(BIN)/her2jax-prepare --cohort=$(DEMO)/cohort --data_dir=$(DEMO)/data \
	  --config=configs/demo_cpu.py
	$(BIN)/python -m her2jax.cli.inspect_data --data_dir=$(DEMO)/data --config=configs/demo_cpu.py

clean-demo:
	rm -rf $(DEMO)
