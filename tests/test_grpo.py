"""GRPO: advantage and loss math against hand-computed values, the loss masks (forced tokens, overlong completions),
dynamic sampling, reward routing and failures, and one end-to-end step on the tiny model."""

from __future__ import annotations

import json
import math
import random
import threading

import pytest
import torch

from alignment.advantages import IGNORE_INDEX, clipped_policy_loss, group_advantages
from alignment.checkpoint import verify_checkpoint
from alignment.config import load_config
from alignment.rollout.generation import GenerationResult
from alignment.grpo import (
    Completion, GRPOConfig, Group, PolicyLossConfig, RolloutConfig, SamplingConfig, collect_groups,
    learner_samples, rollout, run_grpo, score_completions,
)
from alignment.token_logprobs import model_token_logps, token_logps
from envs.code_tasks import generate_code_tasks
from rewards import RewardResult, RewardScorer, RewardsConfig, RewardSpec, reward
from tests.conftest import TINY_MODEL, TINY_TOKENIZER, killed_on_call


def completion(tokens, rew=0.0, finished=True, forced=None) -> Completion:
    forced = forced or [False] * len(tokens)
    result = GenerationResult(tokens=list(tokens), forced_mask=forced, thinking_tokens=0,
                              logprobs=[float("nan") if f else -1.0 for f in forced],
                              forced_close=any(forced), finished=finished)
    return Completion(result=result, text="", reward=rew)


def group(rewards, index=0, finished=None, prompt=(1, 2, 3)) -> Group:
    finished = finished or [True] * len(rewards)
    g = Group(row_index=index, row={"id": f"r{index}"}, prompt_ids=list(prompt), reasoning=True, budget=None)
    g.completions = [completion([10 + k, 11, 4], r, f) for k, (r, f) in enumerate(zip(rewards, finished))]
    return g


# --- advantages ---------------------------------------------------------------------------------------------------


def test_group_advantages_by_hand():
    rewards = torch.tensor([[1.0, 0.0, 0.0, 1.0], [1.0, 1.0, 1.0, 1.0], [1.0, 0.0, 0.0, 0.0]])
    # Leave-one-out, no std: baseline of a 1 in [1,0,0,1] is (2-1)/3, of a 0 is 2/3 -> +-2/3.
    loo = group_advantages(rewards, std_normalize=False, leave_one_out=True)
    assert torch.allclose(loo[0], torch.tensor([2 / 3, -2 / 3, -2 / 3, 2 / 3]))
    # [1,0,0,0]: the 1 has baseline 0 -> +1; each 0 has baseline 1/3 -> -1/3.
    assert torch.allclose(loo[2], torch.tensor([1.0, -1 / 3, -1 / 3, -1 / 3]))
    # Group mean, no std: +-0.5.
    mean = group_advantages(rewards, std_normalize=False, leave_one_out=False)
    assert torch.allclose(mean[0], torch.tensor([0.5, -0.5, -0.5, 0.5]))
    # Std (Bessel) of [1,0,0,1] is sqrt(1/3): 0.5 / 0.57735 = 0.8660; (2/3) / 0.57735 = 1.1547.
    assert torch.allclose(group_advantages(rewards, True, False)[0], torch.tensor([0.8660, -0.8660, -0.8660, 0.8660]),
                          atol=1e-4)
    assert torch.allclose(group_advantages(rewards, True, True)[0], torch.tensor([1.1547, -1.1547, -1.1547, 1.1547]),
                          atol=1e-4)
    # A group with equal rewards carries no signal, whatever the options.
    for std in (True, False):
        for loo_on in (True, False):
            assert torch.all(group_advantages(rewards, std, loo_on)[1] == 0)


