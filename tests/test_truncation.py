"""Truncated-thinking rows."""

from data_recipes.synthetic_math import MathTaskConfig, generate_splits
from data_recipes.truncation import TruncationConfig, truncate_rows


def test_fraction_cut_and_answer_kept(tokenizer):
    rows = generate_splits(MathTaskConfig(train_size=1000, validation_size=1, test_size=1))["train"]
    config = TruncationConfig(fraction=0.2, min_budget=0, max_budget=20, seed=3)
    out, stats = truncate_rows(rows, config, tokenizer)
    cut = [(a, b) for a, b in zip(rows, out) if a is not b]
    assert stats["truncated"] == len(cut) and 0.12 < len(cut) / 1000 < 0.22
    for original, new in cut:
        trace = new["messages"][-1]["reasoning_content"]
        full = original["messages"][-1]["reasoning_content"]
        n = new["metadata"]["truncated_at"]
        assert len(tokenizer(trace)["input_ids"]) == n <= 20
        assert full.startswith(trace) and len(trace) < len(full)
        assert new["messages"][-1]["content"] == original["messages"][-1]["content"]  # the final answer is kept
        assert "truncated_at" not in original.get("metadata", {})  # the input rows are not modified
    assert truncate_rows(rows, config, tokenizer)[0] == out  # deterministic under the seed
    off_rows = [r for r in rows if r["metadata"]["reasoning"] == "off"]
    assert all(r is o for r, o in zip(rows, out) if r in off_rows)


def test_fraction_mode_and_marker(tokenizer):
    rows = generate_splits(MathTaskConfig(train_size=200, validation_size=1, test_size=1))["train"]
    config = TruncationConfig(fraction=1.0, budget_mode="fraction", min_fraction=0.5, max_fraction=0.5,
                              close_marker="...\n")
    out, stats = truncate_rows(rows, config, tokenizer)
    assert stats["truncated"] > 150
    for new in out:
        if "truncated_at" in new.get("metadata", {}):
            assert new["messages"][-1]["reasoning_content"].endswith("...\n")


def test_rendered_truncated_row_closes_the_trace(tokenizer):
    from alignment.chat_format import encode_for_training

    row = generate_splits(MathTaskConfig(train_size=5, validation_size=1, test_size=1, min_steps=4))["train"][0]
    (new,), _ = truncate_rows([row], TruncationConfig(fraction=1.0, min_budget=5, max_budget=5), tokenizer)
    text = tokenizer.decode(encode_for_training(tokenizer, new["messages"])["input_ids"])
    assert text.count("</think>") == 1 and text.endswith("</think>\nThe result is \\boxed{%s}.<|end|>" % row["answer"])


def test_the_close_after_a_cut_can_carry_no_loss(tokenizer):
    from alignment.chat_format import IGNORE_INDEX, encode_for_training
    from data_recipes.truncation import mask_forced_close

    row = generate_splits(MathTaskConfig(train_size=5, validation_size=1, test_size=1, min_steps=4))["train"][0]
    (new,), _ = truncate_rows([row], TruncationConfig(fraction=1.0, min_budget=5, max_budget=5), tokenizer)
    sample = encode_for_training(tokenizer, new["messages"])
    close = tokenizer("</think>", add_special_tokens=False)["input_ids"]
    masked, found = mask_forced_close(sample, close)
    at = sample["input_ids"].index(close[0])
    assert found and masked["input_ids"] == sample["input_ids"]
    assert masked["labels"][at] == IGNORE_INDEX != sample["labels"][at]  # the forced close carries no loss
    assert [l for i, l in enumerate(masked["labels"]) if i != at] == [l for i, l in enumerate(sample["labels"]) if i != at]
    assert sample["labels"][at - 1] != IGNORE_INDEX and sample["labels"][at + 1] != IGNORE_INDEX  # trace and answer train


def redundant_rows(n=300):
    from data_recipes.synthetic_math import RedundancyConfig

    config = MathTaskConfig(train_size=n, validation_size=1, test_size=1, reasoning_off_fraction=0.0,
                            redundancy=RedundancyConfig(verify=0.5, restate=0.5, branch=0.2, recompute=0.2))
    return generate_splits(config)["train"]


