# hybrid-align: every target creates .venv and installs into it on first use.
# `make demo` runs the pipeline on the embedded tiny default; `make test` runs the tests.

VENV        ?= .venv
PYTHON      := $(VENV)/bin/python
ALIGN       := $(VENV)/bin/align
# Installed first, on its own: a looser requirement resolved together with the project would pull a CUDA build.
TORCH_SPEC  ?= torch==2.13.0
CONFIG_DIR  ?= configs/tiny
STAMP       := $(VENV)/.installed
ARGS        ?=

.PHONY: setup test test-slow demo demo-tools demo-rlhf data sft dpo grpo eval pipeline budget-ablation budget-study bench-sft bench-sandbox clean

setup: $(STAMP)

$(STAMP): pyproject.toml
	@test -x $(PYTHON) || python3 -m venv $(VENV)
	@$(PYTHON) -c "import torch" 2>/dev/null || $(PYTHON) -m pip install -q "$(TORCH_SPEC)"
	$(PYTHON) -m pip install -q -e ".[dev,deepspeed]"
	@# The code sandbox isolates programs with bubblewrap (Debian package); install it where we can.
	@command -v bwrap >/dev/null || { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null && \
	  (apt-get install -y -q bubblewrap >/dev/null 2>&1 || (apt-get update -q >/dev/null && apt-get install -y -q bubblewrap >/dev/null)) \
	  || echo "note: bubblewrap (bwrap) not installed; the code sandbox will refuse to run unisolated programs"; }
	@touch $(STAMP)

test: setup
	$(PYTHON) -m pytest -q

# The slow suite logs a tiny run to wandb, MLflow and trackio (offline): the `trackers` extra.
$(VENV)/.trackers: $(STAMP)
	$(PYTHON) -m pip install -q -e ".[dev,deepspeed,trackers]"
	@touch $@

test-slow: setup $(VENV)/.trackers
	@# exit code 5 means no test carried the marker; that is not a failure.
	$(PYTHON) -m pytest -q -m slow || [ $$? -eq 5 ]

TINY_DATA   := runs/data/tiny/train.jsonl
TINY_SFT    := runs/tiny/sft/checkpoint/manifest.json

data: setup
	$(ALIGN) data $(CONFIG_DIR)/data.yaml $(ARGS)

$(TINY_DATA): | setup
	$(ALIGN) data $(CONFIG_DIR)/data.yaml

sft: $(TINY_DATA)
	$(ALIGN) sft $(CONFIG_DIR)/sft.yaml $(ARGS)

# DPO and GRPO start from the SFT checkpoint; it is trained first when missing.
$(TINY_SFT): | $(TINY_DATA)
	$(ALIGN) sft $(CONFIG_DIR)/sft.yaml

eval: $(TINY_SFT)
	$(ALIGN) eval runs/tiny/sft/checkpoint --config $(CONFIG_DIR)/eval.yaml $(ARGS)

# The whole pipeline on the embedded tiny default (local Ray): runs/demo/report.md, runs/demo/metrics.json.
demo: setup
	$(ALIGN) pipeline $(CONFIG_DIR)/pipeline.yaml run_dir=runs/demo $(ARGS)

# The tool-calling recipe end to end (tool SFT stage, tool pairs in DPO, tool episodes in GRPO): runs/demo-tools.
demo-tools: setup
	$(ALIGN) pipeline $(CONFIG_DIR)/tools/pipeline.yaml run_dir=runs/demo-tools $(ARGS)

# RLHF end to end (synthetic preferences, a reward model, GRPO against it, a merge of SFT and GRPO): runs/demo-rlhf.
demo-rlhf: setup
	$(ALIGN) pipeline $(CONFIG_DIR)/rlhf/pipeline.yaml run_dir=runs/demo-rlhf $(ARGS)

dpo grpo: $(TINY_SFT)
	$(ALIGN) $@ $(CONFIG_DIR)/$@.yaml $(ARGS)

pipeline: setup
	$(ALIGN) pipeline $(CONFIG_DIR)/pipeline.yaml $(ARGS)

