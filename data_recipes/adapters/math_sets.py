"""Math sets with a problem, a worked solution and a final answer.

- `gsm8k`: `question`, `answer` = worked steps (with `<<48/2=24>>` calculator notes) then `#### 72`.
- `math` (MATH / competition math, MATH-500): `problem`, `solution` with the final answer in `\\boxed{}`; an
  explicit `answer` field wins over the boxed one when present.
- `aime` (AIME 2024 / 2025 as released, and other problem/answer sets): `problem`, `answer` (an integer for AIME),
  no solution: a reasoning-off row whose answer turn states the boxed answer.
- `openmathreasoning`: `problem`, `generated_solution` (a `<think>` trace, then the written solution),
  `expected_answer`.

Every row is `task: "math"` with `answer` (what the `math` reward compares against the completion's last `\\boxed{}`)
and the problem in `problem` too. The user turn is the problem plus the same boxed-answer instruction the math
environment writes, so SFT rows and RL prompts read alike. A worked solution becomes the trace and the answer turn
states the boxed result; a solution without a trace (OpenMathReasoning without `<think>`) is a reasoning-off row.
"""

from __future__ import annotations

import re
from typing import Any

from data_recipes.adapters.base import (
    RecordError,
    adapt,
    assistant_turn,
    last_boxed,
    record_id,
    register_schema,
    split_think,
    text_field,
    with_switch,
)
from data_recipes.synthetic_math import answer_text

# Kept equal to `envs.math_env.MATH_INSTRUCTION`; not imported, so data recipes do not pull in the reward stack.
MATH_INSTRUCTION = "Put the final answer in \\boxed{}."
_CALCULATOR_NOTE = re.compile(r"<<[^<>]*>>")
_GSM8K_FINAL = re.compile(r"\n?####\s*(.+?)\s*$", re.DOTALL)


def math_row(
    schema: str, record: dict[str, Any], index: int, problem: str, trace: str, answer_turn: str, answer: str,
    extra: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """A math row; reasoning is on exactly when there is a trace."""
    answer = answer.strip()
    if not answer:
        raise RecordError("the reference answer is empty")
    reasoning_on = bool(trace.strip())
    messages = with_switch([{"role": "user", "content": f"{problem.strip()}\n\n{MATH_INSTRUCTION}"}], reasoning_on)
    metadata = {"source": schema, "index": index, "reasoning": "on" if reasoning_on else "off", **(extra or {})}
    return {
        "id": record_id(schema, record, index, "id", "unique_id"),
        "task": "math",
        "messages": messages + [assistant_turn(answer_turn, trace)],
        "answer": answer,
        "problem": problem.strip(),
        "metadata": metadata,
    }


@register_schema("gsm8k")
def gsm8k_row(record: dict[str, Any], index: int) -> dict[str, Any]:
    question = text_field(record, "question")
    solution = text_field(record, "answer")
    final = _GSM8K_FINAL.search(solution)
    if final is None:
        raise RecordError("`answer` has no `#### <final answer>` line")
    answer = final.group(1).replace(",", "").strip()  # "1,200" -> "1200": the reward compares numbers as text first
    steps = _CALCULATOR_NOTE.sub("", solution[: final.start()])
    return math_row("gsm8k", record, index, question, steps, answer_text(answer), answer)


@register_schema("math")
def competition_math_row(record: dict[str, Any], index: int) -> dict[str, Any]:
    problem = text_field(record, "problem")
    solution = text_field(record, "solution")
    explicit = record.get("answer")
    answer = explicit if isinstance(explicit, str) and explicit.strip() else last_boxed(solution)
    if not answer:
        raise RecordError("`solution` has no \\boxed{} answer and there is no `answer` field")
    extra = {k: record[k] for k in ("level", "type", "subject") if isinstance(record.get(k), (str, int))}
    return math_row("math", record, index, problem, solution, answer_text(answer), answer, extra)


@register_schema("aime")
def aime_row(record: dict[str, Any], index: int) -> dict[str, Any]:
    problem = text_field(record, "problem")
    answer = record.get("answer")
    if not isinstance(answer, (str, int, float)) or not str(answer).strip():
        raise RecordError("`answer` is missing")
    return math_row("aime", record, index, problem, "", answer_text(str(answer)), str(answer))


@register_schema("openmathreasoning")
def openmathreasoning_row(record: dict[str, Any], index: int) -> dict[str, Any]:
    problem = text_field(record, "problem")
    trace, written = split_think(text_field(record, "generated_solution"))
    expected = record.get("expected_answer")
    if not isinstance(expected, (str, int, float)) or not str(expected).strip():
        raise RecordError("`expected_answer` is missing")
    extra = {k: record[k] for k in ("problem_type", "problem_source", "inference_mode", "generation_model")
             if isinstance(record.get(k), str)}
    return math_row("openmathreasoning", record, index, problem, trace or "", written, str(expected), extra)


def rows_from_gsm8k(records, **options) -> list[dict[str, Any]]:
    """Rows from GSM8K records (`question`, `answer` ending in `#### N`)."""
    return adapt(records, "gsm8k", **options)[0]


def rows_from_math(records, **options) -> list[dict[str, Any]]:
    """Rows from MATH / competition-math records (`problem`, `solution` with `\\boxed{}`)."""
    return adapt(records, "math", **options)[0]


def rows_from_openmathreasoning(records, **options) -> list[dict[str, Any]]:
    """Rows from OpenMathReasoning records (`problem`, `generated_solution`, `expected_answer`)."""
    return adapt(records, "openmathreasoning", **options)[0]


def rows_from_aime(records, **options) -> list[dict[str, Any]]:
    """Rows from problem/answer records (AIME: `problem`, `answer`)."""
    return adapt(records, "aime", **options)[0]
