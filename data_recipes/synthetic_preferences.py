"""Synthetic preference pairs for the reward-model stage on the tiny default (`align rm`), one pair per math row,
of three kinds (`metadata.kind`), each a quality a reward model can only judge by reading the response against its
question:

    box         the same trace; the chosen response boxes the trace's final value, the rejected one another number
    incomplete  the chosen trace does every operation of the question; the rejected one stops early and boxes the
                value it reached
    extra       the chosen trace does every operation of the question; the rejected one adds one more and boxes its
                result (with the incomplete pairs, a trace's length alone says nothing)
    toggle      a /no_think prompt; the chosen response just answers, the rejected one works the steps out first

Without the incomplete pairs, GRPO against a reward model of box pairs alone learned to stop the trace early: a
short trace boxed consistently scored higher, and math accuracy collapsed (README "RLHF with a reward model").

    python -m data_recipes.synthetic_preferences runs/data/tiny/train.jsonl runs/data/tiny/preferences.jsonl \
        --chat-prompts runs/data/tiny/rl.jsonl runs/data/tiny/chat_rl.jsonl

`align data ... preferences=true` writes both files beside the splits. `--chat-prompts` also writes prompt rows of
`task: chat` (GRPO routes them to the `reward_model` reward; they keep their `answer`, so the math accuracy can still
be measured).
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

from data_recipes.synthetic_math import answer_text, next_step

KINDS = ("box", "incomplete", "extra", "toggle")


def preference_pairs(rows: list[dict], seed: int = 0, trace_share: float = 0.4) -> list[dict]:
    """One pair (prompt_messages schema) per math row: reasoning-off rows give a toggle pair; a reasoning-on row an
    incomplete or an extra pair (as likely) with probability `trace_share`, else a box pair."""
    rng = random.Random(seed)
    pairs = []
    for row in rows:
        *prompt, response = row["messages"]
        if response["role"] != "assistant":
            continue
        lines = response["reasoning_content"].splitlines(keepends=True)
        if row["metadata"]["reasoning"] == "off":
            # Chat templates render a /no_think turn with an empty think block whatever its reasoning_content, so a
            # response that thinks anyway writes its steps into the answer, as a policy that ignores the switch does.
            kind, wrong = "toggle", row["answer"]
            rejected = dict(response, content=row["metadata"]["minimal_trace"] + response["content"])
        elif rng.random() < trace_share:
            if len(lines) >= 2 and rng.random() < 0.5:
                kind, kept = "incomplete", lines[:rng.randrange(1, len(lines))]
            else:
                kind, kept = "extra", lines + [next_step(rng, int(row["answer"]))[1].line + "\n"]
            wrong = kept[-1].rsplit("=", 1)[-1].strip()
            rejected = dict(response, reasoning_content="".join(kept), content=answer_text(wrong))
        else:
            kind = "box"
            wrong = str(int(row["answer"]) + rng.choice([-1, 1]) * rng.randint(1, 9))
            rejected = dict(response, content=answer_text(wrong))
        pairs.append({"id": f"{row['id']}-pref", "prompt": prompt, "chosen": [response], "rejected": [rejected],
                      "metadata": {"source": "synthetic", "kind": kind, "answer": row["answer"],
                                   "rejected_answer": wrong}})
    return pairs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("rows", help="Math rows (align data's train.jsonl).")
    parser.add_argument("out", help="Where the pairs go (JSONL).")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--trace-share", type=float, default=0.4,
                        help="Share of the reasoning-on rows that give an incomplete or extra pair (the rest box).")
    parser.add_argument("--chat-prompts", nargs=2, metavar=("ROWS", "OUT"), help="Also write ROWS as task: chat.")
    args = parser.parse_args()
    pairs = preference_pairs(_read(args.rows), args.seed, args.trace_share)
    Path(args.out).write_text("".join(json.dumps(p) + "\n" for p in pairs))
    counts = {kind: sum(p["metadata"]["kind"] == kind for p in pairs) for kind in KINDS}
    print(f"{len(pairs)} pairs in {args.out} ({', '.join(f'{n} {k}' for k, n in counts.items())})")
    if args.chat_prompts:
        source, out = args.chat_prompts
        chat = [dict(row, task="chat") for row in _read(source)]
        Path(out).write_text("".join(json.dumps(r) + "\n" for r in chat))
        print(f"{len(chat)} chat prompts in {out}")


def _read(path: str) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


if __name__ == "__main__":
    main()
