"""Truncated-thinking rows: teach a model to answer well when its thinking is cut at a budget.

For a fraction of reasoning-on training rows, the trace is cut at a sampled budget, closed with a marker and
`</think>`, and followed by the row's original final answer (Nemotron Nano 2, SFT stage 3). Deterministic under
the seed; rows are marked `metadata.truncated_at` and counted.
"""

from __future__ import annotations

import copy
import random
from dataclasses import dataclass
from typing import Literal

from alignment.chat_format import IGNORE_INDEX
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

    Only traces longer than their drawn cut are changed (a cut past the end would change nothing).
    """
    rng = random.Random(config.seed)
    out, truncated, candidates = [], 0, 0
    for row in rows:
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
        if cut >= len(ids):
            out.append(row)
            continue
        new_row = copy.deepcopy(row)
        new_row["messages"][-1]["reasoning_content"] = tokenizer.decode(ids[:cut]) + config.close_marker
        new_row.setdefault("metadata", {})["truncated_at"] = cut
        out.append(new_row)
        truncated += 1
    return out, {"truncated": truncated, "drawn": candidates, "rows": len(rows)}


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
