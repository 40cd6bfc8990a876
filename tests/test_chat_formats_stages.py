"""`align sft`, `align eval`, `align dpo` and `align grpo` end to end on the tiny model with each real chat format.

The tiny hybrid's vocabulary (384) holds each fixture tokenizer's byte-level ids, so the same random-init model
trains, samples and is graded through the Nano 2, Nemotron 3 and Llama-Nemotron templates.
"""

import json
from pathlib import Path

import pytest

from alignment.checkpoint import verify_checkpoint
from alignment.cli import main

HERE = Path(__file__).resolve().parent
TINY_MODEL = HERE.parent / "configs" / "tiny" / "model.json"
FORMATS = {"nano2": "keyword+inline", "nemotron3": "template-argument+field",
           "llama_nemotron": "system-prompt+inline+model-opens-think"}


def align(*args) -> None:
    assert main([str(a) for a in args]) == 0


@pytest.mark.slow
@pytest.mark.parametrize("name", list(FORMATS))
def test_every_stage_runs_with_the_format(name, tiny_data, tmp_path):
    tokenizer = HERE / "fixtures" / "chat_formats" / name
    test_rows = tiny_data / "test.jsonl"
    evaluation = [f"eval.test_path={test_rows}", "eval.max_samples=2", "eval.max_new_tokens=12", "eval.budgets=[4]",
                  "eval.tool_test_path="]
    align("sft", "configs/tiny/sft.yaml", f"model.name_or_path={TINY_MODEL}", f"model.tokenizer={tokenizer}",
          f"data.train_path={tiny_data / 'train.jsonl'}", f"data.test_path={test_rows}", "data.max_seq_len=1024",
          "data.truncation.fraction=0.5", "data.truncation.max_budget=16", "train.max_steps=2", "train.batch_size=4",
          "train.max_tokens_per_row=2048", "train.warmup_steps=1", "data.unpacked_paths=[]", *evaluation,
          f"output_dir={tmp_path / 'sft'}",
          "device=cpu")
    sft = tmp_path / "sft" / "checkpoint"
    saved = json.loads((sft / "tokenizer_config.json").read_text())
    assert saved["chat_format"] == FORMATS[name]  # later stages read the format from the checkpoint
    assert verify_checkpoint(sft)["data"]["truncation"]["truncated"] > 0

    align("eval", sft, f"output_dir={tmp_path / 'eval'}", *evaluation)
    result = json.loads((tmp_path / "eval" / "eval.json").read_text())
    completions = [e["completion"] for e in next(iter(result.values()))["examples"]["think"]]
    assert completions and all(not c.startswith("<think>") for c in completions)  # generation starts in the trace

    align("dpo", "configs/tiny/dpo.yaml", f"model.name_or_path={sft}", f"mining.prompts_path={tiny_data / 'train.jsonl'}",
          "mining.prompts_per_round=2", "mining.samples_per_prompt=3", "mining.max_new_tokens=12",
          "mining.budgets=[null,4]", "mining.reasoning_off_fraction=0.5", "mining.batch_size=8",
          "mining.rewards={rewards: [{name: length}], mode: inprocess}", "pairs.heldout_fraction=0",
          "mining.tool_prompts_path=",
          "rounds=1", "train.max_steps=1", "train.pairs_per_step=2", "selection.validation_path=",
          "evaluate_start=false", *evaluation, f"output_dir={tmp_path / 'dpo'}", "device=cpu")
    assert verify_checkpoint(tmp_path / "dpo" / "checkpoint")["stage"] == "dpo"

    align("grpo", "configs/tiny/grpo.yaml", f"model.name_or_path={sft}", f"data.train_path={tiny_data / 'train.jsonl'}",
          "rollout.prompts_per_step=2", "rollout.group_size=2", "rollout.max_new_tokens=12",
          "rollout.reasoning_off_fraction=0.5", "rollout.budget_fraction=0.5", "rollout.budget_max=4",
          "loss.overlong=keep", "sampling.dynamic_sampling=false", "train.max_steps=1",
          "rewards.rewards=[{name: length}]", *evaluation, f"output_dir={tmp_path / 'grpo'}", "device=cpu")
    assert verify_checkpoint(tmp_path / "grpo" / "checkpoint")["stage"] == "grpo"