def test_group_advantages_match_a_slow_loop():
    rewards = torch.rand(5, 6, generator=torch.Generator().manual_seed(0))
    fast = group_advantages(rewards, std_normalize=True, leave_one_out=True)  # float32
    for p in range(5):
        row = rewards[p].tolist()
        std = math.sqrt(sum((r - sum(row) / 6) ** 2 for r in row) / 5)
        for i in range(6):
            others = [r for j, r in enumerate(row) if j != i]
            # Absolute: the loop is float64, and an advantage near 0 is a float32 difference of O(1) rewards.
            assert fast[p, i].item() == pytest.approx((row[i] - sum(others) / 5) / (std + 1e-6), abs=1e-5)


# --- loss ---------------------------------------------------------------------------------------------------------


def test_clipped_loss_by_hand():
    ratios = torch.tensor([1.5, 0.5, 1.1, 0.7, 1.5])
    advantages = torch.tensor([1.0, -1.0, 2.0, 1.0, -1.0])
    old = torch.tensor([-1.0, -2.0, -0.5, -3.0, -1.0])
    logps = (old + ratios.log()).requires_grad_()
    loss, stats = clipped_policy_loss(logps, old, advantages, clip_low=0.2, clip_high=0.28)
    # 1.5 with A>0: clipped to 1.28.  0.5 with A<0: clipped to 0.8 -> +0.8.  1.1 * 2: inside.  0.7 with A>0: the
    # unclipped 0.7 is the smaller, kept.  1.5 with A<0: the unclipped -1.5 is the smaller (pessimistic), kept.
    assert torch.allclose(loss, torch.tensor([-1.28, 0.8, -2.2, -0.7, 1.5]), atol=1e-6)
    assert stats["clipped_high"].tolist() == [1, 0, 0, 0, 0]
    assert stats["clipped_low"].tolist() == [0, 1, 0, 0, 0]
    loss.sum().backward()
    # d(-ratio * A)/d logp = -ratio * A where the unclipped term is active; 0 where the clip holds.
    assert torch.allclose(logps.grad, torch.tensor([0.0, 0.0, -2.2, -0.7, 1.5]), atol=1e-6)


def test_kl_term_by_hand():
    logps = torch.tensor([-1.0, -2.0])
    ref = torch.tensor([-1.5, -1.0])
    loss, stats = clipped_policy_loss(logps, logps, torch.zeros(2), ref_logps=ref, kl_coef=0.1)
    d = ref - logps  # k3: exp(d) - d - 1
    expected = torch.exp(d) - d - 1
    assert torch.allclose(stats["kl_ref"], expected)
    assert torch.allclose(loss, 0.1 * expected)


def test_token_logps_match_a_slow_loop():
    logits = torch.randn(2, 5, 7)
    labels = torch.tensor([[IGNORE_INDEX, 3, 1, IGNORE_INDEX, 2], [IGNORE_INDEX, IGNORE_INDEX, 6, 0, 5]])
    fast = token_logps(logits, labels, temperature=0.7)
    for r in range(2):
        for t in range(4):
            y = labels[r, t + 1].item()
            want = 0.0 if y == IGNORE_INDEX else torch.log_softmax(logits[r, t] / 0.7, -1)[y].item()
            assert fast[r, t].item() == pytest.approx(want, abs=1e-5)


# --- what goes into the loss --------------------------------------------------------------------------------------


def test_forced_tokens_are_not_in_the_loss():
    g = Group(0, {"id": "a"}, [1, 2], True, budget=0)
    g.completions = [
        completion([50, 51, 52, 4], 1.0, forced=[True, True, False, False]),  # the forced close, then the answer
        completion([60, 61, 4], 0.0),
    ]
    samples, advantages, counts = learner_samples([g], PolicyLossConfig())
    assert samples[0]["labels"] == [IGNORE_INDEX] * 2 + [IGNORE_INDEX, IGNORE_INDEX, 52, 4]
    assert samples[1]["labels"] == [IGNORE_INDEX] * 2 + [60, 61, 4]
    assert counts["forced_tokens_masked"] == 2 and counts["loss_tokens"] == 5
    assert advantages[0] > 0 > advantages[1]


