"""A reasoning-on completion that never wrote `</think>` has no answer: no reward pays for skipping the close."""

import pytest
import torch

from alignment.advantages import group_advantages
from alignment.evaluate import judge
from envs.answers import answer_part
from rewards import get_reward

UNCLOSED = "5+3=8\nThe result is \\boxed{8}."  # then EOS, no `</think>`
CLOSED = "5+3=8\n</think>\nThe result is \\boxed{8}."


def score(name: str, completion: str, **row) -> float:
    reward = get_reward(name)
    return reward.fn(completion, **reward.select_kwargs(row)).score


def test_answer_part_of_an_unclosed_trace_is_empty_only_with_reasoning_on():
    assert answer_part(UNCLOSED, "on") == "" and answer_part(UNCLOSED, True) == ""
    assert answer_part(UNCLOSED, "off") == UNCLOSED and answer_part(UNCLOSED) == UNCLOSED
    assert answer_part(CLOSED, "on") == "\nThe result is \\boxed{8}."
    with pytest.raises(ValueError, match="'on' or 'off'"):
        answer_part(UNCLOSED, "maybe")


def test_math_scores_the_unclosed_completion_zero_with_reasoning_on():
    assert score("math", UNCLOSED, answer="8", reasoning="on") == 0.0
    assert score("math", CLOSED, answer="8", reasoning="on") == 1.0
    assert score("math", UNCLOSED, answer="8", reasoning="off") == 1.0  # reasoning off: all of it is the answer


def test_every_answer_reading_builtin_ignores_an_unclosed_trace():
    assert score("json_schema", '{"a": 1}', schema={"type": "object"}, reasoning="on") == 0.0
    assert score("json_schema", '</think>{"a": 1}', schema={"type": "object"}, reasoning="on") == 1.0
    lowercase = [{"type": "lowercase"}]
    assert score("instruction", "all lowercase", constraints=lowercase, reasoning="on") == 0.0
    assert score("instruction", "</think>all lowercase", constraints=lowercase, reasoning="on") == 1.0
    program = "```python\ndef f():\n    return 1\n```"
    assert score("code_tests", program, tests=["assert f() == 1"], reasoning="on") == 0.0


def test_in_a_group_where_only_the_unclosed_sample_is_correct_it_gets_no_positive_advantage():
    completions = [UNCLOSED, "5+3=9\n</think>\n\\boxed{9}", "5+3=7\n</think>\n\\boxed{7}", "</think>\n\\boxed{1}"]
    rewards = torch.tensor([[score("math", c, answer="8", reasoning="on") for c in completions]])
    advantages = group_advantages(rewards, std_normalize=True, leave_one_out=True)
    assert rewards.tolist() == [[0.0, 0.0, 0.0, 0.0]] and advantages[0, 0] <= 0


def test_the_evaluator_finds_no_answer_in_an_unclosed_trace():
    assert judge(UNCLOSED, True, True, 10, 64)["boxed"] is None
    assert judge(CLOSED, True, True, 10, 64)["boxed"] == "8"
    assert judge(UNCLOSED, False, True, 10, 64)["boxed"] == "8"
