"""Split guard: splits that share a prompt are refused by content, whatever their file names and reasoning modes."""

import json

import pytest

from alignment.config import load_config
from alignment.data import read_rows
from alignment.sft import run_sft
from alignment.split_guard import SplitOverlapError, check_disjoint, guard_splits, prompt_key
from data_recipes.adapters import load_dataset_rows, rows_from_gsm8k
from data_recipes.adapters.loading import main as convert_main
from data_recipes.synthetic_math import MathDataConfig, generate_splits
from tests.conftest import REPO, TINY_MODEL, TINY_TOKENIZER, write_jsonl
from tests.test_adapters import FIXTURES, records
from tests.test_sft import tiny_sft_config


def rows_of(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def in_other_mode(row: dict) -> dict:
    """The same question as reasoning off, shouted, with extra spaces and the keyword where a client would write it."""
    *prompt, answer = row["messages"]
    user = next(m for m in prompt if m["role"] == "user")
    messages = [{"role": "system", "content": "detailed thinking off"},
                {"role": "user", "content": "  " + user["content"].upper().replace(" ", "   ") + " /no_think"},
                dict(answer, reasoning_content="")]
    return dict(row, id=row["id"] + "-off", messages=messages)


def test_overlap_across_splits_is_refused_with_files_rows_and_count(tiny_data, tmp_path):
    test = rows_of(tiny_data / "test.jsonl")
    train = rows_of(tiny_data / "train.jsonl")
    train_path = write_jsonl(tmp_path / "train.jsonl", train + [train[0], test[3], test[5]])  # a repeat within train
    with pytest.raises(SplitOverlapError) as caught:
        check_disjoint({"train": train_path, "validation": tiny_data / "validation.jsonl",
                        "test": tiny_data / "test.jsonl"})
    message = str(caught.value)
    assert caught.value.overlaps == [("train", "test", 2)]
    assert f"'train' ({train_path}) and 'test' ({tiny_data / 'test.jsonl'}) share 2 prompt(s)" in message
    assert "train line 66 (id math-test-000003) = test line 4 (id math-test-000003)" in message
    assert "train line 67 (id math-test-000005) = test line 6 (id math-test-000005)" in message
    # Without the copied test rows the same files pass, the train repeat included.
    write_jsonl(train_path, train + [train[0]])
    summary = check_disjoint({"train": train_path, "test": tiny_data / "test.jsonl"})
    assert summary["train"]["rows"] == 65 and summary["train"]["prompts"] == 64


@pytest.mark.parametrize("variant", [
    in_other_mode,
    lambda row: dict(row, messages=[{"role": "system", "content": "/think"}] + row["messages"]),
    # Full-width letters and a no-break space: NFKC makes them the plain text.
    lambda row: dict(row, messages=[dict(row["messages"][-2], content=row["messages"][-2]["content"]
                                         .replace("Start", "Ｓｔａｒｔ").replace(" ", "\u00a0", 1)),
                                    row["messages"][-1]]),
], ids=["reasoning-off-upper-spaced", "think-system-prompt", "full-width"])
def test_reasoning_switch_and_formatting_do_not_hide_an_overlap(tiny_data, variant):
    test = rows_of(tiny_data / "test.jsonl")
    assert prompt_key(variant(test[0])) == prompt_key(test[0])
    with pytest.raises(SplitOverlapError, match=r"'rl' \(rows in memory\) and 'test' .* share 1 prompt"):
        check_disjoint({"rl": [variant(test[0])], "test": tiny_data / "test.jsonl"})


def test_a_task_row_without_messages_collides_with_its_chat_form():
    chat = rows_from_gsm8k(records("gsm8k"))[0]
    task = {"id": "q", "task": "math", "question": records("gsm8k")[0]["question"], "answer": chat["answer"]}
    assert prompt_key(task) == prompt_key(chat)
    assert prompt_key({"messages": [{"role": "user", "content": "a </think> b"}]}) != prompt_key(
        {"messages": [{"role": "user", "content": "a b"}]})  # a closing tag is content, not the switch


def test_one_file_for_two_splits_is_refused_and_unset_splits_are_skipped(tiny_data, tmp_path):
    relative = tmp_path / "sub" / ".." / "test.jsonl"
    (tmp_path / "sub").mkdir()
    (tmp_path / "test.jsonl").write_bytes((tiny_data / "test.jsonl").read_bytes())
    with pytest.raises(SplitOverlapError, match="dpo: splits 'validation' and 'test' are the same file"):
        guard_splits("dpo", validation=str(relative), test=str(tmp_path / "test.jsonl"))
    summary = guard_splits("dpo", rl="", validation=str(tiny_data / "validation.jsonl"),
                           test=str(tmp_path / "test.jsonl"))
    assert list(summary) == ["validation", "test"]


def test_adapters_drop_rows_whose_prompt_is_held_out(tmp_path):
    converted = rows_from_gsm8k(records("gsm8k"))
    held_out = write_jsonl(tmp_path / "test.jsonl", [in_other_mode(converted[0])])
    out = tmp_path / "train.jsonl"
    convert_main([str(FIXTURES / "gsm8k.jsonl"), "--schema", "gsm8k", "--out", str(out),
                  "--exclude-prompts", str(held_out)])
    assert read_rows(out)[0] == converted[1:]
    manifest = json.loads((tmp_path / "train.manifest.json").read_text())
    assert manifest["excluded"] == 1 and manifest["excluded_examples"] == [converted[0]["id"]]
    assert manifest["exclude_prompts"] == [str(held_out)] and manifest["bad"] == 0
    check_disjoint({"train": out, "test": held_out})
    assert load_dataset_rows(FIXTURES / "gsm8k.jsonl", "gsm8k", exclude_prompts=[held_out]) == converted[1:]


def test_default_synthetic_splits_are_disjoint():
    config = load_config(MathDataConfig, REPO / "configs" / "tiny" / "data.yaml")
    splits = generate_splits(config.task)
    summary = check_disjoint(splits)
    assert {name: s["prompts"] for name, s in summary.items()} == {"test": 300, "validation": 200, "train": 6000,
                                                                  "rl": 2000}


def test_sft_refuses_a_test_split_that_holds_training_prompts(tiny_data, tmp_path):
    train = rows_of(tiny_data / "train.jsonl")
    test_path = write_jsonl(tmp_path / "test.jsonl", rows_of(tiny_data / "test.jsonl") + [in_other_mode(train[7])])
    config = tiny_sft_config(tiny_data, tmp_path / "run", f"data.test_path={test_path}")
    overlap = r"(?s)sft: .*'train' .* and 'test' .* share 1 prompt.*train line 8 \(id math-train-000007\)"
    with pytest.raises(SplitOverlapError, match=overlap):
        run_sft(config)
    config = tiny_sft_config(tiny_data, tmp_path / "run", f"data.test_path={tiny_data / 'train.jsonl'}")
    with pytest.raises(SplitOverlapError, match="sft: splits 'train' and 'test' are the same file"):
        run_sft(config)
    assert not (tmp_path / "run" / "checkpoint").exists()


def test_dpo_and_grpo_refuse_prompts_shared_with_the_test_split(tiny_data, tmp_path):
    from alignment.dpo import run_dpo
    from alignment.grpo import GRPOConfig, run_grpo
    from tests.test_dpo import tiny_dpo_config

    train = rows_of(tiny_data / "train.jsonl")
    test_path = write_jsonl(tmp_path / "test.jsonl", rows_of(tiny_data / "test.jsonl") + [in_other_mode(train[3])])
    dpo = tiny_dpo_config(tiny_data, tmp_path / "dpo", f"mining.prompts_path={tiny_data / 'train.jsonl'}",
                          f"eval.test_path={test_path}")
    with pytest.raises(SplitOverlapError, match=r"(?s)dpo: .*'rl' .* and 'test' .* share 1 prompt"):
        run_dpo(dpo)
    grpo = load_config(GRPOConfig, None, [
        f"model.name_or_path={TINY_MODEL}", f"model.tokenizer={TINY_TOKENIZER}",
        f"data.train_path={tiny_data / 'train.jsonl'}", f"eval.test_path={test_path}", f"output_dir={tmp_path / 'grpo'}",
        "device=cpu"])
    with pytest.raises(SplitOverlapError, match=r"(?s)grpo: .*'rl' .* and 'test' .* share 1 prompt"):
        run_grpo(grpo)
    assert not (tmp_path / "dpo" / "checkpoint").exists() and not (tmp_path / "grpo" / "checkpoint").exists()
