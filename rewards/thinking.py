"""`think_format` and `think_budget`: the shape and the length of the thinking trace.

Completions start right after the assistant prefill. Reasoning on: the prefill ends with `<think>\\n`, so a
well-formed completion is `<trace>\\n</think>\\n<answer>`. Reasoning off: the prefill holds an empty `<think></think>`,
so the completion is just the answer, with no think tags.
"""

from __future__ import annotations

import re
from typing import Any

from envs.answers import THINK_CLOSE, THINK_OPEN, split_thinking
from rewards.registry import RewardResult, reward

_SWITCH = re.compile(r"/(no_think|think)\b")
_TOKEN = re.compile(r"\w+|[^\w\s]")


def reasoning_enabled(reasoning: Any = None, messages: list[dict] | None = None) -> bool:
    """Whether a row asks for reasoning.

    The row's `reasoning` field decides when present ("on"/"off", or a bool). Otherwise the last `/think` or
    `/no_think` in its system or user messages wins; with neither, reasoning is on (the chat template's default).
    """
    if reasoning is not None:
        if isinstance(reasoning, bool):
            return reasoning
        if str(reasoning).lower() in ("on", "off"):
            return str(reasoning).lower() == "on"
        raise ValueError(f"reasoning must be 'on', 'off' or a bool, got {reasoning!r}")
    enabled = True
    for message in messages or []:
        if message.get("role") in ("system", "user"):
            for switch in _SWITCH.findall(str(message.get("content", ""))):
                enabled = switch == "think"
    return enabled


def approx_tokens(text: str) -> int:
    """Rough token count without a tokenizer: words and punctuation marks. Rows may carry exact counts instead."""
    return len(_TOKEN.findall(text))


@reward("think_format")
def think_format(completion: str, reasoning: Any = None, messages: list[dict] | None = None) -> RewardResult:
    """1 when the think block suits the row's reasoning mode (one closed, non-empty trace, or none), else 0."""
    enabled = reasoning_enabled(reasoning, messages)
    thinking, answer = split_thinking(completion)
    problems = []
    if enabled:
        closes = completion.count(THINK_CLOSE)
        if closes != 1:
            problems.append(f"expected one {THINK_CLOSE}, found {closes}")
        if THINK_OPEN in completion:
            problems.append(f"{THINK_OPEN} in the completion (it belongs to the prefill)")
        if thinking is not None and not thinking.strip():
            problems.append("empty thinking trace")
    elif THINK_OPEN in completion or THINK_CLOSE in completion:
        problems.append("think tags with reasoning off")
    if not answer.strip():
        problems.append("empty answer")
    return RewardResult(float(not problems), {"reasoning": "on" if enabled else "off", "problems": problems})


@reward("think_budget")
def think_budget(
    completion: str,
    thinking_budget: int | None = None,
    thinking_tokens: int | None = None,
) -> RewardResult:
    """1 when the trace fits the row's `thinking_budget` (tokens); falls linearly to 0 at twice the budget.

    The trace is the text before `</think>`, or the whole completion when the trace was never closed. Its length is
    the row's `thinking_tokens` when the generator recorded it, else `approx_tokens`.
    """
    if thinking_budget is None:
        return RewardResult(1.0, {"reason": "no thinking_budget in the row"})
    thinking, _ = split_thinking(completion)
    trace = completion if thinking is None else thinking
    used = thinking_tokens if thinking_tokens is not None else approx_tokens(trace)
    over = max(0, used - thinking_budget)
    score = max(0.0, 1.0 - over / max(thinking_budget, 1))
    return RewardResult(score, {"thinking_tokens": used, "budget": thinking_budget, "closed": thinking is not None})
