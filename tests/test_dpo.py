"""DPO stage: the loss against hand-computed values, pair schemas and their rejections, LoRA reaching the Mamba
layers of the hybrid, and the stage end to end on a preference file (each schema) and on mined pairs (two rounds)."""

import json
import math
from pathlib import Path

import pytest
import torch

from alignment.checkpoint import verify_checkpoint
from alignment.config import ConfigError, load_config
from alignment.data import BadDataError
from alignment.dpo import (
    DPOConfig,
    RoundSelection,
    encode_pair,
    pair_logps,
    preference_loss,
    reference,
    run_dpo,
    sampled_sample,
    select_pairs,
    until_divergence,
)
from alignment.rollout.generation import GenerationResult
from alignment.modeling import ModelConfig, load_model, load_tokenizer
from alignment.packed_model import enable_packed_sequences
from alignment.packing import IGNORE_INDEX, SampleCollator
from alignment.lora import apply_lora
from data_recipes.preference import SCHEMAS, read_pairs
from tests.conftest import TINY_MODEL, TINY_TOKENIZER, killed_on_call

FIXTURES = Path(__file__).parent / "fixtures" / "preference"


# ---------------------------------------------------------------------------------------------------------------
# The loss


def test_preference_loss_matches_hand_computed_values():
    # Pair 1: chosen log-ratio +1, rejected -1 (delta 2). Pair 2: chosen 0, rejected +1 (delta -1). beta 0.5.
    args = dict(
        chosen_logps=torch.tensor([-10.0, -4.0]), rejected_logps=torch.tensor([-12.0, -3.0]),
        ref_chosen_logps=torch.tensor([-11.0, -4.0]), ref_rejected_logps=torch.tensor([-11.0, -4.0]),
        chosen_tokens=torch.tensor([2, 4]), rejected_tokens=torch.tensor([4, 2]), beta=0.5,
    )
    sigmoid, chosen_rewards, rejected_rewards = preference_loss(**args, loss_type="sigmoid")
    assert sigmoid.tolist() == pytest.approx([math.log(1 + math.exp(-1.0)), math.log(1 + math.exp(0.5))])
    assert chosen_rewards.tolist() == [0.5, 0.0] and rejected_rewards.tolist() == [-0.5, 0.5]
    hinge, _, _ = preference_loss(**args, loss_type="hinge")
    assert hinge.tolist() == pytest.approx([0.0, 1.5])
    # IPO, per token: pair 1: 1/2 - (-1)/4 = 0.75; pair 2: 0/4 - 1/2 = -0.5; target 1 / (2 beta) = 1.
    ipo, _, _ = preference_loss(**args, loss_type="ipo")
    assert ipo.tolist() == pytest.approx([0.0625, 2.25])
    # Policy == reference: every sigmoid loss is ln 2.
    same = torch.tensor([-3.0, -7.0])
    at_start, _, _ = preference_loss(same, same, same, same, same, same, "sigmoid", 0.05)
    assert at_start.tolist() == pytest.approx([math.log(2)] * 2)


def test_select_pairs_prefers_correct_then_well_formed_then_shorter():
    def cand(score, well_formed, tokens, text):
        return {"score": score, "well_formed": well_formed, "tokens": tokens, "text": text}

    samples = [cand(1.0, True, 30, "a"), cand(0.0, True, 20, "b"), cand(1.0, True, 20, "c"), cand(0.0, False, 25, "d"),
               cand(1.0, False, 10, "e")]
    # Best first: c (correct, well-formed, shortest), a, e (ill-formed); worst first: d (wrong, ill-formed), b.
    assert select_pairs(samples, min_margin=0.5, max_pairs=3) == [(2, 3), (0, 1)]
    assert select_pairs(samples, min_margin=0.5, max_pairs=1) == [(2, 3)]
    assert select_pairs([cand(0.0, True, 5, "x"), cand(0.0, False, 9, "y")], 0.5, 2) == []  # no contrast


def test_forced_tokens_carry_no_loss():
    result = GenerationResult(tokens=[7, 8, 9, 4], forced_mask=[False, True, False, False], thinking_tokens=1,
                              logprobs=[-1.0, float("nan"), -1.0, -1.0],
                              forced_close=True, finished=True)
    sample = sampled_sample([1, 2], result)
    assert sample["input_ids"] == [1, 2, 7, 8, 9, 4]
    assert sample["labels"] == [IGNORE_INDEX, IGNORE_INDEX, 7, IGNORE_INDEX, 9, 4]