@pytest.mark.parametrize("decode", ["auto", "continuous"])
def test_budgeted_rollout_masks_what_generation_forced(tokenizer, decode):
    from alignment.modeling import ModelConfig, load_model
    from alignment.evaluate import EvalConfig, generation_settings
    import dataclasses

    model = load_model(ModelConfig(name_or_path=str(TINY_MODEL), tokenizer=str(TINY_TOKENIZER)))
    settings = dataclasses.replace(generation_settings(tokenizer, EvalConfig()), temperature=1.0, max_new_tokens=6,
                                   decode=decode)
    config = RolloutConfig(group_size=2, budget_fraction=1.0, budget_min=0, budget_max=0)
    scorer = RewardScorer(RewardsConfig(rewards=[RewardSpec("grpo_test_length")], mode="inprocess"))
    rows = [(0, {"id": "m0", "task": "math", "messages": [{"role": "user", "content": "Start with 3."}], "answer": "3"})]
    groups, timings = rollout(model, tokenizer, rows, config, settings, scorer, random.Random(0), seed=0)
    assert groups[0].budget == 0 and set(timings) >= {"generate", "reward_wait"}
    close = tokenizer("</think>", add_special_tokens=False)["input_ids"]
    samples, _, counts = learner_samples(groups, PolicyLossConfig(overlong="keep"))
    for c, sample in zip(groups[0].completions, samples):
        assert c.result.tokens[: len(close)] == close and c.result.forced_mask[: len(close)] == [True] * len(close)
        completion_labels = sample["labels"][len(groups[0].prompt_ids):]
        assert completion_labels[: len(close)] == [IGNORE_INDEX] * len(close)
        assert completion_labels[len(close):] == c.result.tokens[len(close):]
    assert counts["forced_tokens_masked"] == 2 * len(close)


def test_overlong_completions_are_filtered_but_count_in_the_baseline():
    g = group([1.0, 0.0, 0.0, 1.0], finished=[True, True, False, True])
    samples, advantages, counts = learner_samples([g], PolicyLossConfig(std_normalize=False, overlong="mask"))
    assert counts["overlong_filtered"] == 1 and len(samples) == 3
    assert samples[2]["input_ids"][3] == 13  # the 4th completion; the cut 3rd one is gone
    # The baselines still include the cut completion's reward: +-2/3 as in [1, 0, 0, 1].
    assert torch.allclose(advantages, torch.tensor([2 / 3, -2 / 3, 2 / 3]))
    samples, _, counts = learner_samples([g], PolicyLossConfig(overlong="keep"))
    assert counts["overlong_filtered"] == 0 and len(samples) == 4


def test_a_sample_longer_than_a_learner_row_is_dropped_and_counted_not_cut():
    g = group([1.0, 0.0, 0.0, 1.0])  # prompt of 3 tokens, completions of 3: 6 tokens each
    g.completions[1].result.tokens = [20, 21, 22, 23, 4]  # 8 tokens with the prompt
    g.completions[1].result.forced_mask = [False] * 5
    samples, advantages, counts = learner_samples([g], PolicyLossConfig(std_normalize=False), max_tokens_per_row=6)
    assert counts["too_long_dropped"] == 1 and len(samples) == 3
    assert all(len(s["input_ids"]) <= 6 for s in samples)
    assert torch.allclose(advantages, torch.tensor([2 / 3, -2 / 3, 2 / 3]))  # its reward still in the baselines
    assert learner_samples([g], PolicyLossConfig(), max_tokens_per_row=8)[2]["too_long_dropped"] == 0


# --- dynamic sampling ---------------------------------------------------------------------------------------------


