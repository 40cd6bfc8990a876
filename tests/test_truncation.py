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
