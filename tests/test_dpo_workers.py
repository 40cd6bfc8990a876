"""DPO on several workers: 2 worker processes (gloo) against 1 mine the same pairs and take the same steps, for
full weights and for LoRA (rounds after the first start from the merged result); the single worker accumulates
micro-batches of 2 pairs, the two workers take their shares whole."""

from __future__ import annotations

import json
import os

import pytest
import torch
import torch.multiprocessing as mp

from alignment.config import load_config
from alignment.dpo import DPOConfig, run_dpo
from tests.conftest import TINY_MODEL, TINY_TOKENIZER
from tests.test_grpo_workers import _free_port


def _config(data, out, *extra) -> DPOConfig:
    return load_config(DPOConfig, None, [
        f"model.name_or_path={TINY_MODEL}", f"model.tokenizer={TINY_TOKENIZER}",
        f"eval.test_path={data / 'test.jsonl'}", "eval.max_samples=2", "eval.max_new_tokens=8", "eval.budgets=[null]",
        "evaluate_start=false", f"mining.prompts_path={data / 'train.jsonl'}", "mining.prompts_per_round=5",
        "mining.samples_per_prompt=3", "mining.max_new_tokens=12", "mining.budgets=[null,4]",
        "mining.reasoning_off_fraction=0.3", "mining.rewards={rewards: [{name: length}], mode: inprocess}",
        "mining.min_margin=0.0", "mining.decode=continuous", "pairs.heldout_fraction=0.2",
        "train.max_steps=2", "train.pairs_per_step=5", "train.log_every=1", "train.lr=1.0e-3", "rounds=2",
        f"output_dir={out}", "device=cpu", *extra,
    ])


def _worker(rank: int, world: int, port: int, data, out, extra: list[str]) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.distributed.init_process_group("gloo", rank=rank, world_size=world)
    torch.set_num_threads(1)
    try:
        run_dpo(_config(data, out, *extra))
    finally:
        torch.distributed.destroy_process_group()


@pytest.mark.parametrize("lora", [False, True], ids=["full-weights", "lora"])
def test_two_workers_mine_and_train_as_one(tiny_data, tmp_path, lora):
    extra = ["lora.enabled=true", "lora.r=4"] if lora else []
    run_dpo(_config(tiny_data, tmp_path / "one", "train.pairs_per_micro_batch=2", *extra))
    mp.spawn(_worker, args=(2, _free_port(), tiny_data, tmp_path / "two", extra), nprocs=2, join=True)

    for round_file in ("round1.jsonl", "round2.jsonl"):  # the same pairs, in the same order
        one, two = [(tmp_path / run / "pairs" / round_file).read_text() for run in ("one", "two")]
        assert one == two and one
    records = [[json.loads(line) for line in (tmp_path / run / "metrics.jsonl").read_text().splitlines()
                if "dpo_loss" in line] for run in ("one", "two")]
    assert len(records[0]) == len(records[1]) == 4  # 2 rounds x 2 steps
    for a, b in zip(*records):
        for key in ("loss", "dpo_loss", "sft_loss", "grad_norm", "chosen_logps", "reward_margin"):
            assert b[key] == pytest.approx(a[key], rel=1e-4, abs=1e-7), (key, a[key], b[key])
    assert records[0][1]["reward_margin"] != 0  # it did train
