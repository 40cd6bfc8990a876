"""Dataset adapters: each public schema's fixture converts to valid rows; bad records are rejected with reasons."""

import json
from pathlib import Path

import pytest

from alignment.data import BadDataError, read_rows, row_problem, write_rows
from data_recipes.adapters import (
    adapt,
    load_dataset_rows,
    load_dataset_rows_with_report,
    rows_from_gsm8k,
    rows_from_humaneval,
    rows_from_livecodebench,
    rows_from_llama_nemotron,
    rows_from_math,
    rows_from_mbpp,
    rows_from_nemotron_post_training,
    rows_from_openmathreasoning,
    schema_names,
)
from data_recipes.adapters.loading import main as convert_main
from envs.answers import extract_boxed

FIXTURES = Path(__file__).resolve().parent / "fixtures" / "datasets"
SCHEMAS = [name for name in schema_names() if name != "rows"]


def records(schema: str) -> list[dict]:
    return [json.loads(line) for line in (FIXTURES / f"{schema}.jsonl").read_text().splitlines() if line.strip()]


def final(row: dict) -> dict:
    return row["messages"][-1]


def switch(row: dict) -> str | None:
    system = next((m["content"] for m in row["messages"] if m["role"] == "system"), "")
    return "off" if "/no_think" in system else None


@pytest.mark.parametrize("schema", SCHEMAS)
def test_every_fixture_converts_and_reads_back_clean(schema, tmp_path):
    rows, report = load_dataset_rows_with_report(FIXTURES / f"{schema}.jsonl", schema)
    assert report.bad == [] and len(rows) == report.total == len(records(schema))
    assert len({r["id"] for r in rows}) == len(rows)
    for row in rows:
        assert set(row) >= {"id", "task", "messages", "metadata"}
        assert row["metadata"]["source"] == schema
        # The reasoning flag in metadata and the switch in the messages agree.
        assert (switch(row) == "off") == (row["metadata"]["reasoning"] == "off")
        if row["metadata"]["reasoning"] == "off" and final(row)["role"] == "assistant":
            assert final(row)["reasoning_content"] == ""
    write_rows(tmp_path / "rows.jsonl", rows)
    back, read_report = read_rows(tmp_path / "rows.jsonl", "train" if schema != "livecodebench" else "prompt")
    assert back == rows and read_report.bad == []


def test_llama_nemotron_flag_trace_and_system_prompt():
    on, off, multi = rows_from_llama_nemotron(records("llama_nemotron"))
    assert final(on) == {"role": "assistant", "content": "The answer is \\boxed{84}.",
                         "reasoning_content": "12 * 7 = 84.\nCheck: 84 / 7 = 12.\n"}
    assert on["task"] == "math" and on["answer"] == "84"
    # "detailed thinking on/off" is Llama-Nemotron's switch; rows carry Nano 2's, and only for off.
    assert on["messages"][0] == {"role": "user", "content": "What is 12 * 7?"}
    assert off["messages"][0] == {"role": "system", "content": "/no_think"}
    assert off["task"] == "chat" and "answer" not in off and final(off)["content"] == "Red."
    assert multi["messages"][0] == {"role": "system", "content": "You are a friendly assistant."}
    assert multi["messages"][2] == {"role": "assistant", "content": "Hi!"}  # past reasoning dropped
    assert final(multi)["reasoning_content"] == "Hi in French is Salut.\n"


def test_nemotron_post_training_inline_separate_and_off():
    inline, off, separate = rows_from_nemotron_post_training(records("nemotron_post_training"))
    assert final(inline)["reasoning_content"] == "2^10 = 1024.\n" and inline["answer"] == "1024"
    assert inline["id"] == "nemotron_post_training-a1b2c3"
    # The source's own `/think` is replaced by the row's flag (off): the flag is authoritative.
    assert off["messages"][0] == {"role": "system", "content": "Answer briefly. /no_think"}
    assert final(off) == {"role": "assistant", "content": "Paris.", "reasoning_content": ""}
    assert final(separate)["reasoning_content"] == "Blue light scatters more than red (1/lambda^4).\n"
    assert separate["metadata"]["category"] == "stem" and separate["task"] == "chat"