def test_until_divergence_scores_each_side_only_to_its_first_differing_token_or_line():
    NL, P = 9, IGNORE_INDEX  # 9 ends a line; the prompt (ids 1, 2) carries no labels
    chosen = [1, 2, 5, 6, NL, 7, 8, NL, 3, 4]
    rejected = [1, 2, 5, 6, NL, 7, 0, 0, NL, 4, 4, 4]
    encoded = {"chosen": {"input_ids": chosen, "labels": [P, P] + chosen[2:]},
               "rejected": {"input_ids": rejected, "labels": [P, P] + rejected[2:]}}
    cut = until_divergence(encoded, frozenset({NL}))
    # They first differ at index 6 (8 vs 0); chosen's line ends at 7, rejected's at 8.
    assert cut["chosen"]["labels"] == [P, P, 5, 6, NL, 7, 8, NL, P, P]
    assert cut["rejected"]["labels"] == [P, P, 5, 6, NL, 7, 0, 0, NL, P, P, P]
    assert cut["chosen"]["input_ids"] == chosen and cut["rejected"]["input_ids"] == rejected
    token = until_divergence(encoded, None)
    assert token["chosen"]["labels"] == [P, P, 5, 6, NL, 7, 8, P, P, P]
    assert token["rejected"]["labels"] == [P, P, 5, 6, NL, 7, 0] + [P] * 5
    # A side that is a prefix of the other, or a difference on a line that never ends, keeps every label.
    prefix = {"chosen": encoded["chosen"], "rejected": {"input_ids": chosen[:6], "labels": [P, P] + chosen[2:6]}}
    assert until_divergence(prefix, frozenset({NL})) == prefix
    assert until_divergence(encoded, frozenset())["rejected"]["labels"] == encoded["rejected"]["labels"]


# ---------------------------------------------------------------------------------------------------------------
# Pair schemas


@pytest.mark.parametrize("schema", SCHEMAS)
def test_each_schema_reads_to_the_same_pair_format(schema, tokenizer):
    pairs, report = read_pairs(FIXTURES / f"{schema}.jsonl")
    assert len(pairs) == 3 and not report.bad
    last = pairs[-1]
    assert last["prompt"][-1] == {"role": "user", "content": "Start with 9. Subtract 4. What is the result?"}
    assert last["chosen"]["role"] == last["rejected"]["role"] == "assistant"
    assert "\\boxed{5}" in last["chosen"]["content"] and "\\boxed{6}" in last["rejected"]["content"]
    encoded = encode_pair(tokenizer, last)
    assert all(any(label != IGNORE_INDEX for label in s["labels"]) for s in encoded.values())
    # Forcing the schema gives the same pairs as recognising it.
    assert read_pairs(FIXTURES / f"{schema}.jsonl", schema=schema)[0] == pairs


def test_malformed_pairs_are_rejected_with_row_and_reason():
    with pytest.raises(BadDataError, match="8 of 9 pairs are bad.*line 2: not valid JSON"):
        read_pairs(FIXTURES / "malformed.jsonl")
    pairs, report = read_pairs(FIXTURES / "malformed.jsonl", max_bad_fraction=1.0)
    assert len(pairs) == 1
    reasons = dict(report.bad)
    assert sorted(reasons) == list(range(2, 10))
    expected = {2: "not valid JSON", 3: "missing `rejected`", 4: "identical", 5: "do not share the same prompt",
                6: "single assistant message", 7: "unclosed <think>", 8: "no `Human:` / `Assistant:` turns",
                9: "`prompt` must be a non-empty string"}
    for line, fragment in expected.items():
        assert fragment in reasons[line], (line, reasons[line])


# ---------------------------------------------------------------------------------------------------------------
# LoRA on the hybrid: gradients reach Mamba in_proj adapters, the loss leaves ln 2


