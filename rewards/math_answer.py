"""`math`: the final boxed answer checked for equivalence with the reference through math-verify."""

from __future__ import annotations

import logging
import threading

from math_verify import parse, verify

from envs.answers import answer_part, extract_boxed
from rewards.registry import RewardResult, reward

PARSE_TIMEOUT_S = 5


class _NoTimeoutNotice(logging.Filter):
    """Drop math-verify's notice that its timeout is off: off-main-thread calls are bounded by the scorer."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "Timeout is disabled" not in record.getMessage()


for _name in ("math_verify.parser", "math_verify.grader"):
    logging.getLogger(_name).addFilter(_NoTimeoutNotice())


@reward("math")
def math_answer(completion: str, answer: str | int | float, reasoning: str | bool | None = None) -> RewardResult:
    """1 when the last \\boxed{} of the answer part equals the row's `answer` (symbolic/numeric), else 0.

    With the row's `reasoning` on, a completion that never wrote `</think>` has no answer part and scores 0.

    Equivalent forms match: 1/2, 0.5, \\dfrac{1}{2}; [1,3) and [1, 3); {1,2} and {2,1}; "5 cm" and 5. Numbers are
    compared after rounding to 6 decimals (math-verify's default).
    """
    boxed = extract_boxed(answer_part(completion, reasoning))
    if boxed is None:
        return RewardResult(0.0, {"reason": "no \\boxed{} in the answer"})
    # math-verify's own timeout uses SIGALRM, which only the main thread may set; elsewhere the scorer's
    # timeout bounds the call.
    timeout = PARSE_TIMEOUT_S if threading.current_thread() is threading.main_thread() else None
    reference = "" if answer is None else str(answer).strip().strip("$")
    gold = parse(f"${reference}$", parsing_timeout=timeout)
    if not gold:
        raise ValueError(f"reference answer {answer!r} cannot be parsed")
    predicted = parse(f"\\boxed{{{boxed}}}", parsing_timeout=timeout)
    correct = bool(predicted) and verify(gold, predicted, timeout_seconds=timeout)
    return RewardResult(float(correct), {"extracted": boxed, "reference": reference})
