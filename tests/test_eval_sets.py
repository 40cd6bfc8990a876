"""Benchmarks as named eval sets: GPQA's multiple choice (its schema, the letter grading), AIME's problem/answer rows,
and `align eval --sets` giving one table across sets, each set's source and settings in eval.json."""

from __future__ import annotations

import csv
import json

import pytest

from alignment.evaluate import EvalRunConfig, answer_is_right, judge, parse_sets, row_answer
from data_recipes.adapters import adapt, rows_from_aime, rows_from_gpqa
from envs.answers import choice_letter
from tests.conftest import TINY_MODEL, TINY_TOKENIZER, write_jsonl

CHOICES = {"A": "12 eV", "B": "$\\sqrt{2}$", "C": "42", "D": "17.5 eV"}


@pytest.mark.parametrize("text, picked", [
    ("\\boxed{B}", "B"),
    ("\\boxed{\\text{(C)}}", "C"),
    ("\\boxed{(A)}", "A"),
    ("\\boxed{D) 17.5 eV}", "D"),  # the letter with its own option
    ("\\boxed{D) 12 eV}", None),  # a letter with another option's text: no pick
    ("\\boxed{17.5 eV}", "D"),  # the option's text
    ("\\boxed{\\sqrt{2}}", "B"),
    ("\\boxed{A, C}", None),  # two picks
    ("\\boxed{E}", None),  # not an option
    ("The answer is (B).", "B"),
    ("Answer: **C**", "C"),
    ("answer: c", "C"),
    ("final answer: D) 17.5 eV", "D"),
    ("A careful look shows the answer is D", "D"),  # the article "A" is no answer
    ("I first thought the answer is (A), but the answer is (C).", "C"),  # the last one
    ("the answer is A ... so \\boxed{B}", "B"),  # the box decides
    ("Answer: A and B", None),
    ("answer: C or D", None),
    ("Neither option fits.", None),
    ("A", None),
])  # fmt: skip
def test_the_letter_a_multiple_choice_answer_picks(text, picked):
    assert choice_letter(text, CHOICES) == picked


GPQA_FIELDS = ["Record ID", "Question", "Correct Answer", "Incorrect Answer 1", "Incorrect Answer 2",
               "Incorrect Answer 3", "Subdomain"]


def gpqa_records(n: int) -> list[dict]:
    return [{"Record ID": f"rec{i}", "Question": f"Which value does system {i} take?", "Correct Answer": f"{i} eV",
             "Incorrect Answer 1": f"{i + 100} eV", "Incorrect Answer 2": f"{i + 200} eV",
             "Incorrect Answer 3": f"{i + 300} eV", "Subdomain": "Physics"} for i in range(n)]


def write_gpqa_csv(path, records):
    with path.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=GPQA_FIELDS)
        writer.writeheader()
        writer.writerows(records)
    return path


def test_gpqa_rows_shuffle_their_options_by_record_and_point_at_the_correct_one():
    rows = rows_from_gpqa(gpqa_records(12))
    assert rows == rows_from_gpqa(gpqa_records(12))  # the same letters on every run
    assert len({row["answer"] for row in rows}) > 1  # the correct option is not always (A)
    for i, row in enumerate(rows):
        choices = row["metadata"]["choices"]
        assert row["task"] == "multiple_choice" and sorted(choices) == ["A", "B", "C", "D"]
        assert choices[row["answer"]] == f"{i} eV"
        prompt = next(m["content"] for m in row["messages"] if m["role"] == "user")
        assert f"({row['answer']}) {i} eV" in prompt and "\\boxed{}" in prompt
    bad = gpqa_records(2)
    bad[1]["Incorrect Answer 2"] = " "
    rows, report = adapt(bad, "gpqa", max_bad_fraction=0.5)
    assert len(rows) == 1 and "Incorrect Answer 2" in str(report.bad[0])


def test_the_evaluation_grades_a_multiple_choice_row_by_its_letter():
    (row,) = rows_from_gpqa(gpqa_records(1))
    right, option = row["answer"], row["metadata"]["choices"][row["answer"]]
    for completion, expected in ((f"</think>The answer is \\boxed{{{right}}}.", True),
                                 (f"</think>\\boxed{{{option}}}", True),
                                 ("</think>\\boxed{Z}", False),
                                 (f"I think \\boxed{{{right}}}", False)):  # reasoning on, trace never closed
        verdict = judge(completion, True, True, 5, 100)
        assert answer_is_right(row_answer(verdict, row), row) is expected, completion
    no_choices = dict(row, metadata={})
    with pytest.raises(ValueError, match="metadata.choices"):
        row_answer(judge("</think>\\boxed{A}", True, True, 5, 100), no_choices)


def test_aime_rows_are_problem_and_answer():
    (row,) = rows_from_aime([{"id": 7, "problem": "Find the remainder of 2^10 mod 7.", "answer": 2}])
    assert (row["task"], row["answer"], row["id"]) == ("math", "2", "aime-7")
    assert row["messages"][-1]["content"].endswith("\\boxed{2}") or "\\boxed{2}" in row["messages"][-1]["content"]


