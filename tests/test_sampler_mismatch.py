"""The sampler's log-probs against the learner's: recorded, compared every GRPO step, corrected by TIS on request;
and the overlong options that decide what a cut completion teaches."""

from __future__ import annotations

import dataclasses
import logging
import math
import random

import pytest
import torch

from alignment.advantages import IGNORE_INDEX, clipped_policy_loss
from alignment.config import ConfigError, load_config
from alignment.evaluate import EvalConfig, generation_settings
from alignment.rollout.generation import GenerationResult
from alignment.grpo import (
    Completion, GRPOConfig, Group, PolicyLossConfig, apply_overlong_penalty, collect_groups, learner_samples,
    overlong_penalty, policy_update, rollout,
)
from alignment.modeling import ModelConfig, load_model, load_tokenizer
from alignment.packed_model import enable_packed_sequences
from alignment.packing import SampleCollator
from alignment.grpo import RolloutConfig, SamplingConfig
from alignment.token_logprobs import sampler_mismatch
from rewards import RewardScorer, RewardsConfig, RewardSpec
from tests.conftest import TINY_MODEL, TINY_TOKENIZER

ROW = 256


def completion(n_tokens: int, reward: float, finished: bool = True) -> Completion:
    tokens = list(range(20, 20 + n_tokens))
    result = GenerationResult(tokens=tokens, forced_mask=[False] * n_tokens, logprobs=[-1.0] * n_tokens,
                              thinking_tokens=0, forced_close=False, finished=finished)
    return Completion(result=result, text="", reward=reward)


def seven_right_one_cut() -> Group:
    group = Group(0, {"id": "g"}, [1, 2, 3], True, None)
    group.completions = [completion(4, 1.0) for _ in range(7)] + [completion(8, 0.0, finished=False)]
    return group


# --- overlong ----------------------------------------------------------------------------------------------------


def test_mask_turns_one_cut_sample_into_a_finish_sooner_signal_and_exclude_does_not():
    group = seven_right_one_cut()
    samples, advantages, counts = learner_samples([group], PolicyLossConfig(overlong="mask", std_normalize=False))
    assert len(samples) == 7 and counts["overlong_filtered"] == 1
    assert torch.allclose(advantages, torch.full((7,), 1 / 7))  # every finished sample pushed up for not being cut
    assert group.has_signal("mask") and not group.has_signal("exclude")
    samples, advantages, counts = learner_samples([group], PolicyLossConfig(overlong="exclude"))
    assert len(samples) == 7 and counts["overlong_filtered"] == 1 and torch.all(advantages == 0)  # no signal
    kept, seen, _ = collect_groups(lambda n: [seven_right_one_cut() for _ in range(n)], 2,
                                   SamplingConfig(max_refill_rounds=1), overlong="exclude")
    assert kept == [] and len(seen) == 4  # dropped by dynamic sampling, refilled once, dropped again


def test_exclude_takes_the_baseline_over_finished_samples_only():
    group = Group(0, {"id": "g"}, [1, 2, 3], True, None)
    group.completions = [completion(4, 1.0), completion(4, 0.0), completion(8, 0.0, finished=False)]
    _, advantages, _ = learner_samples([group], PolicyLossConfig(overlong="exclude", std_normalize=False))
    assert torch.allclose(advantages, torch.tensor([1.0, -1.0]))  # leave-one-out over the two finished ones


def test_soft_overlong_penalty_is_daPO_ramp_and_minus_one_when_cut():
    def result(n, finished=True):
        return completion(n, 0.0, finished).result

    assert overlong_penalty(result(60), max_new_tokens=100, window=40) == 0.0
    assert overlong_penalty(result(80), max_new_tokens=100, window=40) == pytest.approx(-0.5)
    assert overlong_penalty(result(100), max_new_tokens=100, window=40) == pytest.approx(-1.0)
    assert overlong_penalty(result(30, finished=False), max_new_tokens=100, window=40) == -1.0
    group = seven_right_one_cut()
    apply_overlong_penalty([group], PolicyLossConfig(overlong="soft_penalty", overlong_window=4), max_new_tokens=8)
    assert group.rewards == [1.0] * 7 + [-1.0] and group.completions[7].scores["overlong_penalty"] == -1.0
    samples, _, counts = learner_samples([group], PolicyLossConfig(overlong="soft_penalty"))
    assert len(samples) == 8 and counts["overlong_filtered"] == 0  # penalised, and trained on


# --- the sampler's log-probs ---------------------------------------------------------------------------------------


