"""GRPO on several workers: 2 worker processes (gloo) against 1 with the same global batch give the same rollouts
and the same updates, for full weights and for LoRA; and the pipeline runs GRPO on Ray Train workers."""

from __future__ import annotations

import json
import os
import socket

import pytest
import torch
import torch.multiprocessing as mp

from alignment.config import load_config
from alignment.grpo import GRPOConfig, run_grpo
from rewards import RewardResult, reward
from tests.conftest import TINY_MODEL, TINY_TOKENIZER


@reward("grpo_workers_even_length")
def even_length(completion: str) -> RewardResult:
    return RewardResult(float(len(completion) % 2 == 0))


def _config(data, out, *extra) -> GRPOConfig:
    return load_config(GRPOConfig, None, [
        f"model.name_or_path={TINY_MODEL}", f"model.tokenizer={TINY_TOKENIZER}",
        f"data.train_path={data / 'train.jsonl'}", f"eval.test_path={data / 'test.jsonl'}",
        "rollout.prompts_per_step=4", "rollout.group_size=4", "rollout.max_new_tokens=8", "rollout.decode=continuous",
        "rollout.reasoning_off_fraction=0.5", "loss.overlong=keep", "loss.minibatches=2",
        "sampling.dynamic_sampling=true", "sampling.max_refill_rounds=1", "train.max_steps=3", "train.lr=1e-3",
        "train.sample_every=1", "rewards.rewards=[{name: grpo_workers_even_length}]", "rewards.mode=inprocess",
        "eval.max_samples=2", "eval.max_new_tokens=8", "eval.budgets=[null]",
        f"output_dir={out}", "device=cpu", "cpu_threads=1", *extra,
    ])


def _worker(rank: int, world: int, port: int, data, out, extra: list[str]) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.distributed.init_process_group("gloo", rank=rank, world_size=world)
    try:
        run_grpo(_config(data, out, *extra))
    finally:
        torch.distributed.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _records(out) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("lora", [False, True], ids=["full-weights", "lora"])
def test_two_workers_take_the_steps_of_one(tiny_data, tmp_path, lora):
    # Full weights at a tenth of LoRA's rate: Adam moves every weight by about lr per step, even one whose gradient
    # is float noise (a cancelling sum), so at 1e-3 the two sides' rounding grows into visibly different losses
    # within three steps on some CPUs (2e-6 apart on one, 2e-7 on another).
    extra = ["lora.enabled=true", "lora.r=4"] if lora else ["train.lr=1e-4"]
    run_grpo(_config(tiny_data, tmp_path / "one", *extra))
    mp.spawn(_worker, args=(2, _free_port(), tiny_data, tmp_path / "two", extra), nprocs=2, join=True)

    one, two = _records(tmp_path / "one"), _records(tmp_path / "two")
    assert [r["step"] for r in one] == [r["step"] for r in two] == [0, 1, 2, 3]
    for a, b in zip(one[:3], two[:3]):
        # the same rollouts: prompts, modes, tokens and rewards, dynamic sampling and the curriculum counted globally
        for key in ("reward_mean", "tokens_generated", "groups_rolled_out", "groups_kept", "pool_retired",
                    "reasoning_off_rate", "samples_trained", "tokens_trained"):
            assert a[key] == pytest.approx(b[key], rel=1e-9), key
        # learner log-probs from rows packed differently: float noise around the same value
        assert b["mismatch_abs_mean"] == pytest.approx(a["mismatch_abs_mean"], abs=1e-6)
        # The same updates, up to float rounding: the two sides pack the samples into different rows. The loss is
        # a mean of advantage x ratio terms of size ~1 that nearly cancel (advantages sum to 0 in a group), so its
        # rounding is absolute, ~1e-7, not relative to its small value.
        assert b["grad_norm"] == pytest.approx(a["grad_norm"], rel=1e-4)
        for key in ("loss", "approx_kl_old"):
            assert b[key] == pytest.approx(a[key], rel=1e-4, abs=1e-6), (key, a[key], b[key])
    assert one[0]["loss"] != one[-2]["loss"] and one[0]["grad_norm"] > 0  # it did train
    samples = [(tmp_path / run / "samples.jsonl").read_text() for run in ("one", "two")]
    assert samples[0] == samples[1]


def test_several_workers_sample_with_the_continuous_engine():
    from alignment.rollout.generation import decode_for_workers

    assert decode_for_workers("auto", "rollout.decode") == decode_for_workers("continuous", "x") == "continuous"
    with pytest.raises(ValueError, match="mining.decode='static'"):
        decode_for_workers("static", "mining.decode")
