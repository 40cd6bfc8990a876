"""`reward_model`: the score a trained reward model (`align rm`) gives each completion, after the row's prompt.

    rewards:
      routes:
        chat:
          - {name: reward_model, weight: 1.0, args: {checkpoint: runs/rlhf/rm/checkpoint, normalize: group}}
          - {name: length, weight: 0.2, args: {part: answer}}

The model loads once per process (each Ray reward actor, or this process in `mode: inprocess`) on `device` and
scores a call's completions in batches. `normalize: group` centres and scales the scores within each group of
completions of one prompt (rows sharing an `id`, as GRPO's are), so that its weight against a verifiable reward
means the same whatever the reward model's scale.
"""

from __future__ import annotations

import functools
from typing import Any

from rewards.length import prompt_groups
from rewards.registry import RewardResult, reward


@functools.lru_cache(maxsize=2)
def load_cached(checkpoint: str, device: str):
    """`alignment.reward_model.load_reward_model`, once per process for each checkpoint and device."""
    from alignment.reward_model import load_reward_model

    return load_reward_model(checkpoint, device)


@reward("reward_model", batched=True)
def reward_model(completions: list[str], messages: list[list[dict]], checkpoint: str, normalize: str = "none",
                 device: str = "cpu", batch_size: int = 32, id: list[Any] | None = None,
                 reasoning: list[Any] | None = None, **_: Any) -> list[RewardResult]:
    """The reward model's score of each completion as the assistant turn after its row's prompt (`messages`)."""
    from alignment.dpo import completion_message

    if normalize not in ("none", "group"):
        raise ValueError(f"normalize must be 'none' or 'group', got {normalize!r}")
    rm, tokenizer = load_cached(checkpoint, device)
    thinks = [r != "off" for r in reasoning] if reasoning else [True] * len(completions)
    conversations = [  # a row's reference answer, when it carries one, is not part of the prompt
        (m[:-1] if m[-1]["role"] == "assistant" else m) + [completion_message(c, on)]
        for c, m, on in zip(completions, messages, thinks)
    ]
    raw = rm.score(tokenizer, conversations, batch_size=batch_size)
    scores = list(raw)
    if normalize == "group":
        for members in prompt_groups(id, len(completions)):
            mean = sum(raw[i] for i in members) / len(members)
            std = (sum((raw[i] - mean) ** 2 for i in members) / len(members)) ** 0.5
            for i in members:
                scores[i] = (raw[i] - mean) / std if std > 1e-6 else 0.0
    return [RewardResult(s, {"raw": r}) for s, r in zip(scores, raw)]
