"""Environments turn rows into prompts and grade completions; the synthetic code tasks are sound."""

from __future__ import annotations

import pytest

from envs.base import rewards_config
from envs.code_env import CodeEnv
from envs.code_tasks import FAMILIES, generate_code_tasks
from envs.instruction_env import InstructionEnv
from envs.math_env import MathEnv
from envs.sandbox import Sandbox
from rewards import RewardSpec, score_batch

ISOLATED, _, REASON = Sandbox()._check()
needs_isolation = pytest.mark.skipif(not ISOLATED, reason=f"sandbox isolation unavailable here: {REASON}")


def fenced(code: str) -> str:
    return f"Plan.\n</think>\n```python\n{code}```\n"


def test_math_env_prompt_and_reasoning_switch():
    env = MathEnv(system_prompt="You are a careful mathematician.")
    messages = env.prompt_messages({"problem": "What is 1/2 + 1/4?", "answer": "3/4", "reasoning": "off"})
    assert messages[0] == {"role": "system", "content": "You are a careful mathematician. /no_think"}
    assert messages[1]["role"] == "user" and messages[1]["content"].startswith("What is 1/2 + 1/4?")
    assert "\\boxed{}" in messages[1]["content"]
    # No reasoning field: no switch, and no empty system message.
    assert MathEnv().prompt_messages({"question": "2+2?"}) == [
        {"role": "user", "content": "2+2?\n\nPut the final answer in \\boxed{}."}
    ]
    with pytest.raises(KeyError, match="problem"):
        MathEnv().prompt_messages({"answer": "1"})


def test_math_env_grades_with_its_rewards():
    env = MathEnv(rewards=[RewardSpec("math", 1.0), RewardSpec("think_format", 0.5)])
    row = {"problem": "1/2 + 1/4?", "answer": "3/4", "reasoning": "on"}
    good = env.grade("Add them.\n</think>\nThe sum is \\boxed{0.75}.", row)
    assert good.scores == {"math": 1.0, "think_format": 1.0} and good.score == 1.5
    assert env.grade("\\boxed{0.7}", row).score == 0.0  # wrong and no trace


def test_instruction_env_describes_and_checks_constraints():
    env = InstructionEnv()
    row = {"prompt": "Describe Mamba.", "constraints": [{"type": "lowercase"}, {"type": "word_count", "max": 5}]}
    prompt = env.prompt_messages(row)[-1]["content"]
    assert prompt.startswith("Describe Mamba.") and "lowercase" in prompt and "at most 5 words" in prompt
    assert env.grade("\na state space model", row).score == 1.0
    assert env.grade("\nA State Space Model that scans", row).score == 0.0


def test_code_tasks_are_deterministic_under_a_seed():
    assert generate_code_tasks(20, seed=3) == generate_code_tasks(20, seed=3)
    assert generate_code_tasks(20, seed=3) != generate_code_tasks(20, seed=4)
    rows = generate_code_tasks(50, seed=0)
    assert {row["prompt"].split("`")[1].rsplit("_", 1)[0] for row in rows} == {f.name for f in FAMILIES}
    assert len({row["id"] for row in rows}) == 50
    assert all(row["task"] == "code" and len(row["tests"]) >= 3 for row in rows)


def test_prompt_comes_from_messages_in_the_row_schema():
    row = {"id": "math-1", "task": "math", "answer": "7", "messages": [
        {"role": "system", "content": "/no_think"},
        {"role": "user", "content": "3 + 4?"},
        {"role": "assistant", "content": "The result is \\boxed{7}.", "reasoning_content": ""},
    ]}
    assert MathEnv().prompt_messages(row) == row["messages"][:2]
    assert MathEnv(rewards=[RewardSpec("think_format")]).grade("\nThe result is \\boxed{7}.", row).score == 1.0


def test_reference_solutions_pass_their_own_tests_in_process():
    # The slow, obvious check of every family: exec the reference and the asserts here (trusted code).
    for row in generate_code_tasks(70, seed=1):
        namespace: dict = {}
        exec(row["solution"], namespace)
        for test in row["tests"]:
            exec(test, namespace)


@needs_isolation
def test_code_env_grades_reference_and_wrong_solutions_in_the_sandbox():
    env = CodeEnv()
    rows = generate_code_tasks(len(FAMILIES), seed=7)
    messages = env.prompt_messages(rows[0])
    assert [m["role"] for m in messages] == ["user"]  # the reference assistant turn is not part of the prompt
    assert rows[0]["prompt"] in messages[0]["content"] and "```python" in messages[0]["content"]
    assert env.prompt_messages({"prompt": rows[0]["prompt"]}) == messages  # same prompt from the bare fields
    right = env.grade_batch([fenced(row["solution"]) for row in rows], rows)
    assert [s.score for s in right] == [1.0] * len(rows)
    name = rows[0]["prompt"].split("`")[1].split("(")[0]
    wrong = env.grade(fenced(f"def {name}(*args):\n    return None\n"), rows[0])
    assert wrong.score == 0.0


@needs_isolation
def test_mixed_math_and_code_batch_routes_by_task():
    code_row = generate_code_tasks(1, seed=0)[0]
    math_row = {"id": "m1", "task": "math", "problem": "1+1?", "answer": "2"}
    config = rewards_config([MathEnv(), CodeEnv()], mode="inprocess")
    samples = score_batch(["\n\\boxed{2}", fenced(code_row["solution"])], [math_row, code_row], config)
    assert [list(s.scores) for s in samples] == [["math"], ["code_tests"]]
    assert [s.score for s in samples] == [1.0, 1.0]
    with pytest.raises(ValueError, match="no route"):
        score_batch(["x"], [{"task": "poetry"}], config)