def test_lora_dpo_reaches_mamba_in_proj_and_moves_off_ln2(tokenizer):
    torch.manual_seed(0)
    config = load_config(DPOConfig)
    model = apply_lora(load_model(ModelConfig(name_or_path=str(TINY_MODEL), tokenizer=str(TINY_TOKENIZER))),
                       config.lora)
    enable_packed_sequences(model)
    collator = SampleCollator(mode="packed", pad_token_id=tokenizer.pad_token_id, max_tokens_per_row=512)
    pairs, _ = read_pairs(FIXTURES / "prompt_messages.jsonl")
    for pair in pairs:
        pair["encoded"] = encode_pair(tokenizer, pair)
    with torch.no_grad(), reference(model):
        ref, _ = pair_logps(model, pairs, collator, "cpu")  # [B, 2]

    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    losses = []
    for step in range(6):
        logps, counts = pair_logps(model, pairs, collator, "cpu")
        loss = preference_loss(logps[:, 0], logps[:, 1], ref[:, 0], ref[:, 1], counts[:, 0], counts[:, 1],
                               "sigmoid", beta=0.5)[0].mean()
        loss.backward()
        if step == 0:
            assert loss.item() == pytest.approx(math.log(2), abs=1e-5)
            mamba = {n: p.grad for n, p in model.named_parameters() if "mixer.in_proj" in n and "lora_B" in n}
            assert mamba, "no LoRA adapter on the Mamba in_proj layers"
            # lora_B starts at zero, so only lora_B gets a gradient on the first step; it must on every Mamba layer.
            assert all(g is not None and g.abs().sum() > 0 for g in mamba.values()), "no gradient into Mamba in_proj"
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
    assert losses[-1] < math.log(2) - 0.05, losses
    # The reference is the base with adapters disabled: unchanged by training, no second copy held.
    with torch.no_grad(), reference(model):
        assert torch.allclose(pair_logps(model, pairs, collator, "cpu")[0], ref, atol=1e-5)


# ---------------------------------------------------------------------------------------------------------------
# The stage end to end


def tiny_dpo_config(tiny_data, out, *extra):
    return load_config(DPOConfig, None, [
        f"model.name_or_path={TINY_MODEL}", f"model.tokenizer={TINY_TOKENIZER}",
        f"eval.test_path={tiny_data / 'test.jsonl'}", "eval.max_samples=2", "eval.max_new_tokens=8",
        "eval.budgets=[null]", "evaluate_start=false", "train.max_steps=2", "train.pairs_per_step=2",
        "train.warmup_steps=1", "train.log_every=1", "train.lr=1.0e-3", "rounds=1", f"output_dir={out}",
        "device=cpu", *extra,
    ])