def test_math_sets_answers_and_traces():
    natalia, pens = rows_from_gsm8k(records("gsm8k"))
    assert natalia["answer"] == "72" and pens["answer"] == "2000"  # thousands separator removed
    assert "<<" not in final(natalia)["reasoning_content"] and "####" not in final(natalia)["reasoning_content"]
    assert final(natalia)["reasoning_content"].startswith("Natalia sold 48/2 = 24 clips in May.")
    assert natalia["messages"][0]["content"].endswith("Put the final answer in \\boxed{}.")
    sqrt, frac = rows_from_math(records("math"))
    assert (sqrt["answer"], frac["answer"]) == ("12", "\\frac{5}{6}")
    assert frac["metadata"]["level"] == "Level 2"
    cot, plain = rows_from_openmathreasoning(records("openmathreasoning"))
    assert cot["metadata"]["reasoning"] == "on" and final(cot)["reasoning_content"].startswith("The sum is")
    assert plain["metadata"]["reasoning"] == "off" and switch(plain) == "off"
    for row in (natalia, pens, sqrt, frac, cot, plain):
        assert row["task"] == "math" and extract_boxed(final(row)["content"]) == row["answer"]


@pytest.mark.parametrize("convert, schema", [(rows_from_mbpp, "mbpp"), (rows_from_humaneval, "humaneval")])
def test_code_reference_solutions_pass_their_tests(convert, schema):
    # Fixture code is ours and trusted, so running it in process checks the test statements are well-formed.
    for row in convert(records(schema)):
        assert row["task"] == "code" and final(row)["content"] == f"```python\n{row['solution']}```"
        for test in row["tests"]:
            namespace: dict = {}
            exec(row["solution"], namespace)
            exec(test, namespace)
            with pytest.raises(NameError):  # and each test calls the solution's function
                exec(test, {})


def test_mbpp_prompt_shows_the_first_test_and_keeps_setup_per_test():
    record = dict(records("mbpp")[1], test_setup_code="import math")
    (row,) = rows_from_mbpp([record])
    assert "assert is_not_prime(2) == False" in row["prompt"]
    assert all(t.startswith("import math\n") for t in row["tests"])


def test_livecodebench_rows_are_prompts_with_stdio_pairs():
    first, second = rows_from_livecodebench(records("livecodebench"))
    assert first["tests"] == [{"input": "1 2\n", "output": "3\n"}, {"input": "10 -4\n", "output": "6\n"}]
    assert second["tests"] == [{"input": "3\n1 5 2\n", "output": "5\n"}]  # a list, not JSON text, works too
    assert first["messages"][-1]["role"] == "user" and "solution" not in first
    assert row_problem(first, "prompt") is None


BAD_RECORDS = [
    ("gsm8k", {"question": "q", "answer": "no final line"}, "#### <final answer>"),
    ("gsm8k", {"answer": "x\n#### 1"}, "`question` is missing"),
    ("math", {"problem": "p", "solution": "no box"}, "no \\boxed{}"),
    ("openmathreasoning", {"problem": "p", "generated_solution": "<think>\nx\n</think>\n\\boxed{1}"},
     "`expected_answer` is missing"),
    ("openmathreasoning", {"problem": "p", "generated_solution": "<think>\nnever closed", "expected_answer": "1"},
     "unclosed <think>"),
    ("llama_nemotron", {"input": [{"role": "user", "content": "q"}], "output": "a", "reasoning": "on"},
     "reasoning is on but the output has no trace"),
    ("llama_nemotron", {"input": [{"role": "user", "content": "q"}], "output": "<think>\nt\n</think>a",
                        "reasoning": "off"}, "reasoning is off but the output holds a trace"),
    ("llama_nemotron", {"input": [{"role": "user", "content": "q"}], "output": "a", "reasoning": "maybe"},
     "is not on/off"),
    ("llama_nemotron", {"input": [], "output": "a"}, "`input` is missing or not a non-empty list"),
    ("nemotron_post_training", {"messages": [{"role": "user", "content": "q"}]}, "at least a user turn"),
    ("nemotron_post_training", {"messages": [{"role": "user", "content": "q"},
                                             {"role": "assistant", "content": "<think>\nx\n</think>\n"}]},
     "answer (text after the trace) is empty"),
    ("nemotron_post_training", {"messages": [{"role": "user", "content": "q"},
                                             {"role": "assistant", "content": "<think>a</think>b",
                                              "reasoning_content": "c"}]}, "both an inline trace"),
    ("mbpp", {"text": "t", "code": "def f(): pass", "test_list": []}, "`test_list` must be a non-empty list"),
    ("humaneval", {"prompt": "def f():\n", "canonical_solution": "  pass\n", "test": "assert True",
                   "entry_point": "f"}, "does not define check"),
    ("livecodebench", {"question_content": "q", "public_test_cases": "[{\"input\": \"1\", \"output\": \"2\", "
                                                                     "\"testtype\": \"functional\"}]"},
     "only stdin/stdout"),
    ("livecodebench", {"question_content": "q", "public_test_cases": "not json"}, "not valid JSON"),
]


