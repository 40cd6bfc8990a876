"""Truncated-thinking rows: teach a model to answer well when its thinking is cut at a budget.

For a fraction of reasoning-on training rows, the trace is cut at a sampled budget, closed with a marker and
`</think>`, and followed by the row's original final answer (Nemotron Nano 2, SFT stage 3). Deterministic under
the seed; rows are marked `metadata.truncated_at` and counted.

Two options teach the model to shorten its thinking rather than stop mid-work (for traces that carry skippable
lines, e.g. `data_recipes/synthetic_math.py`'s redundancy):
- `compress`: a trace over its budget first leaves out skippable lines, those not in `metadata.minimal_trace`
  (checks, restatements, abandoned branches), each one that would leave too little room for the operations still
  to come; only when the operations alone are over the budget is the trace cut.
- `state_budget`: the budget is written into the row's last user message (L1-style), for every drawn row, also one
  whose trace fits, so the model learns what a stated budget asks. A model trained so is evaluated and rolled out
  with the budget stated too (`eval.state_budget`, `rollout.state_budget`).
"""

from __future__ import annotations

import copy
import random
from dataclasses import dataclass
from typing import Literal

from alignment.chat_format import IGNORE_INDEX, state_budget
from alignment.config import option


@dataclass
class TruncationConfig:
    """Which rows get a truncated trace and where it is cut."""

    fraction: float = option(0.03, "Fraction of reasoning-on rows whose trace is cut (the reports used 3%).")
    budget_mode: Literal["tokens", "fraction"] = option(
        "tokens", "Draw the cut as an absolute token count or as a fraction of the trace length."
    )
    min_budget: int = option(0, "tokens mode: smallest cut, in trace tokens.")
    max_budget: int = option(128, "tokens mode: largest cut, in trace tokens.")
    min_fraction: float = option(0.0, "fraction mode: smallest cut, as a fraction of the trace.")
    max_fraction: float = option(0.9, "fraction mode: largest cut, as a fraction of the trace.")
    close_marker: str = option("", "Text written after the cut, before `</think>` (e.g. '.\\n'); default none.")
    train_close: bool = option(
        True, "Train the `</think>` that follows a cut. false: it carries no loss, since at inference the budget rule "
        "forces that token, and a trained label may teach the model to close early on its own.",
    )
    compress: bool = option(
        False, "A trace over its budget leaves out skippable lines (not in metadata.minimal_trace) before it is cut.")
    state_budget: bool = option(
        False, "Write each drawn budget into the row's last user message (`Think for at most N tokens.`); evaluate "
        "and roll out with eval.state_budget / rollout.state_budget.")
    seed: int = option(0, "Seed: the same rows get the same cuts.")

    def validate(self) -> None:
        if not 0.0 <= self.fraction <= 1.0:
            raise ValueError("truncation.fraction must be in [0, 1]")
        if not 0 <= self.min_budget <= self.max_budget:
            raise ValueError("truncation needs 0 <= min_budget <= max_budget")
        if not 0.0 <= self.min_fraction <= self.max_fraction <= 1.0:
            raise ValueError("truncation needs 0 <= min_fraction <= max_fraction <= 1")


def truncate_rows(rows: list[dict], config: TruncationConfig, tokenizer) -> tuple[list[dict], dict]:
    """Rows with a `fraction` of the reasoning-on ones truncated, and counts for the manifest.

    Only traces longer than their drawn cut are changed (a cut past the end would change nothing), unless the budget
    is stated, which changes the prompt of every drawn row.
    """
    rng = random.Random(config.seed)
    out, truncated, compressed, stated, candidates = [], 0, 0, 0, 0
    for index, row in enumerate(rows):
        assistant = row["messages"][-1]
        trace = assistant.get("reasoning_content") or ""
        if not trace or rng.random() >= config.fraction:
            out.append(row)
            continue
        candidates += 1
        ids = tokenizer(trace, add_special_tokens=False)["input_ids"]
        if config.budget_mode == "tokens":
            cut = rng.randint(config.min_budget, config.max_budget)
        else:
            cut = int(len(ids) * rng.uniform(config.min_fraction, config.max_fraction))
        if cut >= len(ids) and not config.state_budget:
            out.append(row)
            continue
        new_row = copy.deepcopy(row)
        metadata = new_row.setdefault("metadata", {})
        if config.state_budget:
            new_row["messages"] = state_budget(new_row["messages"], cut)
            metadata["stated_budget"] = cut
            stated += 1
        if cut < len(ids) and config.compress:
            minimal = metadata.get("minimal_trace")
            if not minimal:
                raise ValueError(f"row {index} ({row.get('id')}): truncation.compress needs metadata.minimal_trace")
            fitted = fit_trace(trace, minimal, cut, tokenizer)
            if fitted != trace:
                trace, ids = fitted, tokenizer(fitted, add_special_tokens=False)["input_ids"]
                metadata["compressed_to"] = len(ids)
                compressed += 1
        if cut < len(ids):
            trace = tokenizer.decode(ids[:cut]) + config.close_marker
            metadata["truncated_at"] = cut
            truncated += 1
        new_row["messages"][-1]["reasoning_content"] = trace
        out.append(new_row)
    return out, {"truncated": truncated, "compressed": compressed, "budget_stated": stated, "drawn": candidates,
                 "rows": len(rows)}


def fit_trace(trace: str, minimal: str, budget: int, tokenizer) -> str:
    """`trace` with skippable lines left out so that it fits `budget` tokens where the operations allow.

    The operations are the lines of `minimal`, matched in order; the other lines are skippable. Going through the
    trace, a skippable line is kept only if the lines kept so far, it, and the operations still to come fit the
    budget. The operations are always kept (the result may still be over the budget: the caller then cuts it).
    """
    lines = trace.splitlines(keepends=True)
    steps = minimal.splitlines(keepends=True)
    is_step, matched = [], 0
    for line in lines:
        hit = matched < len(steps) and line.strip() == steps[matched].strip()
        matched += hit
        is_step.append(hit)
    if matched < len(steps):  # the operations are not all in the trace: nothing can be told apart
        return trace

    sizes = [len(ids) for ids in tokenizer(lines, add_special_tokens=False)["input_ids"]]  # tokens per line
    after = [0] * (len(lines) + 1)  # tokens of the operations from line i on
    for i in range(len(lines) - 1, -1, -1):
        after[i] = after[i + 1] + (sizes[i] if is_step[i] else 0)
    kept, used = [], 0
    for i, line in enumerate(lines):
        if is_step[i] or used + sizes[i] + after[i + 1] <= budget:
            kept.append(line)
            used += sizes[i]
    return "".join(kept)


def mask_forced_close(sample: dict, close_ids: list[int]) -> tuple[dict, bool]:
    """`sample` with the labels of its first trained `</think>` (the token ids `close_ids`) set to IGNORE_INDEX.

    Returns (sample, found). Only the close itself is masked: the cut trace before it and the answer after it keep
    their loss.
    """
    labels, n = sample["labels"], len(close_ids)
    for start in range(len(labels) - n + 1):
        if labels[start] != IGNORE_INDEX and labels[start : start + n] == close_ids:
            masked = labels[:start] + [IGNORE_INDEX] * n + labels[start + n :]
            return {**sample, "labels": masked}, True
    return sample, False