@pytest.mark.parametrize("schema", SCHEMAS)
def test_run_dpo_trains_on_a_fixture_in_each_schema(tiny_data, tmp_path, schema):
    # Padded batches keep this fast on CPU; the packed path is covered by the LoRA and mining tests.
    config = tiny_dpo_config(tiny_data, tmp_path / "run", "pairs.source=dataset", "train.packing=false",
                             f"pairs.dataset_path={FIXTURES / f'{schema}.jsonl'}", "pairs.heldout_fraction=0.3")
    summary = run_dpo(config)
    round_1 = summary["rounds"][0]
    assert round_1["pairs"]["train_pairs"] == 2 and round_1["pairs"]["heldout_pairs"] == 1
    assert round_1["train"]["dpo_loss"] > 0 and round_1["heldout_before"]["reward_accuracy"] == 0.0
    manifest = verify_checkpoint(tmp_path / "run" / "checkpoint")
    assert manifest["stage"] == "dpo" and manifest["packing"] == "padded batches"
    lines = [json.loads(l) for l in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert {"loss", "reward_margin", "chosen_logps", "rejected_logps"} <= set(lines[0])


def test_run_dpo_mines_pairs_on_policy_for_two_rounds_with_lora(tiny_data, tmp_path):
    # A random model never answers right, so the length reward (shorter is better within a prompt) makes contrasts.
    config = tiny_dpo_config(
        tiny_data, tmp_path / "run", f"mining.prompts_path={tiny_data / 'train.jsonl'}", "mining.prompts_per_round=3",
        "mining.samples_per_prompt=3", "mining.max_new_tokens=12", "mining.budgets=[null,4]",
        "mining.reasoning_off_fraction=0.3", "mining.rewards={rewards: [{name: length}], mode: inprocess}",
        "rounds=2", "lora.enabled=true", "pairs.heldout_fraction=0",
        f"selection.validation_path={tiny_data / 'validation.jsonl'}", "selection.max_samples=4",
        "loss.score_until=divergent_line",
        "train.activation_checkpointing=true",  # checkpointed blocks through two rounds of adapters and merges
        "mining.decode=continuous",  # the rollout engine: slots refilled, one prefill per prompt's samples
    )
    summary = run_dpo(config)
    assert [r["round"] for r in summary["rounds"]] == [1, 2]
    assert all(r["validation_score"] is not None for r in summary["rounds"]) and summary["selected_round"] in (0, 1, 2)
    assert verify_checkpoint(tmp_path / "run" / "checkpoint")["packing"].startswith("packed")
    for n in (1, 2):
        pairs, report = read_pairs(tmp_path / "run" / "pairs" / f"round{n}.jsonl", max_bad_fraction=1.0)
        mined = summary["rounds"][n - 1]["pairs"]
        assert mined["prompts"] == 3 and mined["samples"] == 9 and len(pairs) + len(report.bad) == mined["pairs"] > 0
        assert all(p["metadata"]["chosen_score"] - p["metadata"]["rejected_score"] >= 0.5 for p in pairs)
        # The reference pass is the policy that sampled: its log-probs of the mined tokens equal the sampler's.
        assert 0 <= mined["mismatch_abs_mean"] <= mined["mismatch_abs_max"] < 1e-3 and mined["mismatch_kl_k3"] < 1e-6
    eval_json = json.loads((tmp_path / "run" / "eval.json").read_text())
    assert len(eval_json["rounds"]) == 2 and "accuracy_think" in eval_json
    # The merged result is a plain model: no adapter weights in the checkpoint.
    reloaded = load_model(ModelConfig(name_or_path=str(tmp_path / "run" / "checkpoint")))
    assert not any("lora" in n for n, _ in reloaded.named_parameters())


def test_round_selection_keeps_the_best_validation_accuracy_and_restores_its_weights(tiny_data, monkeypatch):
    config = load_config(DPOConfig, None, [f"selection.validation_path={tiny_data / 'validation.jsonl'}",
                                           f"eval.test_path={tiny_data / 'test.jsonl'}", "selection.max_samples=3"])
    scores = iter([0.5, 0.7, 0.6])  # start, round 1, round 2
    seen_rows = []

    def scripted_cell(model, tokenizer, rows, reasoning, budget, eval_config):
        seen_rows.append(len(rows))
        return {"accuracy": next(scores)}

    monkeypatch.setattr("alignment.dpo.run_cell", scripted_cell)
    model = torch.nn.Linear(2, 2)
    selection = RoundSelection(config, tokenizer=None)
    weights = {}
    for round_index in range(3):
        with torch.no_grad():
            model.weight.fill_(float(round_index))
        weights[round_index] = model.weight.clone()
        selection.offer(model, round_index, {"round": round_index})
    assert seen_rows == [3, 3, 3]
    assert selection.restore_best(model, 2, {"round": 2}) == (1, {"round": 1})
    assert torch.equal(model.weight, weights[1])

    # The start is kept when no round beats it by more than min_gain.
    config.selection.min_gain = 0.25
    scores = iter([0.5, 0.7])
    selection = RoundSelection(config, tokenizer=None)
    start_weights = model.weight.clone()
    selection.offer(model, 0, None)
    model.weight.data.fill_(9.0)
    selection.offer(model, 1, {"round": 1})
    assert selection.restore_best(model, 1, {"round": 1}) == (0, None)
    assert torch.equal(model.weight, start_weights)


def test_round_selection_with_tool_tasks_keeps_the_best_mean_of_accuracy_and_tool_success(tiny_data, tmp_path,
                                                                                           monkeypatch):
    from types import SimpleNamespace

    from envs.tool_tasks import ToolTaskConfig, generate_tool_splits
    from tests.conftest import write_jsonl

    tools = write_jsonl(tmp_path / "tools_validation.jsonl",
                        generate_tool_splits(ToolTaskConfig(train_size=0, validation_size=4, test_size=0))["validation"])
    config = load_config(DPOConfig, None, [f"selection.validation_path={tiny_data / 'validation.jsonl'}",
                                           f"selection.tool_validation_path={tools}",
                                           f"eval.test_path={tiny_data / 'test.jsonl'}"])
    # (math accuracy, tool successes of 4 episodes): scores 0.3, 0.35, then 0.3 (tools up, math down further).
    scripted = iter([(0.6, [0, 0, 0, 0]), (0.7, [0, 0, 0, 0]), (0.1, [1, 1, 0, 0])])
    current = {}

    def scripted_cell(model, tokenizer, rows, reasoning, budget, eval_config):
        current["math"], current["tools"] = next(scripted)
        return {"accuracy": current["math"]}

    def scripted_episodes(model, tokenizer, rows, eval_config, reasoning):
        assert reasoning and len(rows) == 4
        return [SimpleNamespace(outcome=lambda ok=ok: SimpleNamespace(success=bool(ok))) for ok in current["tools"]]

    monkeypatch.setattr("alignment.dpo.run_cell", scripted_cell)
    monkeypatch.setattr("alignment.dpo.tool_episodes", scripted_episodes)
    selection = RoundSelection(config, tokenizer=None)
    model = torch.nn.Linear(2, 2)
    assert [selection.offer(model, r, {"round": r}) for r in range(3)] == pytest.approx([0.3, 0.35, 0.3])
    assert selection.restore_best(model, 2, {"round": 2}) == (1, {"round": 1})
    with pytest.raises((ValueError, ConfigError), match="tool_validation_path"):  # never select on the test split
        load_config(DPOConfig, None, [f"selection.tool_validation_path={tools}", f"eval.tool_test_path={tools}"])


def test_round_selection_is_off_without_a_validation_split(monkeypatch):
    monkeypatch.setattr("alignment.dpo.run_cell", lambda *a: pytest.fail("nothing is scored without validation rows"))
    selection = RoundSelection(load_config(DPOConfig, None, []), tokenizer=None)
    model = torch.nn.Linear(2, 2)
    assert selection.offer(model, 0, None) is None
    assert selection.restore_best(model, 2, {"round": 2}) == (2, {"round": 2})


def test_config_refuses_mining_from_the_test_split_and_greedy_sampling():
    with pytest.raises(ConfigError, match="mine from the train split"):
        load_config(DPOConfig, None, ["mining.prompts_path=runs/data/tiny/test.jsonl"])
    with pytest.raises(ConfigError, match="temperature must be > 0"):
        load_config(DPOConfig, None, ["mining.temperature=0"])
    with pytest.raises(ConfigError, match="dataset_path must be set"):
        load_config(DPOConfig, None, ["pairs.source=dataset"])
    with pytest.raises(ConfigError, match="select on the validation split"):
        load_config(DPOConfig, None, ["selection.validation_path=runs/data/tiny/test.jsonl"])


def test_a_killed_run_resumes_with_the_next_round(tiny_data, tmp_path, monkeypatch):
    """Killed in round 3's training, the rerun starts at round 3 from the state saved after round 2: the same pairs
    and losses as a run never stopped, and each round's records once."""
    import alignment.dpo as dpo

    def config(out):
        return tiny_dpo_config(
            tiny_data, out, f"mining.prompts_path={tiny_data / 'train.jsonl'}", "mining.prompts_per_round=3",
            "mining.samples_per_prompt=3", "mining.max_new_tokens=12", "mining.min_margin=0.0",
            "mining.rewards={rewards: [{name: length}], mode: inprocess}", "mining.decode=continuous",
            "rounds=3", "pairs.heldout_fraction=0", f"selection.validation_path={tiny_data / 'validation.jsonl'}",
            "selection.max_samples=4", "evaluate_start=true",
        )

    run_dpo(config(tmp_path / "whole"))
    train_round = dpo.train_round
    out = tmp_path / "killed"
    monkeypatch.setattr(dpo, "train_round", killed_on_call(train_round, 3))  # in round 3
    with pytest.raises(KeyboardInterrupt):
        run_dpo(config(out))
    assert json.loads((out / "last" / "manifest.json").read_text())["step"] == 2
    monkeypatch.setattr(dpo, "train_round", train_round)
    summary = run_dpo(config(out))

    assert not (out / "last").exists() and [r["round"] for r in summary["rounds"]] == [1, 2, 3]
    for n in (1, 2, 3):
        assert (out / "pairs" / f"round{n}.jsonl").read_text() == (tmp_path / "whole" / "pairs" / f"round{n}.jsonl").read_text()
    records = [[json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
               for run in (tmp_path / "whole", out)]
    assert [(r["step"], r["round"]) for r in records[1]] == [(r["step"], r["round"]) for r in records[0]]
    for a, b in zip(*records):
        for key in ("loss", "grad_norm", "accuracy_think"):
            if key in a:
                assert b[key] == pytest.approx(a[key], rel=1e-5, abs=1e-7), (key, a, b)
    assert summary["selected_round"] == json.loads((tmp_path / "whole" / "eval.json").read_text())["selected_round"]


def test_the_dpo_loss_at_the_round_start_is_ln2_with_lora_dropout(tiny_data, tmp_path):
    # Policy and reference are the same weights at the start; dropout in the policy's pass alone would move the loss.
    config = tiny_dpo_config(tiny_data, tmp_path / "run", "pairs.source=dataset", "train.packing=false",
                             f"pairs.dataset_path={FIXTURES / 'conversations.jsonl'}", "pairs.heldout_fraction=0",
                             "lora.enabled=true", "lora.dropout=0.5", "loss.sft_weight=0", "train.max_steps=1")
    run_dpo(config)
    first = json.loads((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()[0])
    assert abs(first["dpo_loss"] - math.log(2)) < 1e-3
