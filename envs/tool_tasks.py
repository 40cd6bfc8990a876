"""Synthetic tool tasks for the tiny default: 1-3 calls against the key-value world of `envs.tool_env`.

Kinds (the calls of each assistant turn, `|` between turns):
- `compute`: "What is 23 * 7?"  multiply(23, 7)
- `lookup`: "What is stored under 'jar31'?"  get_value(jar31)
- `store`: "Store 15 under 'box12'."  set_value(box12, 15)
- `compute_store`: "Store 8 * 6 under 'tin40'."  multiply(8, 6) | set_value(tin40, 48)
- `sum_two`: "What is the sum of the values under 'a' and 'b'?"  get_value(a), get_value(b) | add(x, y)
- `update`: "Add 5 to the value under 'cup77'."  get_value(cup77) | add(12, 5) | set_value(cup77, 17)

Each row offers the tools its task needs plus up to two others (so a model that calls a tool it was not offered
is caught: a hallucinated tool), and ends with the answer boxed. Reasoning-on rows carry a short trace in every
assistant turn; reasoning-off rows (`/no_think` in the system message) none. Rows are conversations in the
project's schema with `tools`, `task: "tool"`, `answer`, and the world in `metadata` (see `envs.tool_env`).
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from alignment.config import option
from envs.tool_env import TOOLS, tool_specs

SYSTEM_PROMPT = "Use the tools to answer. Give the final answer in \\boxed{}."
# Keys are a word and a number ("box42"): about a thousand of them, so the splits can hold distinct questions.
KEY_WORDS = ["box", "jar", "bag", "bin", "cup", "pot", "tin", "can", "tub", "urn", "vat", "keg"]
KINDS = ("compute", "lookup", "store", "compute_store", "sum_two", "update")
ARITHMETIC = {"add": ("+", lambda a, b: a + b), "subtract": ("-", lambda a, b: a - b),
              "multiply": ("*", lambda a, b: a * b)}
BUILTIN_TOOLS = ("add", "subtract", "multiply", "get_value", "set_value")


@dataclass
class ToolTaskConfig:
    """The synthetic tool tasks `align data` writes beside the math splits (tools_<split>.jsonl)."""

    train_size: int = option(0, "Training conversations (0: no tool tasks are written).")
    validation_size: int = option(100, "Validation prompts.")
    test_size: int = option(200, "Held-out test prompts.")
    rl_size: int = option(600, "Fresh prompts for DPO mining and GRPO.")
    reasoning_off_fraction: float = option(0.2, "Share of training rows with reasoning off.")
    seed: int = option(0, "Seed of the generator (a split's rows do not depend on the other splits' sizes).")

    def validate(self) -> None:
        if min(self.train_size, self.validation_size, self.test_size, self.rl_size) < 0:
            raise ValueError("tool task sizes must be >= 0")
        if not 0 <= self.reasoning_off_fraction <= 1:
            raise ValueError("reasoning_off_fraction must be in [0, 1]")


def _call(name: str, **arguments) -> dict:
    return {"name": name, "arguments": arguments}


def _turn(calls: list[dict], trace: str) -> dict:
    return {"calls": calls, "trace": trace}


def make_task(rng: random.Random, kind: str) -> dict:
    """One task: question, needed tools, the world, the turns (calls and a trace each) and the answer."""
    names = [f"{rng.choice(KEY_WORDS)}{rng.randint(10, 99)}" for _ in range(4)]
    if len(set(names)) < 4:
        return make_task(rng, kind)
    keys, spare = names[:3], names[3]
    state = {k: rng.randint(1, 30) for k in keys}
    target = dict(state)
    if kind in ("compute", "compute_store"):
        op = rng.choice(list(ARITHMETIC))
        a, b = rng.randint(2, 30), rng.randint(2, 12)
        symbol, fn = ARITHMETIC[op]
        value = fn(a, b)
        first = _turn([_call(op, a=a, b=b)], f"{a} {symbol} {b} needs {op}.")
        if kind == "compute":
            return dict(question=f"What is {a} {symbol} {b}?", tools=[op], state=state, target=target,
                        turns=[first], answer=value, final=f"{op} gave {value}.")
        key = spare
        target[key] = value
        return dict(question=f"Store {a} {symbol} {b} under '{key}'.", tools=[op, "set_value"], state=state,
                    target=target, answer=value, final=f"{key} now holds {value}.",
                    turns=[first, _turn([_call("set_value", key=key, value=value)], f"{op} gave {value}. Store it.")])
    if kind == "lookup":
        key = rng.choice(keys)
        return dict(question=f"What is stored under '{key}'?", tools=["get_value"], state=state, target=target,
                    turns=[_turn([_call("get_value", key=key)], f"Read {key}.")], answer=state[key],
                    final=f"{key} is {state[key]}.")
    if kind == "store":
        key, value = spare, rng.randint(1, 99)
        target[key] = value
        return dict(question=f"Store {value} under '{key}'.", tools=["set_value"], state=state, target=target,
                    turns=[_turn([_call("set_value", key=key, value=value)], f"Store {value} under {key}.")],
                    answer=value, final=f"{key} now holds {value}.")
    if kind == "sum_two":
        x, y = keys[:2]
        total = state[x] + state[y]
        return dict(question=f"What is the sum of the values under '{x}' and '{y}'?", tools=["get_value", "add"],
                    state=state, target=target, answer=total, final=f"The sum is {total}.",
                    turns=[_turn([_call("get_value", key=x), _call("get_value", key=y)], f"Read {x} and {y}."),
                           _turn([_call("add", a=state[x], b=state[y])], f"{x} is {state[x]}, {y} is {state[y]}.")])
    if kind == "update":
        key, amount = rng.choice(keys), rng.randint(2, 20)
        value = state[key] + amount
        target[key] = value
        return dict(question=f"Add {amount} to the value under '{key}'.", tools=["get_value", "add", "set_value"],
                    state=state, target=target, answer=value, final=f"{key} now holds {value}.",
                    turns=[_turn([_call("get_value", key=key)], f"Read {key} first."),
                           _turn([_call("add", a=state[key], b=amount)], f"{key} is {state[key]}. Add {amount}."),
                           _turn([_call("set_value", key=key, value=value)], f"add gave {value}. Store it.")])
    raise ValueError(f"unknown tool task kind {kind!r}; known: {KINDS}")


def _result_of(call: dict, state: dict) -> object:
    tool = TOOLS[call["name"]]
    return tool.run(state, **call["arguments"])


def task_to_row(task: dict, row_id: str, split: str, reasoning_on: bool, rng: random.Random) -> dict:
    """The task as a conversation row: the reference turns, the world's answers to them, and the final answer."""
    import json

    extra = [t for t in BUILTIN_TOOLS if t not in task["tools"]]
    offered = task["tools"] + rng.sample(extra, rng.randint(0, min(2, len(extra))))
    rng.shuffle(offered)
    system = SYSTEM_PROMPT + ("" if reasoning_on else " /no_think")
    messages = [{"role": "system", "content": system}, {"role": "user", "content": task["question"]}]
    world = dict(task["state"])
    for turn in task["turns"]:
        calls = [{"type": "function", "function": c} for c in turn["calls"]]
        messages.append({"role": "assistant", "content": "", "tool_calls": calls,
                         "reasoning_content": turn["trace"] + "\n" if reasoning_on else ""})
        for call in turn["calls"]:
            messages.append({"role": "tool", "name": call["name"], "content": json.dumps(_result_of(call, world))})
    messages.append({"role": "assistant", "content": f"\\boxed{{{task['answer']}}}",
                     "reasoning_content": task["final"] + "\n" if reasoning_on else ""})
    return {
        "id": row_id, "task": "tool", "messages": messages, "tools": tool_specs(offered), "answer": str(task["answer"]),
        "metadata": {"kind": task["kind"], "split": split, "reasoning": "on" if reasoning_on else "off",
                     "initial_state": task["state"], "target_state": task["target"],
                     "reference_calls": [t["calls"] for t in task["turns"]]},
    }


def generate_tool_splits(config: ToolTaskConfig) -> dict[str, list[dict]]:
    """Train / validation / test / rl rows, no question shared between splits (questions are compared as text)."""
    from alignment.split_guard import prompt_key

    config.validate()
    seen: set[str] = set()
    splits: dict[str, list[dict]] = {}
    for split, size in (("test", config.test_size), ("validation", config.validation_size),
                        ("train", config.train_size), ("rl", config.rl_size)):
        rng = random.Random(f"{config.seed}:{split}")
        rows: list[dict] = []
        attempts = 0
        while len(rows) < size:
            attempts += 1
            if attempts > 50 * size + 1000:
                raise ValueError(f"could not draw {size} distinct {split} tool tasks")
            kind = KINDS[len(rows) % len(KINDS)]
            task = make_task(rng, kind) | {"kind": kind}
            reasoning_on = split != "train" or rng.random() >= config.reasoning_off_fraction
            row = task_to_row(task, f"tool-{split}-{len(rows):06d}", split, reasoning_on, rng)
            key = prompt_key(row)
            if key in seen:
                continue
            seen.add(key)
            rows.append(row)
        splits[split] = rows
    return splits