def test_dynamic_sampling_drops_zero_variance_groups_and_refills():
    script = iter([
        [group([1, 0]), group([0, 0]), group([1, 1]), group([0, 1])],  # two groups without signal
        [group([0, 0]), group([1, 0])],  # refill asked for two: one more kept
        [group([1, 0])],  # second refill: full
    ])
    asked = []

    def rollout_fn(n):
        asked.append(n)
        return next(script)

    kept, seen, rounds = collect_groups(rollout_fn, 4, SamplingConfig(max_refill_rounds=3), "mask")
    assert asked == [4, 2, 1] and rounds == 2 and len(kept) == 4 and len(seen) == 7
    assert all(g.has_signal("mask") for g in kept)


def test_dynamic_sampling_is_bounded_and_can_be_off():
    calls = []

    def no_signal(n):
        calls.append(n)
        return [group([1, 1]) for _ in range(n)]

    kept, seen, rounds = collect_groups(no_signal, 3, SamplingConfig(max_refill_rounds=2), "mask")
    assert kept == [] and rounds == 2 and calls == [3, 3, 3]
    kept, _, rounds = collect_groups(no_signal, 3, SamplingConfig(dynamic_sampling=False), "mask")
    assert len(kept) == 3 and rounds == 0


# --- rewards ------------------------------------------------------------------------------------------------------


@reward("grpo_test_length")
def length_reward(completion: str) -> float:
    return float(len(completion) % 2)


@reward("grpo_test_flaky")
def flaky_reward(completion: str) -> RewardResult:
    """Fails on every third completion length; otherwise prefers even lengths."""
    if len(completion) % 3 == 0:
        raise RuntimeError("flaky reward")
    return RewardResult(float(len(completion) % 2 == 0))


def test_mixed_math_and_code_batch_routes_each_row_to_its_reward():
    from envs.sandbox import Sandbox

    isolated, _, why = Sandbox()._check()
    if not isolated:
        pytest.skip(f"sandbox isolation unavailable here: {why}")
    code_row = generate_code_tasks(1, seed=0)[0]
    math_row = {"id": "m", "task": "math", "answer": "7", "messages": [{"role": "user", "content": "3 + 4?"}]}
    scorer = RewardScorer(RewardsConfig(rewards=[RewardSpec("math")], routes={"code": [RewardSpec("code_tests")]},
                                        mode="inprocess"))
    math_group = Group(0, math_row, [1], True, None)
    code_group = Group(1, code_row, [1], True, None)
    items = [
        (math_group, Completion(completion([1]).result, "3 + 4 = 7\n</think>\nThe result is \\boxed{7}.")),
        (code_group, Completion(completion([1]).result, f"</think>\n```python\n{code_row['solution']}```")),
        (math_group, Completion(completion([1]).result, "</think>\nThe result is \\boxed{8}.")),
        (code_group, Completion(completion([1]).result, "</think>\n```python\ndef nothing():\n    pass\n```")),
    ]
    score_completions(scorer, items)
    scores = [c.scores for _, c in items]
    assert scores == [{"math": 1.0}, {"code_tests": 1.0}, {"math": 0.0}, {"code_tests": 0.0}]
    assert [c.reward for _, c in items] == [1.0, 1.0, 0.0, 0.0]


def test_failing_reward_gives_the_failure_score():
    scorer = RewardScorer(RewardsConfig(rewards=[RewardSpec("grpo_test_flaky")], failure_score=-1.0, mode="inprocess"))
    g = Group(0, {"id": "x"}, [1], True, None)
    items = [(g, Completion(completion([1]).result, text)) for text in ("abc", "ab", "a")]
    score_completions(scorer, items)
    assert [c.reward for _, c in items] == [-1.0, 1.0, 0.0]
    assert [c.reward_failed for _, c in items] == [True, False, False]


# --- end to end ---------------------------------------------------------------------------------------------------


