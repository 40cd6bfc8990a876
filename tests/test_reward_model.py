"""`align rm`: the Bradley-Terry loss against a hand computation, rewards of packed rows equal to one sequence at a
time (seq_idx on the hybrid), the stage end to end (a checkpoint HF loads and `load_reward_model` scores alike), the
synthetic pairs' kinds, and the `reward_model` reward in process and on its Ray actor."""

import json
import math
import time

import pytest
import torch
from transformers import AutoModelForCausalLM

from alignment.config import load_config
from alignment.modeling import ModelConfig, load_model, load_tokenizer
from alignment.packed_model import enable_packed_sequences
from alignment.packing import SampleCollator
from alignment.reward_model import (RMConfig, RewardModel, bradley_terry_loss, load_reward_model, pair_samples,
                                    run_rm)
from data_recipes.preference import to_pair
from data_recipes.synthetic_preferences import preference_pairs
from tests.conftest import TINY_MODEL, TINY_TOKENIZER


def test_bradley_terry_loss_matches_a_hand_computation():
    chosen, rejected = torch.tensor([2.0, 0.5, 1.0]), torch.tensor([1.0, 1.5, 1.0])  # margins 1, -1, 0
    loss, accuracy = bradley_terry_loss(chosen, rejected)
    by_hand = (math.log(1 + math.exp(-1)) + math.log(1 + math.exp(1)) + math.log(2)) / 3  # -log sigmoid(m)
    assert abs(float(loss) - by_hand) < 1e-6 and abs(by_hand - 0.7732) < 1e-4
    assert float(accuracy) == pytest.approx(0.5)  # one right, one wrong, a tie counting half


def test_rewards_of_packed_rows_equal_one_sequence_at_a_time(tiny_data):
    tokenizer = load_tokenizer(ModelConfig(name_or_path=str(TINY_MODEL), tokenizer=str(TINY_TOKENIZER)))
    lm = load_model(ModelConfig(name_or_path=str(TINY_MODEL), tokenizer=str(TINY_TOKENIZER), init_seed=0))
    enable_packed_sequences(lm)
    head = torch.nn.Linear(lm.config.hidden_size, 1)
    torch.nn.init.normal_(head.weight, std=0.5)
    rm = RewardModel(lm, head).eval()
    rows = [json.loads(line) for line in (tiny_data / "train.jsonl").read_text().splitlines()]
    samples = pair_samples(tokenizer, [to_pair(p) for p in preference_pairs(rows, seed=0)[:3]])
    collator = SampleCollator(mode="packed", pad_token_id=tokenizer.pad_token_id, max_tokens_per_row=4096)
    with torch.no_grad():
        packed = rm(collator(samples))
        alone = torch.cat([rm(collator([s])) for s in samples])
    assert packed.shape == (6,) and packed.std() > 1e-3
    assert torch.allclose(packed, alone, atol=1e-5), (packed - alone).abs().max()


def test_the_stage_trains_writes_an_hf_checkpoint_and_the_loader_scores_alike(tiny_data, tmp_path):
    rows = [json.loads(line) for line in (tiny_data / "train.jsonl").read_text().splitlines()]
    pairs_path = tmp_path / "pairs.jsonl"
    pairs_path.write_text("".join(json.dumps(p) + "\n" for p in preference_pairs(rows, seed=0)))
    config = load_config(RMConfig, "configs/tiny/rlhf/rm.yaml", [
        f"model.name_or_path={TINY_MODEL}", f"model.tokenizer={TINY_TOKENIZER}", f"data.pairs_path={pairs_path}",
        "data.heldout_fraction=0.2", "train.max_steps=4", "train.pairs_per_step=4", "train.warmup_steps=1",
        f"output_dir={tmp_path / 'rm'}"])
    results = run_rm(config)
    assert results["heldout"]["pairs"] >= 5 and 0 <= results["heldout"]["pair_accuracy"] <= 1
    assert results["heldout_before"]["pair_accuracy"] == 0.5  # the zero head ties every pair
    by_kind = results["heldout_by_kind"]  # the same forward passes, split by the pairs' kinds
    assert len(by_kind) > 1 and sum(k["pairs"] for k in by_kind.values()) == results["heldout"]["pairs"]
    checkpoint = tmp_path / "rm" / "checkpoint"
    AutoModelForCausalLM.from_pretrained(checkpoint)  # the backbone is an ordinary checkpoint
    rm, tokenizer = load_reward_model(checkpoint)
    pair = preference_pairs(rows, seed=0)[0]
    chosen, rejected = rm.score(tokenizer, [pair["prompt"] + pair["chosen"], pair["prompt"] + pair["rejected"]])
    assert chosen != rejected
    assert json.loads((tmp_path / "rm" / "eval.json").read_text())["heldout"] == results["heldout"]