def length(tokenizer, text):
    return len(tokenizer(text, add_special_tokens=False)["input_ids"])


def test_fit_trace_drops_skippable_lines_and_keeps_every_operation(tokenizer):
    from data_recipes.truncation import fit_trace

    checked = 0
    for row in redundant_rows(200):
        trace, minimal = row["messages"][-1]["reasoning_content"], row["metadata"]["minimal_trace"]
        full, ops = length(tokenizer, trace), length(tokenizer, minimal)
        if full == ops:
            continue
        for budget in (ops, (ops + full) // 2, full - 1, full + 5):
            fitted = fit_trace(trace, minimal, budget, tokenizer)
            lines = fitted.splitlines()
            kept_ops = [line for line in lines if line in minimal.splitlines()]
            assert kept_ops == minimal.splitlines()  # every operation, in order
            assert set(lines) <= set(trace.splitlines())  # nothing new, only lines left out
            assert length(tokenizer, fitted) <= max(budget, ops)
            if budget >= full:
                assert fitted == trace
            checked += 1
    assert checked > 100
    # below the operations' own length nothing skippable stays: the caller cuts the operations
    row = next(r for r in redundant_rows(50) if r["messages"][-1]["reasoning_content"] != r["metadata"]["minimal_trace"])
    minimal = row["metadata"]["minimal_trace"]
    assert fit_trace(row["messages"][-1]["reasoning_content"], minimal, 3, tokenizer) == minimal


def test_compress_and_state_budget(tokenizer):
    from alignment.chat_format import BUDGET_STATEMENT

    rows = redundant_rows(300)
    config = TruncationConfig(fraction=1.0, min_budget=10, max_budget=120, compress=True, state_budget=True)
    out, stats = truncate_rows(rows, config, tokenizer)
    assert stats["budget_stated"] == stats["drawn"] == 300
    assert 0 < stats["compressed"] < 300 and 0 < stats["truncated"] < 300
    for original, new in zip(rows, out):
        budget = new["metadata"]["stated_budget"]
        user = [m for m in new["messages"] if m["role"] == "user"][-1]["content"]
        assert user.endswith(BUDGET_STATEMENT.format(budget=budget))
        trace = new["messages"][-1]["reasoning_content"]
        full = original["messages"][-1]["reasoning_content"]
        assert length(tokenizer, trace) <= max(budget, 0) or trace == full
        if "compressed_to" in new["metadata"] and "truncated_at" not in new["metadata"]:
            # compressed to fit, not cut: the operations are all there
            assert all(step in trace for step in original["metadata"]["minimal_trace"].splitlines())
        if length(tokenizer, full) <= budget:
            assert trace == full  # a trace that fits is kept whole; only the prompt changed
        assert new["messages"][-1]["content"] == original["messages"][-1]["content"]
    # without compress the same budgets cut the full traces
    plain, plain_stats = truncate_rows(rows, TruncationConfig(fraction=1.0, min_budget=10, max_budget=120), tokenizer)
    assert plain_stats["compressed"] == 0 and plain_stats["truncated"] > stats["truncated"]


def test_compress_needs_the_minimal_trace(tokenizer):
    import pytest

    row = redundant_rows(20)[0]
    del row["metadata"]["minimal_trace"]
    with pytest.raises(ValueError, match="row 0 .*minimal_trace"):
        truncate_rows([row], TruncationConfig(fraction=1.0, min_budget=1, max_budget=1, compress=True), tokenizer)


def test_state_budget_writes_in_the_last_user_message():
    import pytest

    from alignment.chat_format import state_budget

    messages = [{"role": "system", "content": "s"}, {"role": "user", "content": "q1 "},
                {"role": "assistant", "content": "a"}, {"role": "user", "content": "q2"}]
    stated = state_budget(messages, 40)
    assert stated[3]["content"] == "q2\nThink for at most 40 tokens." and stated[:3] == messages[:3]
    assert messages[3]["content"] == "q2"  # not modified in place
    assert state_budget(messages, None) is messages
    with pytest.raises(ValueError, match="user message"):
        state_budget([{"role": "system", "content": "s"}], 5)