budget-ablation: $(TINY_DATA)
	$(ALIGN) sft $(CONFIG_DIR)/sft.yaml output_dir=runs/ablation/with-truncation $(ARGS)
	$(ALIGN) sft $(CONFIG_DIR)/sft.yaml output_dir=runs/ablation/without-truncation data.truncation.fraction=0 $(ARGS)
	$(ALIGN) eval runs/ablation/with-truncation/checkpoint runs/ablation/without-truncation/checkpoint \
	  --config $(CONFIG_DIR)/eval.yaml output_dir=runs/ablation

# Budget control that pays (README): per seed, on the redundant task, plain SFT, budget-trained SFT (stated budgets,
# compressed traces) and budget-aware GRPO after it, the three evaluated with the budget sweep; then the figures over
# seeds in $(STUDY)/report.md and budget_curve.png.
SEEDS       ?= 0 1
STUDY       ?= runs/budget
BUDGET_SFT  := data.truncation.fraction=0.5 data.truncation.compress=true data.truncation.state_budget=true

REDUNDANT_DATA := runs/data/tiny_redundant/train.jsonl

budget-study: $(foreach seed,$(SEEDS),$(STUDY)/seed$(seed)/eval/eval.json) | setup
	$(ALIGN) budget-report $(foreach seed,$(SEEDS),$(STUDY)/seed$(seed)/eval) --out $(STUDY)

$(REDUNDANT_DATA): $(CONFIG_DIR)/data_redundant.yaml | setup
	$(ALIGN) data $(CONFIG_DIR)/data_redundant.yaml

# Each model of a seed is a target of its own: a finished one is not trained again (unless its config or the data
# changed), and `make -j4 budget-study` on a
# GPU machine trains the two seeds' four SFT models at once (on 2 CPU cores, -j only shares them).
SEED_RUN = $(STUDY)/seed$*
.PRECIOUS: $(STUDY)/seed%/sft-plain/checkpoint/manifest.json $(STUDY)/seed%/sft-budget/checkpoint/manifest.json \
          $(STUDY)/seed%/grpo-budget/checkpoint/manifest.json  # checkpoints, not intermediates to delete

$(STUDY)/seed%/sft-plain/checkpoint/manifest.json: $(CONFIG_DIR)/budget/sft.yaml $(REDUNDANT_DATA)
	$(ALIGN) sft $(CONFIG_DIR)/budget/sft.yaml train.seed=$* model.init_seed=$* output_dir=$(SEED_RUN)/sft-plain

$(STUDY)/seed%/sft-budget/checkpoint/manifest.json: $(CONFIG_DIR)/budget/sft.yaml $(REDUNDANT_DATA)
	$(ALIGN) sft $(CONFIG_DIR)/budget/sft.yaml train.seed=$* model.init_seed=$* $(BUDGET_SFT) data.truncation.seed=$* \
	  output_dir=$(SEED_RUN)/sft-budget

$(STUDY)/seed%/grpo-budget/checkpoint/manifest.json: $(CONFIG_DIR)/budget/grpo.yaml \
                                                    $(STUDY)/seed%/sft-budget/checkpoint/manifest.json
	$(ALIGN) grpo $(CONFIG_DIR)/budget/grpo.yaml model.name_or_path=$(SEED_RUN)/sft-budget/checkpoint train.seed=$* \
	  output_dir=$(SEED_RUN)/grpo-budget

$(STUDY)/seed%/eval/eval.json: $(CONFIG_DIR)/budget/eval.yaml $(STUDY)/seed%/sft-plain/checkpoint/manifest.json \
                               $(STUDY)/seed%/grpo-budget/checkpoint/manifest.json
	$(ALIGN) eval $(SEED_RUN)/sft-plain/checkpoint $(SEED_RUN)/sft-budget/checkpoint $(SEED_RUN)/grpo-budget/checkpoint \
	  --config $(CONFIG_DIR)/budget/eval.yaml output_dir=$(SEED_RUN)/eval

bench-sandbox: setup
	$(PYTHON) bench/bench_sandbox.py

bench-sft: setup
	$(PYTHON) bench/bench_sft.py $(ARGS)

clean:
	rm -rf runs