def test_one_step_end_to_end_with_a_failing_reward(tiny_data, tmp_path):
    """A step with a reward that fails on part of the batch trains, logs the failures, and writes a checkpoint."""
    out = tmp_path / "run"
    config = load_config(GRPOConfig, None, [
        f"model.name_or_path={TINY_MODEL}", f"model.tokenizer={TINY_TOKENIZER}",
        f"data.train_path={tiny_data / 'train.jsonl'}", f"eval.test_path={tiny_data / 'test.jsonl'}",
        "rollout.prompts_per_step=2", "rollout.group_size=4", "rollout.max_new_tokens=8",
        "rollout.reasoning_off_fraction=0.5", "rollout.budget_fraction=0.5", "rollout.budget_max=2",
        "loss.overlong=keep",  # a random-init model rarely ends within 8 tokens
        "sampling.dynamic_sampling=false", "train.max_steps=1",
        "rewards.rewards=[{name: grpo_test_flaky}]", "rewards.mode=inprocess",
        "eval.max_samples=2", "eval.max_new_tokens=8", "eval.budgets=[2]", "evaluate_before=true",
        f"output_dir={out}", "device=cpu", "cpu_threads=1",
    ])
    summary = run_grpo(config)
    manifest = verify_checkpoint(out / "checkpoint")
    assert manifest["stage"] == "grpo" and manifest["metrics"]["samples"] == 2
    assert {"accuracy_think", "before", "budget_sweep"} <= set(summary)
    step = json.loads((out / "metrics.jsonl").read_text().splitlines()[0])
    assert step["updates"] == 2 and step["samples_trained"] == 8 and step["reward_failures"] > 0
    assert all(step[f"time_{phase}"] > 0 for phase in ("generate", "learn", "step")) and "time_reward" in step
    assert (out / "reward_curve.png").stat().st_size > 0 and (out / "samples.jsonl").read_text()
    assert set(json.loads((out / "eval.json").read_text())) == {"before", "after"}


HANGING_CALLS: list[str] = []


@reward("grpo_test_hangs")
def hanging_reward(completion: str) -> float:
    HANGING_CALLS.append(completion)
    threading.Event().wait(60)  # an abandoned daemon thread; the run goes on without it
    return 1.0


def test_a_reward_that_always_hangs_costs_a_few_timeouts_not_one_per_sample(tiny_data, tmp_path):
    """3 steps of 8 samples: without the failure guard, 24 timeouts one after another in waves of 4."""
    out = tmp_path / "run"
    config = _resumable_config(tiny_data, out, "train.max_steps=3", "train.save_every=0", "rewards.rewards=["
                               "{name: grpo_test_hangs}, {name: grpo_test_even_length}]", "rewards.timeout_s=0.3",
                               "rewards.max_concurrency=4", "rewards.failure_window=4", "rewards.on_failing=disable")
    HANGING_CALLS.clear()
    run_grpo(config)
    assert 4 <= len(HANGING_CALLS) <= 4 + 4 - 1  # the window, plus calls already running when it filled
    steps = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [s["step"] for s in steps[:3]] == [0, 1, 2] and all(s["reward_failures"] == 8 for s in steps[:3])


@reward("grpo_test_even_length")
def even_length_reward(completion: str) -> RewardResult:
    return RewardResult(float(len(completion) % 2 == 0))


def _resumable_config(tiny_data, out, *extra):
    return load_config(GRPOConfig, None, [
        f"model.name_or_path={TINY_MODEL}", f"model.tokenizer={TINY_TOKENIZER}",
        f"data.train_path={tiny_data / 'train.jsonl'}", f"eval.test_path={tiny_data / 'test.jsonl'}",
        "rollout.prompts_per_step=2", "rollout.group_size=4", "rollout.max_new_tokens=8", "loss.overlong=keep",
        "sampling.dynamic_sampling=false", "train.max_steps=4", "train.sample_every=1", "train.lr=1e-3",
        "rewards.rewards=[{name: grpo_test_even_length}]", "rewards.mode=inprocess",
        "eval.max_samples=2", "eval.max_new_tokens=8", "eval.budgets=[null]",
        f"output_dir={out}", "device=cpu", "cpu_threads=1", *extra,
    ])


