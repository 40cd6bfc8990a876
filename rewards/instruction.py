"""`instruction`: IFEval-style constraints checked by rules on the answer part of a completion.

A row's `constraints` is a list (or its JSON text) of objects such as:
    {"type": "word_count", "min": 20, "max": 80}
    {"type": "include", "words": ["Mamba"]}          # each word must appear (case-insensitive)
    {"type": "exclude", "words": ["transformer"]}    # none may appear
    {"type": "json"}                                 # the answer is a JSON document (a ```json fence is allowed)
    {"type": "bullet_list", "count": 3}              # lines starting "- " or "* "; `count` optional
    {"type": "lowercase"}
    {"type": "ends_with", "text": "Is there anything else?"}
"""

from __future__ import annotations

import json
import re
from typing import Any, Callable

from envs.answers import answer_part
from rewards.registry import RewardResult, reward

_BULLET = re.compile(r"^\s*[-*]\s+\S", re.MULTILINE)
_JSON_FENCE = re.compile(r"```(?:json)?\s*\n(.*?)```", re.DOTALL)


def _word_count(text: str, c: dict) -> bool:
    n = len(text.split())
    return c.get("min", 0) <= n <= c.get("max", float("inf"))


def _contains_word(text: str, word: str) -> bool:
    return re.search(rf"(?<!\w){re.escape(word)}(?!\w)", text, re.IGNORECASE) is not None


def parse_json_answer(text: str) -> Any:
    """The JSON document in `text`: the last ```json fence when there is one, else the whole text. Raises ValueError."""
    fences = _JSON_FENCE.findall(text)
    return json.loads(fences[-1] if fences else text.strip())


def _is_json(text: str, c: dict) -> bool:
    try:
        parse_json_answer(text)
    except ValueError:
        return False
    return True


def _bullet_list(text: str, c: dict) -> bool:
    n = len(_BULLET.findall(text))
    return n == c["count"] if "count" in c else n > 0


CHECKS: dict[str, Callable[[str, dict], bool]] = {
    "word_count": _word_count,
    "include": lambda text, c: all(_contains_word(text, w) for w in c["words"]),
    "exclude": lambda text, c: not any(_contains_word(text, w) for w in c["words"]),
    "json": _is_json,
    "bullet_list": _bullet_list,
    "lowercase": lambda text, c: text == text.lower(),
    "ends_with": lambda text, c: text.rstrip().endswith(c["text"].strip()),
}


def describe_constraint(c: dict) -> str:
    """The constraint as an instruction for the prompt."""
    kind = c["type"]
    if kind == "word_count":
        bounds = [f"at least {c['min']}" if "min" in c else "", f"at most {c['max']}" if "max" in c else ""]
        return f"Answer in {' and '.join(b for b in bounds if b)} words."
    if kind == "include":
        return "Use the words: " + ", ".join(c["words"]) + "."
    if kind == "exclude":
        return "Do not use the words: " + ", ".join(c["words"]) + "."
    if kind == "json":
        return "Answer with a JSON document only."
    if kind == "bullet_list":
        return f"Answer as a bullet list{' of exactly ' + str(c['count']) + ' items' if 'count' in c else ''}."
    if kind == "lowercase":
        return "Write in lowercase letters only."
    if kind == "ends_with":
        return f"End your answer with: {c['text']}"
    raise ValueError(f"unknown constraint type {kind!r}; known: {sorted(CHECKS)}")


@reward("instruction")
def instruction(completion: str, constraints: list[dict] | str, all_or_nothing: bool = False,
                reasoning: str | bool | None = None) -> RewardResult:
    """Fraction of the row's `constraints` the answer satisfies (1 or 0 with `all_or_nothing`).

    With the row's `reasoning` on, a completion that never wrote `</think>` has an empty answer part.
    """
    if isinstance(constraints, str):
        constraints = json.loads(constraints)
    if not constraints:
        raise ValueError("the row has no constraints")
    text = answer_part(completion, reasoning).strip()
    failed = []
    for c in constraints:
        check = CHECKS.get(c.get("type"))
        if check is None:
            raise ValueError(f"unknown constraint type {c.get('type')!r}; known: {sorted(CHECKS)}")
        if not text or not check(text, c):  # no answer satisfies no constraint (`lowercase` would pass vacuously)
            failed.append(c)
    passed = len(constraints) - len(failed)
    score = float(not failed) if all_or_nothing else passed / len(constraints)
    return RewardResult(score, {"passed": passed, "total": len(constraints), "failed": failed})
