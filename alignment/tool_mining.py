"""On-policy DPO pairs for multi-step tool calling (Nano 2's iterative tool DPO): K episodes per task in the tool
environment, a successful one paired with a failed one.

Two episodes of one task share every turn up to the first one whose text differs (the world answers the same calls
the same way), so the pair is that turn: the same prompt (the conversation so far, the template's rendering of it),
the successful episode's turn chosen, the failed one's rejected, each as the exact tokens sampled. Failures that
called a tool the task does not offer, or wrote a call that cannot be read, are paired first: those are what the
pairs should teach away from.
"""

from __future__ import annotations

import random

from alignment.rollout.episodes import Episode, run_episodes


def divergence_turn(first: Episode, second: Episode) -> int | None:
    """The first turn whose text differs between two episodes of one task (None when one's turns start the other's)."""
    for t, (a, b) in enumerate(zip(first.turn_texts, second.turn_texts)):
        if a != b:
            return t
    return None


def mine_tool_pairs(model, tokenizer, rows: list[dict], config, seed: int, tag: str) -> tuple[list[dict], dict]:
    """Pairs from K episodes per tool row (`config`: the DPO `MiningConfig`), and counts of what was mined."""
    from alignment.dpo import completion_message, mining_settings, sampled_sample

    rng = random.Random(seed)
    k = config.samples_per_prompt
    reasoning = [rng.random() >= config.reasoning_off_fraction for _ in rows]
    settings = mining_settings(tokenizer, config)
    episodes = run_episodes(model, tokenizer, [row for row in rows for _ in range(k)],
                            [on for on in reasoning for _ in range(k)], settings, config.tool_max_turns, seed=seed)
    outcomes = [episode.outcome() for episode in episodes]
    pairs: list[dict] = []
    stats = {"tool_prompts": len(rows), "tool_episodes": len(episodes), "tool_no_contrast": 0,
             "tool_success": sum(o.success for o in outcomes) / max(1, len(outcomes)),
             "tool_hallucinated": sum(o.hallucinated for o in outcomes) / max(1, len(outcomes))}
    for i, row in enumerate(rows):
        group = list(range(i * k, (i + 1) * k))
        wins = sorted((j for j in group if outcomes[j].success),
                      key=lambda j: (not outcomes[j].exact_calls, len(episodes[j].turns), j))
        losses = sorted((j for j in group if not outcomes[j].success),
                        key=lambda j: (not (outcomes[j].hallucinated or outcomes[j].malformed), j))
        made = 0
        for win, loss in zip(wins, losses):
            if made == config.max_pairs_per_prompt:
                break
            turn = divergence_turn(episodes[win], episodes[loss])
            if turn is None:
                continue
            chosen, rejected = episodes[win].turns[turn], episodes[loss].turns[turn]
            prompt = _messages_before_turn(episodes[win].messages, turn)  # the same in both episodes
            pairs.append({
                "id": f"{row.get('id', i)}-{tag}-tool{made}",
                "prompt": prompt,
                "tools": row.get("tools"),
                "chosen": completion_message(chosen.text, reasoning[i]),
                "rejected": completion_message(rejected.text, reasoning[i]),
                "metadata": {
                    "source": "mined-tool", "prompt_id": row.get("id"), "round": tag, "turn": turn,
                    "reasoning": "on" if reasoning[i] else "off", "thinking_budget": None,
                    "chosen_score": 1.0, "rejected_score": 0.0, "rejected_reason": outcomes[loss].reason,
                    "rejected_hallucinated": outcomes[loss].hallucinated,
                    "chosen_text": chosen.text, "rejected_text": rejected.text,
                },
                "encoded": {"chosen": sampled_sample(chosen.prompt_ids, chosen.result),
                            "rejected": sampled_sample(rejected.prompt_ids, rejected.result)},
            })
            made += 1
        stats["tool_no_contrast"] += made == 0
    stats["tool_pairs"] = len(pairs)
    return pairs, stats


def _messages_before_turn(messages: list[dict], turn: int) -> list[dict]:
    """The conversation up to (not including) assistant turn number `turn`."""
    seen = 0
    for n, message in enumerate(messages):
        if message["role"] == "assistant":
            if seen == turn:
                return messages[:n]
            seen += 1
    return messages