def test_mismatch_statistics_by_hand():
    learner, sampler = torch.tensor([-1.0, -2.0, -0.5]), torch.tensor([-1.0, -2.5, -0.5])
    stats = sampler_mismatch(learner, sampler)
    assert stats["mismatch_abs_mean"] == pytest.approx(0.5 / 3) and stats["mismatch_abs_max"] == pytest.approx(0.5)
    assert stats["mismatch_kl_k3"] == pytest.approx((math.exp(0.5) - 1.5) / 3)


def test_tis_weights_scale_each_token_loss():
    logps, adv = torch.tensor([-1.0, -2.0]), torch.tensor([1.0, -1.0])
    plain, _ = clipped_policy_loss(logps, logps, adv)
    weighted, stats = clipped_policy_loss(logps, logps, adv, is_weights=torch.tensor([2.0, 0.5]))
    assert torch.allclose(weighted, plain * torch.tensor([2.0, 0.5])) and stats["tis_weight"].tolist() == [2.0, 0.5]


@pytest.fixture(scope="module")
def rolled_out():
    """One rollout batch of the tiny model at temperature 1, with its groups and learner samples."""
    tokenizer = load_tokenizer(ModelConfig(name_or_path=str(TINY_MODEL), tokenizer=str(TINY_TOKENIZER)))
    model = load_model(ModelConfig(name_or_path=str(TINY_MODEL), tokenizer=str(TINY_TOKENIZER)))
    settings = dataclasses.replace(generation_settings(tokenizer, EvalConfig()), temperature=1.0, max_new_tokens=12,
                                   batch_size=8)
    scorer = RewardScorer(RewardsConfig(rewards=[RewardSpec("length")], mode="inprocess"))
    rows = [(i, {"id": f"m{i}", "task": "math", "messages": [{"role": "user", "content": f"Start with {i}."}],
                 "answer": str(i)}) for i in range(3)]
    config = RolloutConfig(group_size=4, budget_fraction=0.5, budget_min=0, budget_max=3)
    groups, _ = rollout(model, tokenizer, rows, config, settings, scorer, random.Random(0), seed=0)
    samples, advantages, _ = learner_samples(groups, PolicyLossConfig(overlong="keep"), ROW)
    enable_packed_sequences(model)
    return model, tokenizer, samples, advantages


def update(model, samples, advantages, *overrides):
    config = load_config(GRPOConfig, None, ["rollout.max_new_tokens=12", f"train.max_tokens_per_row={ROW}",
                                            "train.rows_per_micro_batch=2", *overrides])
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=0.0)
    collator = SampleCollator(mode="packed", max_tokens_per_row=ROW)
    return policy_update(model, samples, advantages, config, collator, optimizer, None, random.Random(0))


def test_rollout_samples_carry_the_sampler_logprobs_and_the_learner_agrees(rolled_out):
    model, _, samples, advantages = rolled_out
    assert samples and all(len(s["sampler_logps"]) == len(s["input_ids"]) for s in samples)
    for s in samples:  # a NaN exactly where no token was sampled: the prompt and the forced close
        assert [math.isnan(v) for v in s["sampler_logps"]] == [label == IGNORE_INDEX for label in s["labels"]]
    stats = update(model, samples, advantages)
    assert 0 <= stats["mismatch_abs_mean"] <= stats["mismatch_abs_max"] < 1e-4  # same model, float32 on the CPU


def test_a_diverging_sampler_is_measured_and_tis_caps_the_correction(rolled_out, caplog):
    model, _, samples, advantages = rolled_out
    # A sampler that gave every token a third of the learner's probability: old / sampler = 3 everywhere.
    skewed = [dict(s, sampler_logps=[v - math.log(3) for v in s["sampler_logps"]]) for s in samples]
    stats = update(model, skewed, advantages)
    assert stats["mismatch_abs_mean"] == pytest.approx(math.log(3), abs=1e-4)
    assert stats["mismatch_kl_k3"] == pytest.approx(3 - 1 - math.log(3), abs=1e-4)  # k3 at learner / sampler = 3
    capped = update(model, skewed, advantages, "loss.tis_cap=2.0")
    assert capped["tis_weight"] == pytest.approx(2.0, abs=1e-4)
    assert capped["loss"] == pytest.approx(2 * stats["loss"], rel=1e-4)


def test_grpo_refuses_nucleus_sampling():
    with pytest.raises(ConfigError, match="rollout.top_p"):
        load_config(GRPOConfig, None, ["rollout.top_p=0.9"])
    with pytest.raises(ConfigError, match="tis_cap"):
        load_config(GRPOConfig, None, ["loss.tis_cap=0.5"])
