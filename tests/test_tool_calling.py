"""Tool calling: rendering through each format's template and back through its parser, loss masks, the world and its
refusals, the rewards, the adapters, unpacked SFT sources, and episodes with a scripted model."""

import dataclasses
import json
from pathlib import Path

import pytest
from transformers import AutoTokenizer

from alignment.chat_format import IGNORE_INDEX, encode_row_for_training, tool_syntax_of, use_chat_format
from alignment.data import row_problem
from alignment.packing import SampleCollator, first_fit_decreasing, plan_packed_batches
from alignment.tool_calls import SYNTAXES, ToolCall
from data_recipes.adapters import adapt
from envs.tool_env import TOOLS, ToolError, execute, register_tool, replay, tool_specs
from envs.tool_tasks import KINDS, ToolTaskConfig, generate_tool_splits
from rewards.tool_use import tool_call, tool_state

FIXTURES = Path(__file__).parent / "fixtures" / "chat_formats"
FORMATS = {"nano2": (FIXTURES / "nano2", "json-list"), "nemotron3": (FIXTURES / "nemotron3", "xml-function"),
           "tiny": (Path("configs/tiny/tokenizer"), "json-list")}


@pytest.fixture(scope="module")
def tasks():
    return generate_tool_splits(ToolTaskConfig(train_size=60, validation_size=6, test_size=12, rl_size=6))


def load(name):
    path, _ = FORMATS[name]
    tokenizer = AutoTokenizer.from_pretrained(path)
    use_chat_format(tokenizer, str(path))
    return tokenizer


def trained_text(tokenizer, sample) -> str:
    return tokenizer.decode([t for t, label in zip(sample["input_ids"], sample["labels"]) if label != IGNORE_INDEX],
                            skip_special_tokens=False)


@pytest.mark.parametrize("name", list(FORMATS))
def test_each_format_round_trips_tools_calls_and_results(name, tasks):
    tokenizer = load(name)
    assert tool_syntax_of(tokenizer).name == FORMATS[name][1]
    row = next(r for r in tasks["train"] if r["metadata"]["kind"] == "sum_two" and r["metadata"]["reasoning"] == "on")
    samples = encode_row_for_training(tokenizer, row)
    assistant_turns = [m for m in row["messages"] if m["role"] == "assistant"]
    assert len(samples) == len(assistant_turns) == 3  # every turn trains, calls included
    for sample, turn in zip(samples, assistant_turns):
        trained = trained_text(tokenizer, sample)
        prompt = tokenizer.decode(sample["input_ids"][: sample["labels"].index(next(
            label for label in sample["labels"] if label != IGNORE_INDEX))], skip_special_tokens=False)
        # The trace and the calls carry loss, nothing of the prompt does: tool results sit in the prompt only.
        assert turn["reasoning_content"].strip() in trained
        end = "<|end|>" if name == "tiny" else tokenizer.convert_ids_to_tokens(sample["input_ids"][-1])
        _, parsed = __import__("envs.tool_env", fromlist=["parse_turn"]).parse_turn(
            trained.removesuffix(end), row["tools"])
        assert parsed.calls == [ToolCall(c["function"]["name"], c["function"]["arguments"])
                                for c in turn.get("tool_calls", [])]
        assert "get_value" in prompt or "Tools" in prompt or "tools" in prompt  # the offered tools are in the prompt
    last_prompt = tokenizer.decode(samples[-1]["input_ids"], skip_special_tokens=False)
    results = [m["content"] for m in row["messages"] if m["role"] == "tool"]
    assert all(result in last_prompt for result in results)
    assert not any(result in trained_text(tokenizer, samples[-1]) for result in results if len(result) > 2)


def test_nano2_groups_consecutive_results_in_one_user_turn(tasks):
    tokenizer = load("nano2")
    row = next(r for r in tasks["train"] if r["metadata"]["kind"] == "sum_two")
    first, second, _ = (m["content"] for m in row["messages"] if m["role"] == "tool")  # two reads, then add
    prompt = tokenizer.decode(encode_row_for_training(tokenizer, row)[1]["input_ids"], skip_special_tokens=False)
    assert f"<SPECIAL_11>User\n<TOOL_RESPONSE>[{first}, {second}]</TOOL_RESPONSE>\n" in prompt
    assert "<AVAILABLE_TOOLS>[" in prompt


