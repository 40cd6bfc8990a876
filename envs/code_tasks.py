"""A synthetic family of small code tasks for the tiny default: short Python functions with `assert` tests.

Each task asks for one function, gives a reference solution, and checks it with a few asserts whose expected
values come from a trusted Python expression (not from running the reference). The same `seed` gives the same tasks.

    rows = generate_code_tasks(100, seed=0)

Rows follow the project's row schema (`id`, `task`, `messages` ending with a reference assistant turn) and add
`prompt` (the task alone), `tests` (for the `code_tests` reward) and `solution` (the reference function).
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Any, Callable

from envs.code_env import CODE_INSTRUCTION

TESTS_PER_TASK = 4


@dataclass(frozen=True)
class _Family:
    """One kind of task. `make(rng)` returns (description, solution body, expected-value function, test inputs)."""

    name: str
    signature: str  # "def {name}(x):" without the name
    make: Callable[[random.Random], tuple[str, str, Callable[..., Any], list[tuple]]]


def _add_k(rng: random.Random):
    k = rng.randint(2, 9)
    inputs = [(rng.randint(-20, 20),) for _ in range(TESTS_PER_TASK)]
    return f"returns x plus {k}", f"return x + {k}", lambda x: x + k, inputs


def _scaled_sum(rng: random.Random):
    k = rng.randint(2, 5)
    inputs = [([rng.randint(-9, 9) for _ in range(rng.randint(0, 5))],) for _ in range(TESTS_PER_TASK)]
    return f"returns the sum of the list xs multiplied by {k}", f"return {k} * sum(xs)", lambda xs: k * sum(xs), inputs


def _count_char(rng: random.Random):
    c = rng.choice("abc")
    words = ["banana", "abacus", "cabbage", "", "ccc", "bead", "cab"]
    inputs = [(rng.choice(words),) for _ in range(TESTS_PER_TASK)]
    return f"returns how many times the letter {c!r} occurs in the string s", f"return s.count({c!r})", \
        lambda s: s.count(c), inputs


def _clamp(rng: random.Random):
    lo = rng.randint(-5, 0)
    hi = lo + rng.randint(3, 10)
    inputs = [(rng.randint(lo - 5, hi + 5),) for _ in range(TESTS_PER_TASK)]
    return f"returns x clamped to the range [{lo}, {hi}]", f"return min(max(x, {lo}), {hi})", \
        lambda x: min(max(x, lo), hi), inputs


def _fizz(rng: random.Random):
    d = rng.randint(3, 7)
    inputs = [(rng.randint(1, 50),) for _ in range(TESTS_PER_TASK - 1)] + [(d * rng.randint(1, 5),)]
    return f"returns 'Fizz' when x is divisible by {d}, otherwise str(x)", \
        f"return 'Fizz' if x % {d} == 0 else str(x)", lambda x: "Fizz" if x % d == 0 else str(x), inputs


def _power_sum(rng: random.Random):
    p = rng.randint(1, 3)
    inputs = [(rng.randint(0, 10),) for _ in range(TESTS_PER_TASK)]
    return f"returns the sum of i**{p} for i from 1 to n inclusive", f"return sum(i ** {p} for i in range(1, n + 1))", \
        lambda n: sum(i**p for i in range(1, n + 1)), inputs


def _reverse_words(rng: random.Random):
    sentences = ["a b c", "hello world", "one", "", "mamba and attention layers"]
    sep = rng.choice([" ", "-"])
    inputs = [(rng.choice(sentences),) for _ in range(TESTS_PER_TASK)]
    return f"returns the words of s (split on spaces) in reverse order, joined by {sep!r}", \
        f"return {sep!r}.join(reversed(s.split()))", lambda s: sep.join(reversed(s.split())), inputs


FAMILIES = [
    _Family("add_k", "(x)", _add_k),
    _Family("scaled_sum", "(xs)", _scaled_sum),
    _Family("count_char", "(s)", _count_char),
    _Family("clamp", "(x)", _clamp),
    _Family("fizz", "(x)", _fizz),
    _Family("power_sum", "(n)", _power_sum),
    _Family("reverse_words", "(s)", _reverse_words),
]


def generate_code_tasks(n: int, seed: int = 0) -> list[dict[str, Any]]:
    """`n` task rows, the same for the same seed. Function names carry the index so tasks differ in name too."""
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        family = FAMILIES[rng.randrange(len(FAMILIES))]
        description, body, expected, inputs = family.make(rng)
        name = f"{family.name}_{i}"
        tests = [f"assert {name}({', '.join(map(repr, args))}) == {expected(*args)!r}" for args in inputs]
        prompt = f"Write a Python function `{name}{family.signature}` that {description}."
        solution = f"def {name}{family.signature}:\n    {body}\n"
        rows.append({
            "id": f"code-{seed}-{i}",
            "task": "code",
            "messages": [
                {"role": "user", "content": f"{prompt}\n\n{CODE_INSTRUCTION}"},
                {"role": "assistant", "content": f"```python\n{solution}```", "reasoning_content": ""},
            ],
            "prompt": prompt,
            "tests": tests,
            "solution": solution,
        })
    return rows