@pytest.mark.parametrize("entry, message", [
    ("math500", "not NAME=PATH"),
    ("lcb:livecodebench=x.jsonl", "code set"),
    ("x:nosuch=x.jsonl", "unknown schema"),
])  # fmt: skip
def test_bad_set_entries_are_refused_naming_the_key(entry, message):
    with pytest.raises(ValueError, match=rf"sets: .*{message}"):
        parse_sets([entry])
    with pytest.raises(ValueError, match="given twice"):
        parse_sets(["a=x.jsonl", "a:aime=y.jsonl"])


def run_sets_eval(tmp_path, *overrides):
    from transformers import AutoTokenizer

    from alignment.checkpoint import save_model_checkpoint
    from alignment.config import load_config
    from alignment.evaluate import run_eval
    from alignment.modeling import ModelConfig, load_model

    checkpoint = save_model_checkpoint(tmp_path / "tiny" / "checkpoint", load_model(ModelConfig(str(TINY_MODEL))),
                                       AutoTokenizer.from_pretrained(TINY_TOKENIZER), {"stage": "test"})
    gpqa = write_gpqa_csv(tmp_path / "gpqa_diamond.csv", gpqa_records(3))
    aime = write_jsonl(tmp_path / "aime25.jsonl", [{"problem": f"What is {i} + {i}?", "answer": 2 * i}
                                                     for i in range(4)])
    math500 = write_jsonl(tmp_path / "math500.jsonl", [
        {"problem": "What is 3 + 4?", "solution": "3 + 4 = \\boxed{7}", "unique_id": "test/1.json"}])
    config = load_config(EvalRunConfig, None, [
        "eval.budgets=[8]", "eval.max_new_tokens=12", "eval.batch_size=8", f"output_dir={tmp_path / 'eval'}",
        "device=cpu", *overrides])
    config.sets = [f"gpqa_diamond={gpqa}", f"aime25={aime}", f"math500={math500}"]
    config.validate()
    return run_eval([str(checkpoint)], config)


def test_align_eval_sets_gives_one_table_across_sets(tmp_path):
    run_sets_eval(tmp_path, "tracking.report_to=[]")
    record = json.loads((tmp_path / "eval" / "eval.json").read_text())
    assert list(record["sets"]) == ["gpqa_diamond", "aime25", "math500"]
    assert {name: info["schema"] for name, info in record["sets"].items()} == {
        "gpqa_diamond": "gpqa", "aime25": "aime", "math500": "math"}
    assert [info["rows"] for info in record["sets"].values()] == [3, 4, 1]
    assert record["sets"]["aime25"]["settings"]["max_new_tokens"] == 12
    for name in record["sets"]:
        summary = record["results"][name]["tiny"]
        assert 0 <= summary["accuracy_think"] <= 1 and summary["accuracy_think_stderr"] is not None
        assert (tmp_path / "eval" / f"accuracy_vs_budget_{name}.png").is_file()
    report = (tmp_path / "eval" / "report.md").read_text()
    assert "| model | gpqa_diamond think | gpqa_diamond no-think | aime25 think" in report
    assert report.count("| tiny |") == 1


@pytest.mark.slow
def test_the_sets_table_and_its_records_reach_mlflow(tmp_path, monkeypatch):
    pytest.importorskip("mlflow")
    from mlflow.tracking import MlflowClient

    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    store = f"file:{tmp_path / 'mlruns'}"
    record = run_sets_eval(tmp_path, "tracking.report_to=[mlflow]", f"tracking.mlflow_tracking_uri={store}",
                           "tracking.project=sets")
    client = MlflowClient(tracking_uri=store)
    (run,) = client.search_runs([client.get_experiment_by_name("sets").experiment_id])
    logged = client.get_metric_history(run.info.run_id, "eval/aime25/tiny/accuracy_think")
    assert [m.value for m in logged] == [record["results"]["aime25"]["tiny"]["accuracy_think"]]
    artifacts = {artifact.path for artifact in client.list_artifacts(run.info.run_id)}
    assert {"eval.json", "report.md", "accuracy_vs_budget_gpqa_diamond.png"} <= artifacts


def test_a_missing_set_file_is_named_by_its_set_before_any_model_loads(tmp_path):
    from alignment.config import load_config
    from alignment.evaluate import run_eval

    config = load_config(EvalRunConfig, None, [f"output_dir={tmp_path / 'eval'}", "device=cpu"])
    config.sets = [f"gpqa_diamond={tmp_path / 'absent.csv'}"]
    with pytest.raises(FileNotFoundError, match=r"sets: gpqa_diamond: .*absent\.csv"):
        run_eval([str(tmp_path / "no-checkpoint")], config)
    assert not (tmp_path / "eval").exists()