def test_parsers_read_each_syntax_and_report_malformed_blocks():
    call = ToolCall("get_value", {"key": "box12"})
    assert SYNTAXES["json-list"].parse('<TOOLCALL>[{"name": "get_value", "arguments": {"key": "box12"}}]</TOOLCALL>'
                                       ).calls == [call]
    xml = "<tool_call>\n<function=get_value>\n<parameter=key>\nbox12\n</parameter>\n</function>\n</tool_call>"
    assert SYNTAXES["xml-function"].parse(xml, tool_specs(["get_value"])).calls == [call]
    assert SYNTAXES["hermes-json"].parse('<tool_call>\n{"name": "get_value", "arguments": {"key": "box12"}}\n'
                                         '</tool_call>').calls == [call]
    # A number-looking string stays a string where the spec says string; an integer parameter becomes a number.
    numeric = "<tool_call>\n<function=set_value>\n<parameter=key>\n12\n</parameter>\n<parameter=value>\n7\n" \
              "</parameter>\n</function>\n</tool_call>"
    assert SYNTAXES["xml-function"].parse(numeric, tool_specs(["set_value"])).calls == [
        ToolCall("set_value", {"key": "12", "value": 7})]
    assert SYNTAXES["json-list"].parse('<TOOLCALL>[{"name": "get_value", "arguments": {"key": }]</TOOLCALL>').malformed
    assert SYNTAXES["json-list"].parse('<TOOLCALL>[{"name": "get_value"').malformed
    assert SYNTAXES["xml-function"].parse("<tool_call>\n<func=x>\n</tool_call>").malformed


def test_the_world_executes_calls_and_refuses_unknown_tools_and_bad_arguments():
    state = {"box12": 4}
    offered = {"get_value", "set_value", "add"}
    assert execute(ToolCall("add", {"a": 2, "b": 3}), state, offered).result == 5
    assert execute(ToolCall("set_value", {"key": "jar10", "value": 9}), state, offered).result == "ok"
    assert state == {"box12": 4, "jar10": 9}
    assert execute(ToolCall("multiply", {"a": 2, "b": 3}), state, offered).kind == "hallucinated"  # not offered
    assert execute(ToolCall("divide", {"a": 2, "b": 3}), state, offered | {"divide"}).kind == "hallucinated"
    for arguments, why in (({"a": 2}, "missing"), ({"a": 2, "b": 3, "c": 1}, "unknown"), ({"a": "2", "b": 3}, "must be")):
        outcome = execute(ToolCall("add", arguments), state, offered)
        assert outcome.kind == "bad_arguments" and why in outcome.error
    refused = execute(ToolCall("get_value", {"key": "nope"}), state, offered)
    assert refused.kind == "refused" and json.loads(refused.message()["content"]) == {"error": refused.error}
    assert state == {"box12": 4, "jar10": 9}  # refused calls change nothing


def test_a_users_tool_registers_and_runs():
    @register_tool("double_it_for_test", "Twice a number.", x="integer")
    def double(state, x):
        if x < 0:
            raise ToolError("negative")
        return 2 * x

    try:
        assert tool_specs(["double_it_for_test"])[0]["function"]["parameters"]["required"] == ["x"]
        assert execute(ToolCall("double_it_for_test", {"x": 4}), {}, {"double_it_for_test"}).result == 8
        assert execute(ToolCall("double_it_for_test", {"x": -1}), {}, {"double_it_for_test"}).kind == "refused"
        with pytest.raises(ValueError, match="registered already"):
            register_tool("double_it_for_test", "again", x="integer")(double)
    finally:
        TOOLS.pop("double_it_for_test")


