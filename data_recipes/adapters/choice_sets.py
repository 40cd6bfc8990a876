"""Multiple-choice sets, graded by the letter of the option a completion picks.

- `gpqa` (GPQA, GPQA-Diamond as released): `Question`, `Correct Answer`, `Incorrect Answer 1` .. `3`, `Record ID`.
  The four options are shuffled per record, by a generator seeded with the record's id, so a row's letters are the
  same on every machine and every run, and the correct one is not always (A).

Every row is `task: "multiple_choice"` with `answer` the correct letter and `metadata.choices` the letter -> option
text map; the user turn lists the options as "(A) ..." lines and asks for the letter in `\\boxed{}`. The evaluation
grades it with `envs.answers.choice_letter` (a boxed letter, a boxed option text, or an "answer is (C)" phrase).
"""

from __future__ import annotations

import hashlib
import random
from typing import Any

from data_recipes.adapters.base import (
    RecordError, adapt, assistant_turn, record_id, register_schema, text_field, with_switch,
)  # fmt: skip

MULTIPLE_CHOICE = "multiple_choice"
CHOICE_INSTRUCTION = "Answer with the letter of the correct option in \\boxed{}."
LETTERS = "ABCD"


def choice_row(schema: str, record: dict[str, Any], index: int, question: str, correct: str,
               incorrect: list[str], row_id: str) -> dict[str, Any]:
    options = [correct.strip(), *(option.strip() for option in incorrect)]
    if any(not option for option in options):
        raise RecordError("an option is empty")
    if len(set(options)) != len(options):
        raise RecordError("two options have the same text")
    seed = int(hashlib.sha256(row_id.encode()).hexdigest()[:16], 16)
    order = list(range(len(options)))
    random.Random(seed).shuffle(order)
    choices = {LETTERS[slot]: options[i] for slot, i in enumerate(order)}
    answer = LETTERS[order.index(0)]
    listed = "\n".join(f"({letter}) {text}" for letter, text in choices.items())
    prompt = f"{question.strip()}\n\n{listed}\n\n{CHOICE_INSTRUCTION}"
    return {
        "id": row_id,
        "task": MULTIPLE_CHOICE,
        "messages": with_switch([{"role": "user", "content": prompt}], False)
        + [assistant_turn(f"The answer is \\boxed{{{answer}}}.", "")],
        "answer": answer,
        "problem": question.strip(),
        "metadata": {"source": schema, "index": index, "reasoning": "off", "choices": choices},
    }


@register_schema("gpqa")
def gpqa_row(record: dict[str, Any], index: int) -> dict[str, Any]:
    question = text_field(record, "Question")
    correct = text_field(record, "Correct Answer")
    incorrect = [text_field(record, f"Incorrect Answer {n}") for n in (1, 2, 3)]
    return choice_row("gpqa", record, index, question, correct, incorrect, record_id("gpqa", record, index, "Record ID"))


def rows_from_gpqa(records, **options) -> list[dict[str, Any]]:
    """Rows from GPQA records (`Question`, `Correct Answer`, `Incorrect Answer 1..3`)."""
    return adapt(records, "gpqa", **options)[0]
