"""Built-in rewards that need no sandbox: math, think_format, think_budget, length, instruction, json_schema."""

from __future__ import annotations

import pytest

from rewards import get_reward
from rewards.instruction import describe_constraint
from rewards.thinking import reasoning_enabled


def score(name: str, completion: str, **row) -> float:
    result = get_reward(name).fn(completion, **row)
    return result.score


def on(answer: str, trace: str = "Let me work it out.") -> str:
    """A reasoning-on completion: the `<think>` is in the prefill."""
    return f"{trace}\n</think>\n{answer}"


@pytest.mark.parametrize(
    "reference, boxed",
    [
        ("\\frac{1}{2}", "0.5"),
        ("0.5", "\\dfrac{1}{2}"),
        ("1/2", "\\frac12"),
        ("3", "3.0"),
        ("[1, 3)", "[1,3)"),
        ("\\{1, 2, 3\\}", "\\{3,2,1\\}"),
        ("5", "5\\text{ cm}"),
        ("12", "12 \\mathrm{dollars}"),
        ("\\frac{\\sqrt{2}}{2}", "\\sqrt{2}/2"),
        ("x + 1", "1 + x"),
        ("1000", "1,000"),
    ],
)
def test_math_accepts_equivalent_forms(reference, boxed):
    assert score("math", on(f"So the answer is \\boxed{{{boxed}}}."), answer=reference) == 1.0


@pytest.mark.parametrize(
    "reference, boxed",
    [
        ("\\frac{1}{2}", "0.51"),
        ("\\frac{1}{3}", "0.33"),
        ("2", "-2"),
        ("(1, 3]", "[1,3)"),
        ("\\{1, 2\\}", "\\{1,2,3\\}"),
        ("x + 1", "x - 1"),
        ("12", "21"),
    ],
)
def test_math_rejects_near_misses(reference, boxed):
    assert score("math", on(f"\\boxed{{{boxed}}}"), answer=reference) == 0.0


def test_math_reads_only_the_final_boxed_of_the_answer_part():
    # A boxed value in the trace does not count; the last one of the answer does.
    assert score("math", on("\\boxed{7}", trace="maybe \\boxed{1/2}?"), answer="1/2") == 0.0
    assert score("math", on("first \\boxed{3}, corrected: \\boxed{\\frac{1}{2}}"), answer="0.5") == 1.0
    assert score("math", "\nThe answer is \\boxed{42}", answer="42") == 1.0  # reasoning off: no </think>
    result = get_reward("math").fn(on("The answer is 42."), answer="42")
    assert result.score == 0.0 and "no \\boxed" in result.info["reason"]


@pytest.mark.parametrize("reference", ["", None, "$$"])
def test_math_rejects_a_missing_reference(reference):
    with pytest.raises(ValueError, match="cannot be parsed"):
        get_reward("math").fn(on("\\boxed{1}"), answer=reference)


def test_reasoning_mode_from_row_field_or_messages():
    assert reasoning_enabled("off") is False and reasoning_enabled("on") is True
    assert reasoning_enabled(None, [{"role": "system", "content": "Be brief. /no_think"}]) is False
    # The last switch wins; no switch means on.
    assert reasoning_enabled(None, [{"role": "system", "content": "/no_think"}, {"role": "user", "content": "/think hi"}])
    assert reasoning_enabled(None, [{"role": "user", "content": "hi"}]) is True
    with pytest.raises(ValueError):
        reasoning_enabled("maybe")


@pytest.mark.parametrize(
    "completion, reasoning, expected",
    [
        ("Think.\n</think>\nAnswer.", "on", 1.0),
        ("<think>Think.\n</think>\nAnswer.", "on", 0.0),  # the opening tag belongs to the prefill
        ("Think and never stop", "on", 0.0),
        ("A.\n</think>\nB.\n</think>\nC.", "on", 0.0),
        ("\n</think>\nAnswer.", "on", 0.0),  # empty trace
        ("Think.\n</think>\n", "on", 0.0),  # empty answer
        ("\nAnswer.", "off", 1.0),
        ("Think.\n</think>\nAnswer.", "off", 0.0),
    ],
)
def test_think_format(completion, reasoning, expected):
    assert score("think_format", completion, reasoning=reasoning) == expected


def test_think_budget():
    trace = " ".join(["step"] * 100)
    assert score("think_budget", on("A", trace), thinking_budget=100) == 1.0
    assert score("think_budget", on("A", trace), thinking_budget=80) == pytest.approx(0.75)
    assert score("think_budget", on("A", trace), thinking_budget=40) == 0.0
    assert score("think_budget", trace, thinking_budget=200) == 1.0  # unclosed trace counts whole
    assert score("think_budget", on("A", "short"), thinking_budget=10, thinking_tokens=15) == pytest.approx(0.5)
    assert score("think_budget", on("A", trace)) == 1.0  # no budget in the row


