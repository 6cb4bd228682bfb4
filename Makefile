# fishcomp: `make demo` runs the whole pipeline on synthetic data; `make test` runs the tests.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
CONFIG ?= configs/demo.yaml
DATA ?= data
WORK ?= artifacts
OUT ?= submission.csv
REPORT ?= reports/demo
FISHCOMP := $(BIN)/fishcomp

.DEFAULT_GOAL := help
.PHONY: help install data demo test compare report bench precompute train ensemble submit run check clean clean-all

help: ## List the targets
	@grep -hE '^[a-zA-Z_-]+:.*?## ' $(MAKEFILE_LIST) | awk 'BEGIN {FS = ":.*?## "}; {printf "  \033[36m%-12s\033[0m %s\n", $$1, $$2}'
	@echo "  variables: CONFIG=$(CONFIG) DATA=$(DATA) WORK=$(WORK) OUT=$(OUT)"

$(STAMP): pyproject.toml constraints.txt
	@test -d $(VENV) || $(PYTHON) -m venv $(VENV)
	# pip, not uv: torch 2.14.1 / torchvision 0.29.1 come from this machine's disk that way;
	# constraints.txt pins them, pyproject.toml accepts any torch 2.x a user already has.
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -c constraints.txt -e '.[dev]'
	@touch $(STAMP)

install: $(STAMP) ## Create .venv and install fishcomp with pip

$(DATA)/train:
	$(FISHCOMP) synth $(DATA) --n-train 800 --n-test 200 --n-stage2 100 --seed 0

data: $(STAMP) $(DATA)/train ## Generate the synthetic dataset into DATA (if none is there)

demo: install data ## Synthetic data -> features -> heads -> ensemble -> validated submission.csv -> report
	$(FISHCOMP) run -c $(CONFIG) --data $(DATA) --work $(WORK) --out $(OUT)
	$(FISHCOMP) report $(CONFIG) --data $(DATA) --work $(WORK) --out $(REPORT)

report: install data ## Figures + index.html for CONFIG's runs and the dataset, in REPORT
	$(FISHCOMP) report $(CONFIG) --data $(DATA) --work $(WORK) --out $(REPORT)

# Test processes (pytest-xdist): a test's own work leaves part of the cores idle (Python between
# the backbone calls, figures, one-thread ranks), and another test's fills them. A file stays in
# one process (--dist loadfile), so its module fixtures are built once. TEST_WORKERS=0: one process.
TEST_WORKERS ?= 2
test: install ## Run the test suite (TEST_WORKERS processes)
	$(BIN)/python -m pytest -q --durations=15 $(if $(filter 0,$(TEST_WORKERS)),,-n $(TEST_WORKERS) --dist loadfile)

# The README's comparison table was measured on this set (1000 train images, seed 0).
COMPARE_DATA ?= data-compare
$(COMPARE_DATA)/train:
	$(FISHCOMP) synth $(COMPARE_DATA) --n-train 1000 --n-test 300 --n-stage2 100 --seed 0

compare: install $(COMPARE_DATA)/train ## Train every head on COMPARE_DATA, print the README's table (COMPARE_SET="--set k=v")
	$(BIN)/python scripts/compare.py --data $(COMPARE_DATA) --work $(WORK) $(COMPARE_SET)

bench: install ## Run the benchmark scripts (each ends with ratio=... target=...)
	$(BIN)/python scripts/bench_precompute.py
	$(BIN)/python scripts/bench_backbone_calls.py
	$(BIN)/python scripts/bench_folding.py
	$(BIN)/python scripts/bench_rerun.py --data $(DATA)
	$(BIN)/python scripts/bench_stage2.py --data $(DATA)
	$(BIN)/python scripts/bench_heads.py
	$(BIN)/python scripts/bench_map_heads.py
	$(BIN)/python scripts/bench_pipeline.py

check: install ## Check the dataset layout and print its tables
	$(FISHCOMP) check --data $(DATA)

precompute: install ## Backbone features for CONFIG
	$(FISHCOMP) precompute -c $(CONFIG) --data $(DATA) --work $(WORK)

train: install ## Train the head(s) of CONFIG (e.g. make train CONFIG=configs/dense.yaml)
	$(FISHCOMP) train -c $(CONFIG) --data $(DATA) --work $(WORK)

ensemble: install ## Blend the members of CONFIG
	$(FISHCOMP) ensemble -c $(CONFIG) --data $(DATA) --work $(WORK)

submit: install ## Write and validate OUT from CONFIG
	$(FISHCOMP) submit -c $(CONFIG) --data $(DATA) --work $(WORK) --out $(OUT)

clean: ## Delete the artifact cache and submissions (keeps data and .venv)
	rm -rf $(WORK) submission*.csv reports heatmaps

clean-all: clean ## Also delete the synthetic data and .venv
	find $(DATA) -mindepth 1 ! -name README.md -exec rm -rf {} +
	rm -rf $(VENV)