@pytest.mark.parametrize("lora", [False, True])
def test_a_killed_run_resumes_from_its_saved_step(tiny_data, tmp_path, monkeypatch, lora):
    """Killed in step 3 with a state saved after step 2, the rerun continues at step 2 with the losses of a run
    never stopped, and its records hold each step once."""
    import alignment.grpo as grpo

    extra = ["lora.enabled=true", "lora.r=4"] if lora else []
    run_grpo(_resumable_config(tiny_data, tmp_path / "whole", *extra))
    whole = [json.loads(line) for line in (tmp_path / "whole" / "metrics.jsonl").read_text().splitlines()]

    out = tmp_path / "killed"
    update = grpo.policy_update
    monkeypatch.setattr(grpo, "policy_update", killed_on_call(update, 4))  # in step 3 (steps count from 0)
    with pytest.raises(KeyboardInterrupt):
        run_grpo(_resumable_config(tiny_data, out, "train.save_every=2", *extra))
    assert [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()] == [0, 1, 2]
    assert (out / "last").is_dir() and not (out / "checkpoint").exists()

    monkeypatch.setattr(grpo, "policy_update", update)
    loaded_steps, load = [], grpo.resume_training

    def recording_resume(directory, fingerprint, model, optimizer, state):
        resumed = load(directory, fingerprint, model, optimizer, state)
        loaded_steps.append(state.step if resumed else None)
        return resumed

    monkeypatch.setattr(grpo, "resume_training", recording_resume)
    run_grpo(_resumable_config(tiny_data, out, "train.save_every=2", *extra))
    assert loaded_steps == [2]  # the state saved after step 2 was loaded
    resumed = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in resumed] == [0, 1, 2, 3, 4]  # steps 0-3, then the evaluation at step 4
    for a, b in zip(whole[:4], resumed[:4]):
        assert a["reward_mean"] == b["reward_mean"] and a["tokens_generated"] == b["tokens_generated"]
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-5, abs=1e-7)
        assert b["grad_norm"] == pytest.approx(a["grad_norm"], rel=1e-5)
    assert {json.loads(line)["step"] for line in (out / "samples.jsonl").read_text().splitlines()} == {0, 1, 2, 3}
    assert not (out / "last").exists() and verify_checkpoint(out / "checkpoint")["stage"] == "grpo"


def test_a_rerun_that_starts_over_sets_the_earlier_record_aside(tiny_data, tmp_path):
    out = tmp_path / "run"
    run_grpo(_resumable_config(tiny_data, out, "train.max_steps=2"))
    run_grpo(_resumable_config(tiny_data, out, "train.max_steps=1"))
    assert [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()] == [0, 1]
    earlier = out / "previous" / "1"
    assert [json.loads(line)["step"] for line in (earlier / "metrics.jsonl").read_text().splitlines()] == [0, 1, 2]
    assert (earlier / "samples.jsonl").is_file() and (earlier / "tensorboard").is_dir()


def test_tiny_config_loads():
    config = load_config(GRPOConfig, "configs/tiny/grpo.yaml")
    assert config.loss.clip_low == 0.2 and config.loss.clip_high == 0.28 and config.loss.kl_coef == 0.0
    with pytest.raises(ValueError, match="group_size"):
        load_config(GRPOConfig, "configs/tiny/grpo.yaml", ["rollout.group_size=1"])


# --- curriculum and KL reference ----------------------------------------------------------------------------------


def test_curriculum_retires_prompts_solved_by_every_completion():
    from alignment.grpo import PromptPool

    pool = PromptPool([{"id": i} for i in range(4)], seed=0)
    pool.record(2, pass_rate=1.0, drop_solved=True)
    pool.record(1, pass_rate=0.875, drop_solved=True)
    pool.record(3, pass_rate=1.0, drop_solved=False)
    assert pool.retired == {2}
    assert 2 not in pool.draw(12) and sorted(set(pool.draw(12))) == [0, 1, 3]