def _turns_text(row, calls_per_turn, answer):
    turns = ["t\n</think>\n<TOOLCALL>" + json.dumps(calls) + "</TOOLCALL>" for calls in calls_per_turn]
    return turns + [f"done\n</think>\n\\boxed{{{answer}}}"]


def test_replay_grades_the_reference_episode_of_every_kind(tasks):
    for kind in KINDS:
        row = next(r for r in tasks["test"] if r["metadata"]["kind"] == kind)
        outcome = replay(row, _turns_text(row, row["metadata"]["reference_calls"], row["answer"]))
        assert outcome.success and outcome.exact_calls, (kind, outcome.reason)


def test_replay_and_rewards_score_bad_episodes_zero_with_the_reason(tasks):
    row = next(r for r in tasks["test"] if r["metadata"]["kind"] == "update")
    reference = row["metadata"]["reference_calls"]
    wrong_answer = replay(row, _turns_text(row, reference, int(row["answer"]) + 1))
    assert not wrong_answer.success and "answer" in wrong_answer.reason
    skipped_store = replay(row, _turns_text(row, reference[:2], row["answer"]))
    assert not skipped_store.success and "not the target" in skipped_store.reason
    hallucinated = [[{"name": "increment", "arguments": {"key": "x"}}]] + reference
    result = tool_state("", row["tools"], row["metadata"], row["answer"], _turns_text(row, hallucinated, row["answer"]))
    assert result.score == 0 and result.info["hallucinated"] and "unknown tool" in result.info["reason"]
    # tool_call: one turn against its reference, order-insensitive inside a turn.
    two = next(r for r in tasks["test"] if r["metadata"]["kind"] == "sum_two")
    swapped = list(reversed(two["metadata"]["reference_calls"][0]))
    assert tool_call(_turns_text(two, [swapped], 0)[0], two["tools"], two["metadata"]).score == 1
    ordered = dict(two["metadata"], ordered_calls=True)
    assert tool_call(_turns_text(two, [swapped], 0)[0], two["tools"], ordered).score == 0
    bad = tool_call('x</think>\n<TOOLCALL>[{"name": "get_value", "arguments": {"key": 5}}]</TOOLCALL>',
                    two["tools"], two["metadata"])
    assert bad.score == 0 and "must be string" in bad.info["reason"]
    assert "malformed" in tool_call("x</think>\n<TOOLCALL>[{</TOOLCALL>", two["tools"], two["metadata"]).info["reason"]


def test_tool_rows_validate_and_bad_calls_are_rejected(tasks):
    row = tasks["train"][0]
    assert row_problem(row, "train") is None and row_problem(row, "prompt") is None
    broken = json.loads(json.dumps(row))
    broken["messages"][2]["tool_calls"][0]["function"]["arguments"] = "{not json"
    assert "arguments are not JSON" in row_problem(broken, "train")
    assert "non-empty list" in row_problem(dict(row, tools=[]), "train")


def test_adapters_read_openai_and_xlam_layouts_and_reject_bad_records_with_their_index():
    xlam = [{"query": "Weather in Oslo?", "tools": json.dumps([{"name": "weather", "description": "d", "parameters": {
                 "city": {"type": "str", "description": "c"}, "days": {"type": "int, optional"}}}]),
             "answers": json.dumps([{"name": "weather", "arguments": {"city": "Oslo"}}])},
            {"query": "x", "tools": "[{\"name\": \"a\"}]", "answers": "[{\"name\": \"b\", \"arguments\": {}}]"},
            {"query": "x", "tools": "not json", "answers": "[]"}]
    rows, report = adapt(xlam, "xlam", max_bad_fraction=1.0)
    spec = rows[0]["tools"][0]["function"]["parameters"]
    assert spec["required"] == ["city"] and spec["properties"]["days"]["type"] == "integer"
    assert rows[0]["metadata"]["reference_calls"] == [[{"name": "weather", "arguments": {"city": "Oslo"}}]]
    assert [i for i, _ in report.bad] == [1, 2] and "do not offer" in report.bad[0][1]
    openai = [{"messages": [
        {"role": "user", "content": "Add 2 and 3"},
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "c1", "type": "function", "function": {"name": "add", "arguments": "{\"a\": 2, \"b\": 3}"}}]},
        {"role": "tool", "tool_call_id": "c1", "content": "5"}, {"role": "assistant", "content": "It is 5."}],
        "tools": tool_specs(["add"])}]
    rows, _ = adapt(openai, "openai_tools")
    assert rows[0]["messages"][-3]["tool_calls"][0]["function"]["arguments"] == {"a": 2, "b": 3}
    assert len(encode_row_for_training(load("nano2"), rows[0])) == 2


