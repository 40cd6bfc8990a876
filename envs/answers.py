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


_TEXT_MACRO = re.compile(r"\\(?:text|textbf|mathrm|mathbf)\{([^{}]*)\}")
_ANSWER_PHRASE = re.compile(  # "answer: C", "the answer is (C)", "answer is **C**", "Answer - C)"
    r"answer(?:\s+is)?\s*[:\-]?\s*[(\[*]*\s*([A-Za-z])\s*[)\]*]*(?![\w'])", re.IGNORECASE)

_ANOTHER_LETTER = re.compile(r"\s*(?:,|/|&|and|or)\s*[(\[]?[A-Z](?![\w'])")


def _plain(text: str) -> str:
    return " ".join(_TEXT_MACRO.sub(r"\1", text).replace("$", "").split()).strip(" .").lower()


def choice_letter(text: str, choices: dict[str, str]) -> str | None:
    """The option a multiple-choice answer picks (a key of `choices`, e.g. "C"), or None when it picks none or several.

    The last `\\boxed{}` decides when there is one: a letter, alone or in brackets or `\\text{}` ("(C)"), or
    followed by its option ("C) 42"), or exactly the text of one option ("42"). Anything else boxed picks nothing,
    whatever the prose says. Without a box, the last "answer is (C)" / "Answer: C" phrase, its letter one of the
    options. A bare letter elsewhere ("A careful look ...") is never an answer.
    """
    letters = {letter.upper() for letter in choices}
    boxed = extract_boxed(text)
    if boxed is not None:
        inner = _TEXT_MACRO.sub(r"\1", boxed).strip().strip("$").strip()
        alone = re.fullmatch(r"[(\[]?\s*([A-Za-z])\s*[)\]]?\.?", inner)
        if alone:
            return alone.group(1).upper() if alone.group(1).upper() in letters else None
        lead = re.match(r"[(\[]?([A-Z])[)\].:]\s+(.+)", inner)
        if lead and lead.group(1) in letters and _plain(lead.group(2)) == _plain(choices[lead.group(1)]):
            return lead.group(1)
        named = [letter for letter, option in choices.items() if _plain(option) == _plain(inner)]
        return named[0].upper() if len(named) == 1 else None
    phrases = list(_ANSWER_PHRASE.finditer(text))
    if not phrases:
        return None
    last = phrases[-1]
    if _ANOTHER_LETTER.match(text, last.end()):  # "answer: A and B" picks two
        return None
    return last.group(1).upper() if last.group(1).upper() in letters else None


def answers_match(predicted: str, reference: str) -> bool:
    """Exact match after trimming whitespace and a trailing period; numbers compare by value (`3.0` == `3`)."""
    a, b = predicted.strip().rstrip("."), reference.strip().rstrip(".")
    if a == b:
        return True
    try:
        return float(a) == float(b)
    except ValueError:
        return False