def test_the_reward_model_plugin_scores_as_the_model_and_normalises_per_group(tmp_path):
    from alignment.reward_model import save_reward_model
    from rewards import RewardsConfig, score_batch

    tokenizer = load_tokenizer(ModelConfig(name_or_path=str(TINY_MODEL), tokenizer=str(TINY_TOKENIZER)))
    lm = load_model(ModelConfig(name_or_path=str(TINY_MODEL), tokenizer=str(TINY_TOKENIZER), init_seed=0))
    head = torch.nn.Linear(lm.config.hidden_size, 1)
    torch.nn.init.normal_(head.weight, std=0.5)
    checkpoint = save_reward_model(tmp_path / "rm", RewardModel(lm, head), tokenizer, {"stage": "rm"})
    prompt = [{"role": "user", "content": "Start with 2. Add 3. What is the result?"}]
    completions = ["2 + 3 = 5\n</think>\nThe result is \\boxed{5}.", "2 + 3 = 6\n</think>\nThe result is \\boxed{6}.",
                   "</think>\nThe result is \\boxed{5}."]
    rows = [{"id": "a", "task": "chat", "messages": prompt}] * 2 + [{"id": "b", "task": "chat", "messages": prompt}]
    config = RewardsConfig(rewards=[], routes={"chat": [{"name": "reward_model", "args": {
        "checkpoint": str(checkpoint), "serve": "process"}}]}, mode="inprocess")
    scored = [s.score for s in score_batch(completions, rows, config)]
    rm, rm_tokenizer = load_reward_model(checkpoint)
    from alignment.dpo import completion_message

    expected = rm.score(rm_tokenizer, [prompt + [completion_message(c, True)] for c in completions])
    assert scored == pytest.approx(expected, abs=1e-6) and len(set(scored)) == 3
    config.routes["chat"][0].args["normalize"] = "group"
    normalised = [s.score for s in score_batch(completions, rows, config)]
    assert normalised[0] == pytest.approx(-normalised[1]) and abs(normalised[0]) == pytest.approx(1.0)
    assert normalised[2] == 0.0  # a group of one


def _random_reward_model(tmp_path):
    from alignment.reward_model import save_reward_model

    tokenizer = load_tokenizer(ModelConfig(name_or_path=str(TINY_MODEL), tokenizer=str(TINY_TOKENIZER)))
    lm = load_model(ModelConfig(name_or_path=str(TINY_MODEL), tokenizer=str(TINY_TOKENIZER), init_seed=0))
    head = torch.nn.Linear(lm.config.hidden_size, 1)
    torch.nn.init.normal_(head.weight, std=0.5)
    return save_reward_model(tmp_path / "rm", RewardModel(lm, head), tokenizer, {"stage": "rm"})


def test_the_reward_model_on_its_ray_actor_scores_as_in_process(tmp_path):
    ray = pytest.importorskip("ray")
    from rewards import RewardsConfig
    from rewards.reward_model import _actor_name
    from rewards.scoring import RewardScorer

    checkpoint = _random_reward_model(tmp_path)
    prompt = [{"role": "user", "content": "Start with 2. Add 3. What is the result?"}]
    completions = ["2 + 3 = 5\n</think>\nThe result is \\boxed{5}.", "</think>\nThe result is \\boxed{6}."]
    rows = [{"id": "a", "task": "chat", "messages": prompt}] * 2
    scores = {}
    started_here = not ray.is_initialized()
    try:
        for serve in ("process", "actor"):
            config = RewardsConfig(rewards=[], routes={"chat": [{"name": "reward_model", "args": {
                "checkpoint": str(checkpoint), "serve": serve, "num_cpus": 1}}]}, mode="inprocess")
            scorer = RewardScorer(config)  # starts the actor and waits for its model (the reward's prepare hook)
            scores[serve] = [s.score for s in scorer.score_batch(completions, rows)]
            if serve == "actor":
                assert ray.get(ray.get_actor(_actor_name(str(checkpoint), 1.0, 0.0)).ready.remote()) == "cpu"
            scorer.close()
        for _ in range(100):  # closing the scorer ends the actor (ray.kill returns before it is gone)
            try:
                ray.get_actor(_actor_name(str(checkpoint), 1.0, 0.0))
            except ValueError:
                break
            time.sleep(0.1)
        else:
            raise AssertionError("the reward model's actor outlived its scorer: its CPU share stays taken")
    finally:
        if started_here:
            ray.shutdown()
    assert scores["actor"] == pytest.approx(scores["process"], abs=1e-6) and len(set(scores["actor"])) == 2


