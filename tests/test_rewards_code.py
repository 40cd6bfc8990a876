"""`code_tests`: real programs from completions run against the row's tests in the sandbox."""

from __future__ import annotations

import pytest

from envs.sandbox import Sandbox
from rewards import get_reward

ISOLATED, _, REASON = Sandbox()._check()
pytestmark = pytest.mark.skipif(not ISOLATED, reason=f"sandbox isolation unavailable here: {REASON}")

TESTS = ["assert double(2) == 4", "assert double(-3) == -6", "assert double(0) == 0"]


def completion(program: str) -> str:
    return f"I will double it.\n</think>\nHere is the code:\n```python\n{program}\n```\n"


def code_tests(text: str, **row):
    return get_reward("code_tests").fn(text, **row)


def test_correct_solution_passes_and_wrong_one_fails():
    right = code_tests(completion("def double(x):\n    return 2 * x"), tests=TESTS)
    assert right.score == 1.0 and right.info["passed"] == 3 and right.info["isolated"]
    wrong = code_tests(completion("def double(x):\n    return x + 2"), tests=TESTS)
    assert wrong.score == pytest.approx(1 / 3)  # only double(2) == 4 holds
    assert "AssertionError" in wrong.info["failures"][0]
    assert code_tests(completion("def double(x):\n    return x + 2"), tests=TESTS, all_or_nothing=True).score == 0.0


def test_uses_the_last_python_block_of_the_answer():
    text = "```python\ndef double(x):\n    return 2 * x\n```\n</think>\n```python\ndef double(x):\n    return x\n```"
    assert code_tests(text, tests=TESTS).score == pytest.approx(1 / 3)  # the trace's block is ignored
    assert code_tests("</think>\nNo code, sorry.", tests=TESTS).info["reason"].startswith("no ```python")


def test_stdin_stdout_pairs():
    program = "a, b = map(int, input().split())\nprint(a + b)"
    tests = [{"input": "1 2\n", "output": "3\n"}, {"input": "5 5", "output": "10"}, {"input": "2 2", "output": "5"}]
    result = code_tests(completion(program), tests=tests)
    assert result.score == pytest.approx(2 / 3) and result.info["passed"] == 2


def test_a_hanging_test_fails_alone_and_a_crashing_program_fails_all():
    tests = TESTS + ["while True:\n    pass"]
    result = code_tests(completion("def double(x):\n    return 2 * x"), tests=tests, per_test_s=0.5)
    assert result.info["passed"] == 3 and "TimeoutError" in result.info["failures"][0]
    crash = code_tests(completion("import os\nos._exit(0)"), tests=TESTS)
    assert crash.score == 0.0 and crash.info["passed"] == 0


def test_tests_are_capped_and_may_come_as_json_text():
    many = ["assert double(1) == 2"] * 10 + ["assert False"]
    result = code_tests(completion("def double(x):\n    return 2 * x"), tests=many, max_tests=10)
    assert result.score == 1.0 and result.info["total"] == 10
    as_text = code_tests(completion("def double(x):\n    return 2 * x"), tests='["assert double(4) == 8"]')
    assert as_text.score == 1.0


def test_program_cannot_read_the_tests():
    # A program that would pass only if it could find the tests in its stdin, its stdin file or its source.
    program = (
        "import sys\n"
        "seen = sys.stdin.read() + open('/proc/self/fd/0').read() + open('main.py').read()\n"
        "if 'double(2) == 4' in seen:\n"
        "    def double(x):\n        return 2 * x\n"
        "else:\n"
        "    def double(x):\n        return 0\n"
    )
    result = code_tests(completion(program), tests=TESTS)
    assert result.score == pytest.approx(1 / 3)  # only double(0) == 0
