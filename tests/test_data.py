"""Data recipe and row validation."""

import json

import pytest

from alignment.data import BadDataError, read_rows
from data_recipes.synthetic_math import MathTaskConfig, generate_splits
from tests.conftest import write_jsonl


def test_splits_do_not_overlap_and_are_deterministic():
    config = MathTaskConfig(train_size=400, validation_size=50, test_size=50)
    splits = generate_splits(config)
    questions = {name: {r["messages"][-2]["content"] for r in rows} for name, rows in splits.items()}
    assert sum(len(q) for q in questions.values()) == 500  # no repeats anywhere
    assert not questions["train"] & questions["test"] and not questions["train"] & questions["validation"]
    assert generate_splits(config) == splits


def test_rl_prompts_are_fresh_and_leave_the_other_splits_unchanged():
    base = generate_splits(MathTaskConfig(train_size=300, validation_size=20, test_size=20))
    with_rl = generate_splits(MathTaskConfig(train_size=300, validation_size=20, test_size=20, rl_size=100))
    assert {k: v for k, v in with_rl.items() if k != "rl"} == base
    rl_questions = {r["messages"][-2]["content"] for r in with_rl["rl"]}
    others = {r["messages"][-2]["content"] for rows in base.values() for r in rows}
    assert len(rl_questions) == 100 and not rl_questions & others
    assert all(r["metadata"]["reasoning"] == "on" for r in with_rl["rl"])


def test_reasoning_off_fraction_and_format():
    rows = generate_splits(MathTaskConfig(train_size=2000, validation_size=1, test_size=1, reasoning_off_fraction=0.1))["train"]
    off = [r for r in rows if r["metadata"]["reasoning"] == "off"]
    assert 0.08 < len(off) / len(rows) < 0.12
    for row in off:
        assert row["messages"][0] == {"role": "system", "content": "/no_think"}
        assert row["messages"][-1]["reasoning_content"] == ""
    on = [r for r in rows if r["metadata"]["reasoning"] == "on"]
    assert all(r["messages"][-1]["reasoning_content"] for r in on)
    assert all(f"\\boxed{{{r['answer']}}}" in r["messages"][-1]["content"] for r in rows)


def test_traces_follow_the_steps():
    for row in generate_splits(MathTaskConfig(train_size=50, validation_size=1, test_size=1))["train"]:
        trace = row["messages"][-1]["reasoning_content"]
        if trace:
            lines = trace.strip().split("\n")
            assert len(lines) == row["metadata"]["steps"]
            assert lines[-1].endswith(f"= {row['answer']}")
            for line in lines:
                left, right = line.split(" = ")
                assert eval(left) == int(right)