def test_a_missing_or_wrong_reward_model_checkpoint_fails_naming_the_key(tmp_path):
    from alignment.config import ConfigError, check_paths
    from alignment.evaluate import EvalRunConfig
    from rewards import RewardsConfig
    from rewards.config import RewardsConfigError
    from rewards.scoring import check_reward_names

    not_rm = tmp_path / "policy"
    not_rm.mkdir()
    rows_file = tmp_path / "test.jsonl"  # every other input there, so the reward model's is the one missing
    rows_file.write_text("")
    for checkpoint, problem in ((tmp_path / "nowhere", "no such reward-model checkpoint folder"),
                                (not_rm, "not a reward-model checkpoint")):
        config = RewardsConfig(rewards=[], routes={"chat": [{"name": "reward_model",
                                                             "args": {"checkpoint": str(checkpoint)}}]})
        with pytest.raises(RewardsConfigError, match=rf"rewards\.routes\.chat\[0\]\.args.*{problem}"):
            check_reward_names(config)
        with pytest.raises(ConfigError, match=rf"eval\.reward_model.*{problem}"):
            check_paths(load_config(EvalRunConfig, None, [f"eval.reward_model={checkpoint}",
                                                          f"eval.test_path={rows_file}"]))
    config = RewardsConfig(rewards=[], routes={"chat": [{"name": "reward_model", "args": {
        "checkpoint": str(_random_reward_model(tmp_path)), "serve": "elsewhere"}}]})
    with pytest.raises(RewardsConfigError, match="serve must be one of"):
        check_reward_names(config)


def test_synthetic_pairs_differ_only_in_the_quality_their_kind_names(tiny_data):
    from alignment.dpo import encode_pair
    from data_recipes.synthetic_preferences import KINDS

    rows = [json.loads(line) for line in (tiny_data / "train.jsonl").read_text().splitlines()]
    pairs = preference_pairs(rows, seed=0)
    assert {p["metadata"]["kind"] for p in pairs} == set(KINDS)
    tokenizer = load_tokenizer(ModelConfig(name_or_path=str(TINY_MODEL), tokenizer=str(TINY_TOKENIZER)))
    for pair in pairs:
        (chosen,), (rejected,) = pair["chosen"], pair["rejected"]
        kind, trace, wrong = pair["metadata"]["kind"], rejected["reasoning_content"], pair["metadata"]["rejected_answer"]
        assert f"\\boxed{{{pair['metadata']['answer']}}}" in chosen["content"] and f"\\boxed{{{wrong}}}" in rejected["content"]
        if kind == "box":
            assert trace == chosen["reasoning_content"] and wrong != pair["metadata"]["answer"]
        elif kind == "incomplete":  # a strict prefix of the lines, boxing the value it reached
            assert chosen["reasoning_content"].startswith(trace) and len(trace) < len(chosen["reasoning_content"])
            assert trace.splitlines()[-1].endswith(f"= {wrong}")
        elif kind == "extra":  # one more operation, from the answer, boxed
            assert trace.startswith(chosen["reasoning_content"])
            assert len(trace.splitlines()) == len(chosen["reasoning_content"].splitlines()) + 1
            assert trace.splitlines()[-1].startswith(f"{pair['metadata']['answer']} ")
        else:  # the steps written into the answer of a /no_think turn: the rendered texts differ
            assert pair["prompt"][0]["content"] == "/no_think" and rejected["content"].endswith(chosen["content"])
            encoded = encode_pair(tokenizer, {"prompt": pair["prompt"], "chosen": chosen, "rejected": rejected})
            assert encoded["chosen"]["input_ids"] != encoded["rejected"]["input_ids"]