def test_lora_kl_reference_is_the_adapters_disabled_base(tokenizer):
    from alignment.grpo import make_reference
    from alignment.modeling import ModelConfig, load_model
    from alignment.packed_model import enable_packed_sequences
    from alignment.packing import SampleCollator
    from alignment.lora import apply_lora

    config = load_config(GRPOConfig, None, ["lora.enabled=true", "loss.kl_coef=0.1"])
    base = load_model(ModelConfig(name_or_path=str(TINY_MODEL), tokenizer=str(TINY_TOKENIZER)))
    model = apply_lora(base, config.lora)
    enable_packed_sequences(model)
    batch = SampleCollator(mode="packed", max_tokens_per_row=64)(
        [{"input_ids": [5, 6, 7, 8, 9], "labels": [IGNORE_INDEX, IGNORE_INDEX, 7, 8, 9]},
         {"input_ids": [10, 11, 12], "labels": [IGNORE_INDEX, 11, 12]}])
    reference = make_reference(model, config)
    with torch.no_grad():
        before = reference(batch)
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.add_(0.05)  # the adapters now change the policy
        policy = model_token_logps(model, batch)
        assert torch.allclose(reference(batch), before, atol=1e-6)
        assert not torch.allclose(policy, before, atol=1e-3)


def test_no_kept_group_means_no_samples():
    from alignment.grpo import PolicyLossConfig, learner_samples

    samples, advantages, counts = learner_samples([], PolicyLossConfig())
    assert samples == [] and advantages.numel() == 0 and counts["loss_tokens"] == 0


def test_approx_kl_old_estimates_kl_old_to_new_from_samples_of_old():
    generator = torch.Generator().manual_seed(0)
    old = torch.tensor([0.6, 0.3, 0.1])
    new = torch.tensor([0.2, 0.3, 0.5])
    exact = float((old * (old / new).log()).sum())  # KL(old || new) = 0.4377; KL(new || old) is 0.5867
    tokens = torch.multinomial(old, 200_000, replacement=True, generator=generator)  # the rollout sampled from old
    _, stats = clipped_policy_loss(new.log()[tokens], old.log()[tokens], torch.zeros(len(tokens)), 0.2, 0.28)
    estimate, stderr = stats["approx_kl_old"].mean(), stats["approx_kl_old"].std() / len(tokens) ** 0.5
    assert abs(float(estimate) - exact) < 4 * float(stderr) and float(stats["approx_kl_old"].min()) >= 0


@pytest.mark.parametrize("stated", [False, True])
def test_rollout_states_the_budget_when_asked(tokenizer, stated):
    from alignment.chat_format import BUDGET_STATEMENT
    from alignment.evaluate import EvalConfig, generation_settings
    from alignment.modeling import ModelConfig, load_model
    import dataclasses

    model = load_model(ModelConfig(name_or_path=str(TINY_MODEL), tokenizer=str(TINY_TOKENIZER)))
    settings = dataclasses.replace(generation_settings(tokenizer, EvalConfig()), temperature=1.0, max_new_tokens=4)
    config = RolloutConfig(group_size=2, budget_fraction=1.0, budget_min=7, budget_max=7,
                           state_budget="always" if stated else "auto")  # the fixture tokenizer is not marked
    scorer = RewardScorer(RewardsConfig(rewards=[RewardSpec("grpo_test_length")], mode="inprocess"))
    rows = [(0, {"id": "m0", "task": "math", "messages": [{"role": "user", "content": "Start with 3."}], "answer": "3"})]
    groups, _ = rollout(model, tokenizer, rows, config, settings, scorer, random.Random(0), seed=0)
    assert groups[0].budget == 7
    assert (BUDGET_STATEMENT.format(budget=7) in tokenizer.decode(groups[0].prompt_ids)) == stated