GOOD = {"id": "x", "task": "math", "answer": "7",
        "messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "\\boxed{7}"}]}


def test_bad_rows_are_rejected_with_line_and_reason(tmp_path):
    rows = [GOOD] * 96 + [
        dict(GOOD, answer=""),
        dict(GOOD, messages=[]),
        dict(GOOD, messages=[{"role": "user", "content": "q"}, {"role": "assistant", "content": "<think>\nhalf"}]),
        b'{"id": "\xff\xfe bad bytes"}\n',
    ]
    path = write_jsonl(tmp_path / "rows.jsonl", rows)
    good, report = read_rows(path, "train", max_bad_fraction=0.05)
    assert len(good) == 96 and report.total == 100
    reasons = dict(report.bad)
    assert reasons[97] == "missing `answer`"
    assert reasons[98] == "empty or missing `messages`"
    assert "unclosed <think>" in reasons[99]
    assert "not valid UTF-8" in reasons[100]


def test_too_many_bad_rows_stop_the_run(tmp_path):
    path = write_jsonl(tmp_path / "rows.jsonl", [GOOD] * 9 + [dict(GOOD, messages=[])])
    with pytest.raises(BadDataError, match=r"rows.jsonl: 1 of 10 rows are bad .*line 10: empty or missing"):
        read_rows(path, "train", max_bad_fraction=0.05)
    assert len(read_rows(path, "train", max_bad_fraction=0.2)[0]) == 9


def test_prompt_rows_need_an_answer(tmp_path):
    row = {"id": "p", "task": "math", "messages": [{"role": "user", "content": "q"}]}
    path = write_jsonl(tmp_path / "p.jsonl", [row, dict(row, answer="3")])
    good, report = read_rows(path, "prompt", max_bad_fraction=0.5)
    assert len(good) == 1 and report.bad == [(1, "missing `answer`")]


def test_written_files_are_valid_rows(tiny_data):
    for split in ("train", "validation", "test"):
        rows, report = read_rows(tiny_data / f"{split}.jsonl", "train", 0.0)
        assert rows and not report.bad
    assert json.loads((tiny_data / "manifest.json").read_text())["rows"]["train"] == 64


def test_a_bad_row_in_a_small_eval_file_names_the_key_that_lets_it_through(tmp_path):
    from alignment.evaluate import EvalConfig

    path = tmp_path / "test.jsonl"
    good = [json.dumps({"messages": [{"role": "user", "content": f"q{i}"}], "answer": str(i)}) for i in range(29)]
    path.write_text("\n".join(good + ["not json"]) + "\n")
    config = EvalConfig(test_path=str(path))  # the default limit, 1%
    with pytest.raises(BadDataError, match=r"1 of 30 rows are bad .*`max_bad_fraction` key .*\(data, eval\)"):
        read_rows(config.test_path, "prompt", config.max_bad_fraction)
    rows, report = read_rows(path, "prompt", EvalConfig(max_bad_fraction=0.05).max_bad_fraction)
    assert len(rows) == 29 and len(report.bad) == 1


REDUNDANT = dict(verify=0.5, restate=0.5, branch=0.2, recompute=0.2)


def test_redundant_traces_keep_the_problems_and_every_step_and_only_add_skippable_lines():
    from data_recipes.synthetic_math import RedundancyConfig

    sizes = dict(train_size=300, validation_size=20, test_size=40, rl_size=20)
    plain = generate_splits(MathTaskConfig(**sizes))
    redundant = generate_splits(MathTaskConfig(**sizes, redundancy=RedundancyConfig(**REDUNDANT)))
    kinds = {"check": 0, "goal": 0, "maybe": 0, "again": 0, "so far": 0}
    for split in plain:
        for a, b in zip(plain[split], redundant[split]):
            assert a["messages"][:-1] == b["messages"][:-1] and a["answer"] == b["answer"]  # the same problems
            minimal = a["messages"][-1]["reasoning_content"]
            assert b["metadata"]["minimal_trace"] == a["metadata"]["minimal_trace"]
            assert not minimal or minimal == a["metadata"]["minimal_trace"]  # without redundancy: the minimal trace
            full = b["messages"][-1]["reasoning_content"]
            if not minimal:  # a reasoning-off row stays without a trace
                assert not full
                continue
            step_lines = [line for line in full.splitlines() if not line.startswith(tuple(kinds))]
            assert step_lines == minimal.splitlines()  # every step, in order, nothing else unmarked
            for line in full.splitlines():
                for kind in kinds:
                    kinds[kind] += line.startswith(kind)
                if line.startswith("check: "):  # the check is true arithmetic
                    lhs, rhs = line.removeprefix("check: ").removesuffix(", ok").split(" = ")
                    x, op, n = lhs.split()
                    assert {"+": int(x) + int(n), "-": int(x) - int(n), "/": int(x) // int(n)}[op] == int(rhs)
    assert all(kinds.values()), kinds  # every kind of redundancy occurs
    lengths = [(len(r["messages"][-1]["reasoning_content"]), len(r["metadata"]["minimal_trace"]))
               for r in redundant["test"]]
    assert sum(a for a, _ in lengths) > 1.8 * sum(b for _, b in lengths)


def test_evaluation_reports_where_the_minimal_trace_fits(tokenizer):
    from alignment.evaluate import EvalConfig, reference_fits
    from data_recipes.synthetic_math import RedundancyConfig

    rows = generate_splits(MathTaskConfig(train_size=1, validation_size=1, test_size=60,
                                          redundancy=RedundancyConfig(**REDUNDANT)))["test"]
    config = EvalConfig(grace_fraction=0.0)
    full, minimal = (reference_fits(tokenizer, rows, [32, 64, None], config, minimal=m) for m in (False, True))
    assert minimal[-1] == full[-1] == 1.0 and minimal[0] > full[0] and minimal[1] >= full[1]
