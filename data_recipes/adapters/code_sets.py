"""Code sets with tests, as `task: "code"` rows for the `code_tests` reward.

- `mbpp`: `text` (the task), `code` (reference), `test_list` (assert statements), optional `test_setup_code`.
- `humaneval`: `prompt` (signature + docstring), `canonical_solution` (the body), `test` (defines
  `check(candidate)`), `entry_point`.
- `livecodebench`: `question_content`, optional `starter_code`, `public_test_cases` (a list, or the JSON text of
  a list, of `{"input", "output", "testtype"}`); only stdin/stdout tests are taken (call-based LeetCode tests need
  a harness per problem). Private tests are not read: the public release stores them pickled, and unpickling
  downloaded data runs arbitrary code.

Rows follow `envs/code_tasks.py`: `prompt` (the task alone), `tests` (assert statements or `{"input", "output"}`
pairs), `solution` when the set has a reference. With a reference the row ends with the assistant turn (a python
block, reasoning off: these sets have no traces, and an empty trace with reasoning on would teach the model to
close its thinking at once); without one (LiveCodeBench) the row is a prompt for RL or evaluation.
"""

from __future__ import annotations

import json
from typing import Any

from data_recipes.adapters.base import RecordError, adapt, assistant_turn, record_id, register_schema, text_field

# Kept equal to `envs.code_env.CODE_INSTRUCTION`; not imported, so data recipes do not pull in the reward stack.
CODE_INSTRUCTION = "Write your solution as a single ```python code block."
STDIO_INSTRUCTION = "Read the input from standard input and write the answer to standard output."


def _clean_code(code: str) -> str:
    return code.replace("\r\n", "\n").strip("\n") + "\n"


def code_row(
    schema: str, record: dict[str, Any], index: int, prompt: str, tests: list[Any], solution: str | None,
    extra: dict[str, Any] | None = None,
) -> dict[str, Any]:
    if not tests:
        raise RecordError("no usable tests")
    messages: list[dict[str, Any]] = [
        {"role": "system", "content": "/no_think"},
        {"role": "user", "content": f"{prompt.strip()}\n\n{CODE_INSTRUCTION}"},
    ]
    if solution is not None:
        messages.append(assistant_turn(f"```python\n{solution}```", ""))
    row = {
        "id": record_id(schema, record, index, "task_id", "question_id", "id"),
        "task": "code",
        "messages": messages,
        "prompt": prompt.strip(),
        "tests": tests,
        "metadata": {"source": schema, "index": index, "reasoning": "off", **(extra or {})},
    }
    if solution is not None:
        row["solution"] = solution
    return row


@register_schema("mbpp")
def mbpp_row(record: dict[str, Any], index: int) -> dict[str, Any]:
    text = text_field(record, "text")
    code = _clean_code(text_field(record, "code"))
    tests = record.get("test_list")
    if not isinstance(tests, list) or not tests or not all(isinstance(t, str) and t.strip() for t in tests):
        raise RecordError("`test_list` must be a non-empty list of test statements")
    setup = record.get("test_setup_code") or ""
    if not isinstance(setup, str):
        raise RecordError("`test_setup_code` is not a string")
    # Setup goes in front of every test so that each test still passes or fails on its own.
    statements = [f"{setup.strip()}\n{t.strip()}" if setup.strip() else t.strip() for t in tests]
    # As in the MBPP paper's prompt, the first test shows the function name and signature the tests call.
    prompt = f"{text.strip()}\nYour code should pass this test:\n{tests[0].strip()}"
    return code_row("mbpp", record, index, prompt, statements, code)


@register_schema("humaneval")
def humaneval_row(record: dict[str, Any], index: int) -> dict[str, Any]:
    stub = text_field(record, "prompt")
    body = text_field(record, "canonical_solution")
    test = text_field(record, "test")
    entry = text_field(record, "entry_point").strip()
    if not entry.isidentifier():
        raise RecordError(f"`entry_point` {entry!r} is not a function name")
    if "def check(" not in test:
        raise RecordError("`test` does not define check(candidate)")
    # One statement: `check` holds all asserts and sometimes support code, so splitting it would be guesswork.
    statement = f"{test.strip()}\n\ncheck({entry})\n"
    prompt = f"Complete the following Python function.\n```python\n{_clean_code(stub)}```"
    return code_row("humaneval", record, index, prompt, [statement], _clean_code(stub + body))


@register_schema("livecodebench")
def livecodebench_row(record: dict[str, Any], index: int) -> dict[str, Any]:
    question = text_field(record, "question_content")
    cases = record.get("public_test_cases")
    if isinstance(cases, str):
        try:
            cases = json.loads(cases)
        except json.JSONDecodeError as exc:
            raise RecordError(f"`public_test_cases` is not valid JSON ({exc.msg})") from None
    if not isinstance(cases, list) or not cases:
        raise RecordError("`public_test_cases` must be a non-empty list")
    tests = []
    for i, case in enumerate(cases):
        if not isinstance(case, dict) or not all(isinstance(case.get(k), str) for k in ("input", "output")):
            raise RecordError(f"public_test_cases[{i}] needs string `input` and `output`")
        if case.get("testtype", "stdin") != "stdin":
            raise RecordError(f"public_test_cases[{i}] is a {case['testtype']!r} test; only stdin/stdout is supported")
        tests.append({"input": case["input"], "output": case["output"]})
    starter = record.get("starter_code") or ""
    prompt = question.strip() + (f"\n\nStart from:\n```python\n{_clean_code(starter)}```" if starter.strip() else "")
    prompt += f"\n\n{STDIO_INSTRUCTION}"
    extra = {k: record[k] for k in ("platform", "difficulty", "contest_date", "question_title")
             if isinstance(record.get(k), str)}
    return code_row("livecodebench", record, index, prompt, tests, None, extra)


def rows_from_mbpp(records, **options) -> list[dict[str, Any]]:
    """Rows from MBPP records (`text`, `code`, `test_list`)."""
    return adapt(records, "mbpp", **options)[0]


def rows_from_humaneval(records, **options) -> list[dict[str, Any]]:
    """Rows from HumanEval records (`prompt`, `canonical_solution`, `test`, `entry_point`)."""
    return adapt(records, "humaneval", **options)[0]


def rows_from_livecodebench(records, **options) -> list[dict[str, Any]]:
    """Prompt rows from LiveCodeBench-style records (`question_content`, stdin/stdout `public_test_cases`)."""
    return adapt(records, "livecodebench", **options)[0]
