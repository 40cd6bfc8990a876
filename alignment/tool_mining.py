"""On-policy DPO pairs for multi-step tool calling (Nano 2's iterative tool DPO): K episodes per task in the tool
environment, a successful one paired with a failed one.

Two episodes of one task see the same conversation up to the first turn where they act differently (the world answers
the same calls the same way; a template that keeps earlier traces in the prompt makes the prompts differ, and then
no pair is cut), so the pair is that turn: the same prompt, the successful episode's turn chosen, the failed one's
rejected, each as the exact tokens sampled.
Turns are compared by what they do (their calls by value, or their answer), not by their text: two turns that make
the same call in differently worded traces teach nothing about calling, and the episode that failed went wrong
later. A prompt's first pairs take one failure of each kind: a tool the task does not offer or a call that cannot be
read, and a wrong call or answer; a success may be paired with several failures.
"""

from __future__ import annotations

import random

from alignment.rollout.episodes import Episode, run_episodes
from envs.tool_env import parse_turn


def turn_action(text: str, tools: list[dict] | None) -> tuple:
    """What a turn does, its trace left out: its calls by value, or its answer, or that its calls could not be read."""
    _, turn = parse_turn(text, tools)
    if turn.malformed:
        return ("malformed", turn.malformed)
    if turn.calls:
        return ("calls", tuple(call.key() for call in turn.calls))
    return ("answer", turn.content.strip())


def divergence_turn(first: Episode, second: Episode) -> int | None:
    """The first turn where two episodes of one task act differently, when both were prompted alike there (None
    otherwise: one's actions start the other's, or the prompts differ because a template kept an earlier trace)."""
    tools = first.row.get("tools")
    for t, (a, b) in enumerate(zip(first.turns, second.turns)):
        if turn_action(a.text, tools) != turn_action(b.text, tools):
            return t if a.prompt_ids == b.prompt_ids else None
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
        # A success that made other calls than the reference's guessed its answer: not a turn to teach.
        has_reference = bool((row.get("metadata") or {}).get("reference_calls"))
        wins = sorted((j for j in group if outcomes[j].success and (outcomes[j].exact_calls or not has_reference)),
                      key=lambda j: (len(episodes[j].turns), j))
        made = 0
        for n, loss in enumerate(_failures_in_pairing_order(group, outcomes) if wins else []):
            if made == config.max_pairs_per_prompt:
                break
            win = wins[n % len(wins)]  # a success may be the chosen side of several pairs
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


def _failures_in_pairing_order(group: list[int], outcomes: list) -> list[int]:
    """The failed episodes of a group, one of each kind first (a hallucinated tool or an unreadable call, then a
    wrong call or answer), so that a prompt's pairs teach away from both when it has both."""
    failed = [j for j in group if not outcomes[j].success]
    bad_call = [j for j in failed if outcomes[j].hallucinated or outcomes[j].malformed]
    wrong = [j for j in failed if j not in bad_call]
    firsts = [kind[0] for kind in (bad_call, wrong) if kind]
    return firsts + [j for j in bad_call + wrong if j not in firsts]


def _messages_before_turn(messages: list[dict], turn: int) -> list[dict]:
    """The conversation up to (not including) assistant turn number `turn`."""
    seen = 0
    for n, message in enumerate(messages):
        if message["role"] == "assistant":
            if seen == turn:
                return messages[:n]
            seen += 1
    return messages
