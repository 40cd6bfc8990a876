"""Uncertainty of evaluation figures: standard errors over prompts, and paired differences between two models.

With 300 prompts one standard error of an accuracy near 0.5 is ~0.029, as large as most single-stage gains. Two
models evaluated on the same prompts mostly agree, so the standard error of their *difference* is much smaller than
either one's: it is computed from the per-prompt differences (a paired comparison), not from the two errors.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence


def mean_and_stderr(values: Sequence[float]) -> tuple[float, float]:
    """The mean and its standard error (sample standard deviation over sqrt(n); 0 for fewer than 2 values)."""
    n = len(values)
    if n == 0:
        raise ValueError("no values")
    mean = sum(values) / n
    if n < 2:
        return mean, 0.0
    variance = sum((v - mean) ** 2 for v in values) / (n - 1)
    return mean, math.sqrt(variance / n)


def paired_difference(first: Sequence[float], second: Sequence[float]) -> tuple[float, float]:
    """second - first over the same prompts (in the same order), with the standard error of the paired mean."""
    if len(first) != len(second):
        raise ValueError(f"paired scores need the same prompts: {len(first)} against {len(second)}")
    return mean_and_stderr([b - a for a, b in zip(first, second)])


def paired_gain(before: Sequence[float], after: Sequence[float], before_ids: Sequence, after_ids: Sequence,
                ) -> dict | None:
    """after - before as {difference, stderr, rows}, or None when the two were not scored on the same rows."""
    if list(before_ids) != list(after_ids) or not before_ids:
        return None
    difference, stderr = paired_difference(before, after)
    return {"difference": difference, "stderr": stderr, "rows": len(before)}


def with_stderr(summary: dict, key: str) -> str:
    """`0.543 ± 0.029` (the value alone for results written before standard errors were kept)."""
    stderr = summary.get(f"{key}_stderr")
    return f"{summary[key]:.3f}" + ("" if stderr is None else f" ± {stderr:.3f}")


def paired_gains(results: dict[str, dict], key: str = "correct_think") -> dict[str, dict | None]:
    """Each model's accuracy against the one listed before it, paired over the same rows (None where not paired)."""
    names = list(results)
    return {after: paired_gain(results[before].get(key, []), results[after].get(key, []),
                               results[before].get("row_ids", []), results[after].get("row_ids", []))
            for before, after in zip(names, names[1:])}


def format_gain(gain: dict | None) -> str:
    """`+0.030 ± 0.022` for a paired gain, `-` where there is none."""
    return "-" if gain is None else f"{gain['difference']:+.3f} ± {gain['stderr']:.3f}"


# ---------------------------------------------------------------------------------------------------------------
# k samples per prompt


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k of one prompt from n samples of which c are correct: 1 - C(n-c, k) / C(n, k).

    The chance that k samples drawn without replacement from the n hold a correct one (Chen et al., 2021); with
    k = n it is 1 when any sample is correct, with k = 1 the fraction correct.
    """
    if not 0 <= c <= n or not 1 <= k <= n:
        raise ValueError(f"pass@k needs 0 <= c <= n and 1 <= k <= n, got n={n}, c={c}, k={k}")
    if n - c < k:
        return 1.0
    return 1.0 - math.comb(n - c, k) / math.comb(n, k)


def majority_answer(answers: Sequence[str | None], same: Callable[[str, str], bool]) -> str | None:
    """The answer most samples gave (`same` decides which agree; no answer never wins); a tie goes to the first."""
    groups: list[list[str]] = []
    for answer in answers:
        if answer is None:
            continue
        group = next((g for g in groups if same(g[0], answer)), None)
        if group is None:
            groups.append([answer])
        else:
            group.append(answer)
    return max(groups, key=len)[0] if groups else None  # max keeps the first of equally large groups


def sampling_stderr(fractions: Sequence[float], k: int) -> float:
    """The part of avg@k's standard error that comes from sampling alone, the prompts held fixed.

    Prompt r's k samples are correct with a fraction f_r; the mean over n prompts of those fractions varies from
    sampling by sqrt(sum_r s_r^2 / k) / n, with s_r^2 = f_r (1 - f_r) k / (k - 1) the unbiased variance of a 0/1
    score within prompt r. 0 for k = 1 (nothing to estimate it from).
    """
    if k < 2 or not fractions:
        return 0.0
    within = [f * (1 - f) * k / (k - 1) for f in fractions]
    return math.sqrt(sum(within) / k) / len(fractions)
