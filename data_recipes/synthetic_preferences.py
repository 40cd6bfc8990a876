"""Synthetic preference pairs for the reward-model stage on the tiny default (`align rm`): each pair is a math
question with two responses that share the reasoning trace; the chosen one boxes the trace's final value, the
rejected one a different number. A reward model learns it by reading the trace's last line against the box, which
needs attention over the response, not a keyword.

    python -m data_recipes.synthetic_preferences runs/data/tiny/train.jsonl runs/data/tiny/preferences.jsonl \
        --chat-prompts runs/data/tiny/rl.jsonl runs/data/tiny/chat_rl.jsonl

`--chat-prompts` also writes prompt rows of `task: chat` (GRPO routes them to the `reward_model` reward; they keep
their `answer`, so the math accuracy can still be measured).
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

from data_recipes.synthetic_math import answer_text


def preference_pairs(rows: list[dict], seed: int = 0) -> list[dict]:
    """One pair (prompt_messages schema) per reasoning-on math row: the reference response against the same trace
    with another boxed number."""
    rng = random.Random(seed)
    pairs = []
    for row in rows:
        *prompt, response = row["messages"]
        if response["role"] != "assistant" or not response.get("reasoning_content"):
            continue
        wrong = int(row["answer"]) + rng.choice([-1, 1]) * rng.randint(1, 9)
        rejected = dict(response, content=answer_text(wrong))
        pairs.append({"id": f"{row['id']}-pref", "prompt": prompt, "chosen": [response], "rejected": [rejected],
                      "metadata": {"source": "synthetic", "answer": row["answer"], "rejected_answer": str(wrong)}})
    return pairs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("rows", help="Math rows (align data's train.jsonl).")
    parser.add_argument("out", help="Where the pairs go (JSONL).")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--chat-prompts", nargs=2, metavar=("ROWS", "OUT"), help="Also write ROWS as task: chat.")
    args = parser.parse_args()
    pairs = preference_pairs(_read(args.rows), args.seed)
    Path(args.out).write_text("".join(json.dumps(p) + "\n" for p in pairs))
    print(f"{len(pairs)} pairs in {args.out}")
    if args.chat_prompts:
        source, out = args.chat_prompts
        chat = [dict(row, task="chat") for row in _read(source)]
        Path(out).write_text("".join(json.dumps(r) + "\n" for r in chat))
        print(f"{len(chat)} chat prompts in {out}")


def _read(path: str) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


if __name__ == "__main__":
    main()
