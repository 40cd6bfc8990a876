"""`length`: a length penalty relative to the other completions of the same prompt (a GRPO group)."""

from __future__ import annotations

from typing import Any

from envs.answers import split_thinking
from rewards.math_answer import math_answer
from rewards.registry import RewardResult, reward
from rewards.thinking import approx_tokens

PARTS = ("all", "thinking", "answer")


@reward("length", batched=True)
def length(completions: list[str], part: str = "all", id: list[Any] | None = None, by_correctness: bool = False,
           answer: list[Any] | None = None, reasoning: list[Any] | None = None, **_: Any) -> list[RewardResult]:
    """0.5 for the shortest completion of its group, -0.5 for the longest, linear between (0 when all are equal).

    A group is the completions whose rows share an `id` (GRPO repeats a row once per generation); without ids the
    whole batch is one group. `part` picks what is measured: "all", "thinking" or "answer" (config `args`).

    `by_correctness` (Kimi k1.5's length penalty): a completion whose answer is wrong by the `math` reward (against
    the row's `answer`) gets at most 0, so only correct ones are paid for being short and a short wrong answer is
    never preferred to a long right one.
    """
    if part not in PARTS:
        raise ValueError(f"part must be one of {PARTS}, got {part!r}")
    if by_correctness and answer is None:
        raise ValueError("by_correctness needs the rows' `answer`")
    sizes = [approx_tokens(_part(c, part)) for c in completions]
    results: list[RewardResult] = [RewardResult(0.0)] * len(completions)
    for members in prompt_groups(id, len(completions)):
        shortest, longest = min(sizes[i] for i in members), max(sizes[i] for i in members)
        for i in members:
            score = 0.0 if longest == shortest else 0.5 - (sizes[i] - shortest) / (longest - shortest)
            info = {"tokens": sizes[i], "group_min": shortest, "group_max": longest}
            if by_correctness:
                correct = math_answer(completions[i], answer[i], reasoning[i] if reasoning else None).score == 1.0
                score, info["correct"] = (score if correct else min(0.0, score)), correct
            results[i] = RewardResult(score, info)
    return results


def prompt_groups(ids: list[Any] | None, n: int) -> list[list[int]]:
    """The indices of the completions of each prompt: those whose rows share an `id` (the whole batch without ids)."""
    groups: dict[str, list[int]] = {}
    for i, key in enumerate(ids if ids is not None else [None] * n):
        groups.setdefault(repr(key), []).append(i)
    return list(groups.values())


def _part(completion: str, part: str) -> str:
    thinking, answer = split_thinking(completion)
    if part == "thinking":
        return thinking or ""
    return answer if part == "answer" else completion