def test_length_is_relative_to_the_group():
    fn = get_reward("length").fn
    completions = ["a b", "a b c d", "a b c d e f", "x", "x"]
    results = fn(completions, id=[1, 1, 1, 2, 2])
    assert [r.score for r in results] == [0.5, 0.0, -0.5, 0.0, 0.0]
    thinking = fn(["long long long\n</think>\nA", "t\n</think>\nB B B B"], part="thinking")
    assert [r.score for r in thinking] == [-0.5, 0.5]
    with pytest.raises(ValueError):
        fn(["a"], part="everything")


def test_length_by_correctness_pays_only_correct_answers_for_being_short():
    fn = get_reward("length").fn
    right, wrong = "\\boxed{4}", "\\boxed{5}"
    completions = [f"short\n</think>\n{wrong}", f"a b c\n</think>\n{right}", f"a b c d e f g h\n</think>\n{right}",
                   f"a b c d e f g h i j k l\n</think>\n{wrong}"]
    plain = [r.score for r in fn(completions, id=[1] * 4)]
    kimi = fn(completions, id=[1] * 4, by_correctness=True, answer=["4"] * 4, reasoning=["on"] * 4)
    assert plain[0] == 0.5 and plain[-1] == -0.5
    assert [r.score for r in kimi] == [0.0, plain[1], plain[2], -0.5]  # the short wrong one gets no bonus
    assert [r.info["correct"] for r in kimi] == [False, True, True, False]
    with pytest.raises(ValueError, match="answer"):
        fn(completions, by_correctness=True)


@pytest.mark.parametrize(
    "constraint, good, bad",
    [
        ({"type": "word_count", "min": 3, "max": 5}, "one two three four", "one two"),
        ({"type": "include", "words": ["Mamba"]}, "The mamba layer.", "The mambas layer."),
        ({"type": "exclude", "words": ["attention"]}, "No such word.", "Attention is all."),
        ({"type": "json"}, '```json\n{"a": 1}\n```', "{a: 1}"),
        ({"type": "bullet_list", "count": 2}, "- one\n- two", "- one\n- two\n- three"),
        ({"type": "lowercase"}, "all small", "Not all small"),
        ({"type": "ends_with", "text": "Done."}, "Work. Done.", "Done. Work."),
    ],
)
def test_instruction_constraints(constraint, good, bad):
    assert score("instruction", on(good), constraints=[constraint]) == 1.0
    assert score("instruction", on(bad), constraints=[constraint]) == 0.0
    assert describe_constraint(constraint)


def test_instruction_scores_the_fraction_or_all_or_nothing():
    constraints = [{"type": "lowercase"}, {"type": "include", "words": ["ssm"]}, {"type": "word_count", "max": 3}]
    result = get_reward("instruction").fn(on("an ssm layer here"), constraints=constraints)
    assert result.score == pytest.approx(2 / 3) and result.info["failed"] == [constraints[2]]
    assert score("instruction", on("an ssm layer here"), constraints=constraints, all_or_nothing=True) == 0.0
    assert score("instruction", on("ssm"), constraints='[{"type": "lowercase"}]') == 1.0  # JSON text column
    with pytest.raises(ValueError, match="unknown constraint"):
        score("instruction", on("x"), constraints=[{"type": "rhymes"}])


SCHEMA = {
    "type": "object",
    "properties": {"name": {"type": "string"}, "age": {"type": "integer", "minimum": 0}},
    "required": ["name", "age"],
    "additionalProperties": False,
}


def test_json_schema():
    assert score("json_schema", on('{"name": "Ada", "age": 36}'), schema=SCHEMA) == 1.0
    assert score("json_schema", on('Here:\n```json\n{"name": "Ada", "age": 36}\n```'), schema=SCHEMA) == 1.0
    wrong = get_reward("json_schema").fn(on('{"name": "Ada", "age": -1}'), schema=SCHEMA)
    assert wrong.score == 0.0 and wrong.info["reason"].startswith("age:")
    assert score("json_schema", on('{"name": "Ada", "age": 36, "x": 1}'), schema=SCHEMA) == 0.0
    assert score("json_schema", on("not json"), schema=SCHEMA) == 0.0
    assert score("json_schema", on('{"name": "Ada", "age": 36}'), schema='{"type": "object"}') == 1.0
