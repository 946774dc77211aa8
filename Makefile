# The two commands: `make demo` and `make test`. Both work from a fresh clone: they create
# .venv when missing and (re)install the project when pyproject.toml changed.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.her2jax-installed
DEMO   := runs/demo
PYTEST_ARGS ?=
# pytest-xdist workers, one per core of CI's 2-core machine (the serial suite left a core idle
# half the time: 26.7 min there, 17.5 min with two workers); whole test files go to a worker, so
# a module's fixtures are built once. PYTEST_WORKERS=0 runs in one process.
PYTEST_WORKERS ?= 2

.PHONY: demo test install lint clean-demo chromium

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip

# torch==2.13.0 (the parity extra) is the CPU build on these machines' disk; the parity tests
# compare the Flax encoders with PyTorch / MONAI references.
$(STAMP): pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install -q -e '.[dev,parity]'
	touch $@

# tests/test_report.py opens report.html in Debian's headless chromium through its chromedriver
# (CI: root on Debian 12). A no-op when both are installed; `apt-get update` only when the
# plain install fails (an empty or stale package list).
CHROMIUM_PACKAGES := chromium chromium-driver
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
APT_INSTALL := $(SUDO) env DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends

chromium:
	@if [ ! -x /usr/bin/chromium ] || [ ! -x /usr/bin/chromedriver ]; then \
	  $(APT_INSTALL) $(CHROMIUM_PACKAGES) || \
	  { $(SUDO) apt-get update && $(APT_INSTALL) $(CHROMIUM_PACKAGES); }; \
	fi

install: $(STAMP) chromium

test: $(STAMP) chromium
	$(BIN)/python -m pytest -q -n $(PYTEST_WORKERS) --dist loadfile $(PYTEST_ARGS)

lint: $(STAMP)
	$(BIN)/ruff check her2jax tests benchmarks configs

# Phantom cohort (300 patients, 3 centres) -> TFDS dataset -> train a tumour-region network
# on scanner-independent kinetic maps (configs/demo_cpu.py) -> evaluate on the held-out centre
# (printed next to the hand-made kinetic baseline) -> t-SNE / UMAP, feature- and image-space
# SHAP -> report.html.
# Re-running resumes / reuses; after configs/demo_cpu.py changed, `make clean-demo` first (the
# engine refuses to train another config into an existing workdir).
demo: $(STAMP)
	test -f $(DEMO)/cohort/clinical.csv || \
	  $(BIN)/her2jax-phantom --out=$(DEMO)/cohort --patients=300 --centers=3 --seed=0 \
	  --shape=96,96,48
	$(BIN)/her2jax-prepare --cohort=$(DEMO)/cohort --data_dir=$(DEMO)/data \
	  --config=configs/demo_cpu.py --noprogress
	$(BIN)/python -m her2jax.cli.inspect_data --data_dir=$(DEMO)/data --config=configs/demo_cpu.py
	$(BIN)/her2jax --config=configs/demo_cpu.py --workdir=$(DEMO)/run --mode=train \
	  --config.data.data_dir=$(DEMO)/data --noprogress
	$(BIN)/her2jax --workdir=$(DEMO)/run --mode=eval
	$(BIN)/her2jax --workdir=$(DEMO)/run --mode=analyze --noprogress
	@echo "outputs: $(DEMO)/run (config.json, metrics.jsonl, tensorboard/, checkpoints/, eval/, features/, analysis/)"
	@echo "report:  $(DEMO)/run/report.html"
	$(BIN)/python -m her2jax.cli.summary $(DEMO)/run

clean-demo:
	rm -rf $(DEMO)