def test_unpacked_samples_get_rows_of_their_own():
    lengths = [10, 20, 5, 30, 8]
    alone = [False, True, False, False, True]
    rows = first_fit_decreasing(lengths, 64, alone)
    assert [1] in rows and [4] in rows and sorted(sum(rows, [])) == list(range(5))
    batches = plan_packed_batches(lengths * 10, 64, 2, seed=0, alone=alone * 10)
    for batch in batches:  # one-sample rows are batched apart from packed rows
        assert len({(alone * 10)[i] for i in batch}) == 1
    samples = [{"input_ids": [1] * n, "labels": [1] * n, "pack": not a} for n, a in zip(lengths, alone)]
    batch = SampleCollator(mode="packed", max_tokens_per_row=64)(samples)
    row_of = {int(batch["sample_ids"][r, t]): r for r in range(batch["sample_ids"].shape[0])
              for t in range(batch["sample_ids"].shape[1]) if batch["sample_ids"][r, t] >= 0}
    assert sum(v == row_of[1] for v in row_of.values()) == 1 and sum(v == row_of[4] for v in row_of.values()) == 1


def test_episodes_run_calls_against_the_world_with_a_scripted_model(tasks, monkeypatch):
    """The runner feeds each turn's results back and stops at the answer; its outcome is the replay's."""
    from alignment.rollout import episodes as episodes_module
    from alignment.rollout.generation import GenerationResult, GenerationSettings

    tokenizer = load("tiny")
    row = next(r for r in tasks["test"] if r["metadata"]["kind"] == "update")
    script = _turns_text(row, row["metadata"]["reference_calls"], row["answer"])
    seen_prompts = []

    def fake_generate(model, prompts, settings, reasoning, seed, stream_ids):
        seen_prompts.append(tokenizer.decode(prompts[0], skip_special_tokens=False))
        turn = len(seen_prompts) - 1
        tokens = tokenizer(script[turn] + "<|end|>", add_special_tokens=False)["input_ids"]
        return [GenerationResult(tokens, [False] * len(tokens), [0.0] * len(tokens), 3, False, True)]

    monkeypatch.setattr(episodes_module, "generate", fake_generate)
    [episode] = episodes_module.run_episodes(None, tokenizer, [row], [True], GenerationSettings(), max_turns=5)
    assert episode.ended == "answer" and len(episode.turns) == 4
    assert episode.state == row["metadata"]["target_state"]
    first_value = row["metadata"]["initial_state"][row["metadata"]["reference_calls"][0][0]["arguments"]["key"]]
    assert f"<TOOL_RESPONSE>[{first_value}]</TOOL_RESPONSE>" in seen_prompts[1]  # the world's answer, fed back
    assert episode.outcome().success and episode.outcome().exact_calls


