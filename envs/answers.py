"""Splitting a completion into its thinking and answer parts, and finding the final boxed answer or code block."""

from __future__ import annotations

import re

THINK_OPEN = "<think>"
THINK_CLOSE = "</think>"


def split_thinking(completion: str) -> tuple[str | None, str]:
    """Return (thinking, answer). `thinking` is None when the completion has no `</think>`.

    A completion generated after a `<think>\\n` prefill starts inside the trace, so the opening tag is optional.
    """
    if THINK_CLOSE not in completion:
        return None, completion
    thinking, answer = completion.split(THINK_CLOSE, 1)
    return thinking.replace(THINK_OPEN, "", 1), answer


def reasoning_is_on(reasoning: str | bool | None) -> bool | None:
    """A row's `reasoning` field ("on"/"off", a bool, or absent) as True/False/None."""
    if reasoning is None or isinstance(reasoning, bool):
        return reasoning
    if reasoning not in ("on", "off"):
        raise ValueError(f"reasoning must be 'on' or 'off', got {reasoning!r}")
    return reasoning == "on"


def answer_part(completion: str, reasoning: str | bool | None = None) -> str:
    """The text after the first `</think>`.

    With reasoning on, a completion that never closed its trace has no answer: a `\\boxed{}` draft inside an
    unfinished trace is not an answer, and grading it would pay a policy for skipping `</think>`. With reasoning
    off or unknown, a completion without `</think>` is all answer.
    """
    thinking, answer = split_thinking(completion)
    return "" if thinking is None and reasoning_is_on(reasoning) else answer


def extract_boxed(text: str) -> str | None:
    """Content of the last `\\boxed{...}` in `text`, with nested braces balanced; None when there is none."""
    start = text.rfind("\\boxed{")
    if start < 0:
        return None
    depth, i = 0, start + len("\\boxed")
    for j in range(i, len(text)):
        if text[j] == "{":
            depth += 1
        elif text[j] == "}":
            depth -= 1
            if depth == 0:
                return text[i + 1 : j]
    return None


_FENCE = re.compile(r"```[ \t]*([\w+-]*)[^\n]*\n(.*?)```", re.DOTALL)


def last_code_block(text: str, languages: tuple[str, ...] = ("python", "py", "python3", "")) -> str | None:
    """Content of the last fenced code block in `text` whose language tag is one of `languages` ("" = untagged)."""
    blocks = [body for lang, body in _FENCE.findall(text) if lang.lower() in languages]
    return blocks[-1] if blocks else None


def answers_match(predicted: str, reference: str) -> bool:
    """Exact match after trimming whitespace and a trailing period; numbers compare by value (`3.0` == `3`)."""
    a, b = predicted.strip().rstrip("."), reference.strip().rstrip(".")
    if a == b:
        return True
    try:
        return float(a) == float(b)
    except ValueError:
        return False