@pytest.mark.parametrize("schema, record, reason", BAD_RECORDS)
def test_bad_record_rejected_with_index_and_reason(schema, record, reason):
    good = records(schema)
    rows, report = adapt(good + [record], schema, max_bad_fraction=1.0)
    assert len(rows) == len(good)
    assert len(report.bad) == 1 and report.bad[0][0] == len(good) and reason in report.bad[0][1], report.bad


def test_too_many_bad_records_raise_with_the_first_reasons():
    bad = [{"question": "q", "answer": "no final line"}] * 2
    with pytest.raises(BadDataError, match=r"2 of 4 records are bad .* record 2: `answer` has no `####"):
        rows_from_gsm8k(records("gsm8k") + bad, max_bad_fraction=0.25)
    assert len(rows_from_gsm8k(records("gsm8k") + bad, max_bad_fraction=0.5)) == 2


def test_unknown_schema_names_the_known_ones():
    with pytest.raises(ValueError, match="unknown dataset schema 'gsm9k'; known: .*gsm8k"):
        adapt([{}], "gsm9k")


def test_load_parquet_directory_and_bad_json_lines(tmp_path):
    import datasets

    datasets.Dataset.from_list(records("gsm8k")).to_parquet(str(tmp_path / "train-00000-of-00001.parquet"))
    (tmp_path / "test.jsonl").write_text((FIXTURES / "gsm8k.jsonl").read_text() + "{not json\n")
    assert load_dataset_rows(tmp_path / "train-00000-of-00001.parquet", "gsm8k") == rows_from_gsm8k(records("gsm8k"))
    assert len(load_dataset_rows(tmp_path, "gsm8k", split="train")) == 2  # a directory: files of the split
    rows, report = load_dataset_rows_with_report(tmp_path, "gsm8k", split="test", max_bad_fraction=0.5)
    assert len(rows) == 2 and report.bad == [(2, "not valid JSON (Expecting property name enclosed in double quotes)")]
    with pytest.raises(FileNotFoundError):
        load_dataset_rows(tmp_path / "missing.jsonl", "gsm8k")  # a local-looking path never goes to the hub


def test_project_rows_pass_through_validated(tiny_data):
    rows = load_dataset_rows(tiny_data / "train.jsonl", "rows")
    assert rows == read_rows(tiny_data / "train.jsonl")[0]


def test_command_line_writes_rows_and_manifest(tmp_path):
    out = tmp_path / "math" / "train.jsonl"
    convert_main([str(FIXTURES / "math.jsonl"), "--schema", "math", "--out", str(out)])
    assert read_rows(out)[0] == rows_from_math(records("math"))
    manifest = json.loads((out.parent / "train.manifest.json").read_text())
    assert manifest["schema"] == "math" and manifest["rows"] == 2 and manifest["bad"] == 0


def test_the_command_reports_a_bad_source_in_one_line(tmp_path, capsys):
    from data_recipes.adapters.loading import main

    bad = tmp_path / "bad.jsonl"
    bad.write_text("not json\n")
    for source, message in ((bad, "1 of 1 records are bad"), (tmp_path / "nope.jsonl", "dataset file not found")):
        with pytest.raises(SystemExit) as exit_info:
            main([str(source), "--schema", "gsm8k", "--out", str(tmp_path / "out.jsonl")])
        assert str(exit_info.value.code).startswith("error: ") and message in str(exit_info.value.code)
    with pytest.raises(BadDataError):
        main([str(bad), "--schema", "gsm8k", "--out", str(tmp_path / "out.jsonl"), "--debug"])