def test_grpo_rolls_out_tool_tasks_as_episodes_and_trains_every_turn(tasks, monkeypatch):
    """A tool task in GRPO is an episode in the world: `tool_state` scores it, and each of its turns becomes a sample
    with the episode's advantage, prompted by the conversation before it (tool results in the prompt, not the loss)."""
    import random

    from alignment import grpo
    from alignment.rollout import episodes as episodes_module
    from alignment.rollout.episodes import episode_prompt
    from alignment.rollout.generation import GenerationResult, GenerationSettings
    from rewards import RewardScorer

    tokenizer = load("tiny")
    rows = [next(r for r in tasks["rl"] + tasks["test"] if r["metadata"]["kind"] == kind)
            for kind in ("update", "compute")]
    config = grpo.RolloutConfig(group_size=4, max_turns=5)

    def fake_generate(model, prompts, settings, reasoning, seed, stream_ids):
        results = []
        for prompt, stream in zip(prompts, stream_ids):
            text = tokenizer.decode(prompt, skip_special_tokens=False)
            row = next(r for r in rows if episode_prompt(r)[-1]["content"] in text)
            turn = text.count("<TOOL_RESPONSE>")
            succeeds = (stream // config.max_turns) % 2 == 0  # the G samples of a group alternate
            script = _turns_text(row, row["metadata"]["reference_calls"], row["answer"] if succeeds else "-1")
            tokens = tokenizer(script[turn] + "<|end|>", add_special_tokens=False)["input_ids"]
            results.append(GenerationResult(tokens, [False] * len(tokens), [-0.5] * len(tokens), 2, False, True))
        return results

    monkeypatch.setattr(episodes_module, "generate", fake_generate)
    scorer = RewardScorer(dataclasses.replace(grpo.GRPOConfig().rewards, mode="inprocess"))
    try:
        groups, _ = grpo.rollout(None, tokenizer, list(enumerate(rows)), config, GenerationSettings(), scorer,
                                 random.Random(0), seed=0)
    finally:
        scorer.close()
    calls = [len(r["metadata"]["reference_calls"]) for r in rows]  # 3 and 1 call turns, then the answer
    for group, n_calls in zip(groups, calls):
        assert group.budget is None and all(len(c.turns) == n_calls + 1 for c in group.completions)
        assert sorted(group.rewards) == [0.0, 0.0, 1.0, 1.0], [c.scores for c in group.completions]
        assert group.completions[0].generated_tokens == sum(len(t.result.tokens) for t in group.completions[0].turns)

    samples, advantages, counts = grpo.learner_samples(groups, grpo.PolicyLossConfig())
    assert len(samples) == sum(4 * (n + 1) for n in calls) == len(advantages)
    first = groups[0].completions[0]
    for t, (turn, sample) in enumerate(zip(first.turns, samples)):
        assert sample["input_ids"] == turn.prompt_ids + turn.result.tokens
        assert trained_text(tokenizer, sample) == first.turns[t].text + "<|end|>"  # only the sampled turn is trained
        assert float(advantages[t]) == float(advantages[0]) != 0  # every turn carries the episode's advantage
    assert "<TOOL_RESPONSE>" in tokenizer.decode(samples[1]["input_ids"]) and counts["too_long_dropped"] == 0


@pytest.mark.parametrize("name", sorted(FORMATS))
def test_align_template_shows_each_tool_turn_and_parses_its_calls_back(name, capsys):
    from alignment.cli import _example_tool_row, main

    assert main(["template", str(FORMATS[name][0]), "--tools", "--json"]) == 0
    shown = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    reference = _example_tool_row()["metadata"]["reference_calls"]
    assert shown["tool_syntax"] == FORMATS[name][1] and len(shown["turns"]) == len(reference) + 1
    assert [t["parsed_calls"] for t in shown["turns"]] == reference + [[]]
    results = [m["content"] for m in _example_tool_row()["messages"] if m["role"] == "tool"]
    assert not any(t["malformed"] for t in shown["turns"])
    for turn, result in zip(shown["turns"][1:], results):  # each turn is prompted with the result before it
        assert result in turn["training_prompt"][-200:], (result, turn["training_prompt"][-200:])


def test_tool_pairs_are_mined_at_the_first_turn_the_episodes_act_differently(tasks, monkeypatch):
    """Mining pairs a success with a failure at the turn where their calls (or answers) first differ: a turn that
    made the same call in other words is not the pair, a success by other calls than the reference's is never
    chosen, and a prompt's pairs take a hallucinated tool and a wrong answer before a second of either."""
    from alignment.dpo import MiningConfig
    from alignment.rollout import episodes as episodes_module
    from alignment.rollout.generation import GenerationResult
    from alignment.tool_mining import mine_tool_pairs

    tokenizer = load("tiny")
    update, compute, sum_two = (next(r for r in tasks["rl"] + tasks["test"] if r["metadata"]["kind"] == kind)
                                for kind in ("update", "compute", "sum_two"))
    config = MiningConfig(samples_per_prompt=3, reasoning_off_fraction=0.0, max_pairs_per_prompt=2, tool_max_turns=5)

    def calls(row, add_arguments=None):  # the reference's calls, the addition's arguments replaced
        turns = row["metadata"]["reference_calls"]
        return [[{"name": "add", "arguments": add_arguments(c["arguments"])} if add_arguments and c["name"] == "add"
                 else c for c in turn] for turn in turns]

    def swap(arguments):
        return {"a": arguments["b"], "b": arguments["a"]}

    def off_by_one(arguments):
        return {"a": arguments["a"], "b": arguments["b"] + 1}

    wrong_update = _turns_text(update, calls(update, off_by_one), int(update["answer"]) + 1)
    scripts = {  # place (row * K + sample) -> its turns' texts
        0: _turns_text(update, calls(update), update["answer"]),  # success, the reference's calls
        1: ["other words" + wrong_update[0][1:]] + wrong_update[1:],  # the same first call in another trace, then
        2: wrong_update,  # a wrong addition
        3: _turns_text(compute, calls(compute), compute["answer"]),
        4: _turns_text(compute, calls(compute), int(compute["answer"]) + 1),
        5: _turns_text(compute, [[{"name": "teleport", "arguments": {}}]], compute["answer"]),
        6: _turns_text(sum_two, calls(sum_two, swap), sum_two["answer"]),  # right, by other calls: not chosen
        7: _turns_text(sum_two, calls(sum_two), int(sum_two["answer"]) + 1),
        8: _turns_text(sum_two, calls(sum_two), int(sum_two["answer"]) + 2),
    }

    def fake_generate(model, prompts, settings, reasoning, seed, stream_ids):
        results = []
        for stream in stream_ids:
            text = scripts[stream // config.tool_max_turns][stream % config.tool_max_turns]
            tokens = tokenizer(text + "<|end|>", add_special_tokens=False)["input_ids"]
            results.append(GenerationResult(tokens, [False] * len(tokens), [-0.5] * len(tokens), 2, False, True))
        return results

    monkeypatch.setattr(episodes_module, "generate", fake_generate)
    pairs, stats = mine_tool_pairs(None, tokenizer, [update, compute, sum_two], config, seed=0, tag="r1")
    assert stats["tool_pairs"] == 4 and stats["tool_no_contrast"] == 1  # sum_two: no success by the reference
    first, _, hallucinated, wrong_answer = pairs  # one success is the chosen side of two pairs
    assert [p["metadata"]["prompt_id"] for p in pairs] == [update["id"]] * 2 + [compute["id"]] * 2
    assert first["metadata"]["turn"] == 1  # not turn 0, which differs in its trace only
    assert first["metadata"]["chosen_text"] == scripts[0][1] and first["metadata"]["rejected_text"] == scripts[1][1]
    assert first["prompt"][-1]["role"] == "tool" and first["prompt"][-2]["tool_calls"]  # the conversation so far
    assert hallucinated["metadata"]["turn"] == 0 and hallucinated["metadata"]["rejected_hallucinated"]
    assert hallucinated["metadata"]["rejected_text"] == scripts[5][0]
    assert wrong_answer["metadata"]["turn"] == 1 and wrong_answer["metadata"]["rejected_text"] == scripts[4][1]
    for pair, chosen_text in ((first, scripts[0][1]), (hallucinated, scripts[3][0])):
        chosen = pair["encoded"]["chosen"]
        assert trained_text(tokenizer, chosen) == chosen_text + "<|end|>"  # the sampled turn alone is trained
        prompt_length = sum(label == IGNORE_INDEX for label in chosen["labels"])
        assert pair["encoded"]["rejected"]["input_ids"][:prompt_length] == chosen["input_ids"][:prompt_length]
