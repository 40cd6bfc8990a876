"""Synthetic multi-step arithmetic tasks with programmatic reasoning traces.

Each problem starts from a number and applies a chain of operations. The reasoning trace does one operation per line
("12 * 3 = 36"), so longer chains need longer traces and a thinking budget really limits what the model can work out.
Answering without the trace means doing the whole chain at once, which a small model mostly cannot: this is what makes
reasoning-on measurably better than reasoning-off.

Row schema (one JSON object per line, the same for every split):
    id        unique row id, e.g. "math-train-000042"
    task      "math" (routes the row to the math reward)
    messages  chat messages; the last one is the assistant turn with `content` (the final answer text) and
              `reasoning_content` (the trace, empty for reasoning-off rows); a `/no_think` system message marks
              reasoning-off rows
    answer    the reference final answer, as it appears inside `\\boxed{}`
    metadata  {"steps": int, "reasoning": "on" | "off", "split": str}
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field

from alignment.split_guard import prompt_key

MAX_VALUE = 99  # every intermediate result stays in 0..MAX_VALUE so one step is two-digit arithmetic


@dataclass
class MathTaskConfig:
    """Size and difficulty of the synthetic arithmetic corpus."""

    train_size: int = field(default=6000, metadata={"help": "Number of training rows."})
    validation_size: int = field(default=200, metadata={"help": "Number of validation rows."})
    test_size: int = field(default=300, metadata={"help": "Number of held-out test rows."})
    rl_size: int = field(
        default=0,
        metadata={"help": "Number of `rl` rows: fresh prompts for DPO mining and GRPO, disjoint from the SFT rows "
                          "(RL on prompts the SFT model has memorised gives it almost no learning signal)."},
    )
    min_steps: int = field(default=2, metadata={"help": "Fewest operations in a problem (difficulty knob)."})
    max_steps: int = field(default=6, metadata={"help": "Most operations in a problem (difficulty knob)."})
    reasoning_off_fraction: float = field(
        default=0.1, metadata={"help": "Fraction of training rows whose trace is stripped and marked /no_think."}
    )
    seed: int = field(default=0, metadata={"help": "Seed for the generator; the same seed gives the same rows."})

    def validate(self) -> None:
        if not 1 <= self.min_steps <= self.max_steps:
            raise ValueError("min_steps must be >= 1 and <= max_steps")
        if not 0.0 <= self.reasoning_off_fraction <= 1.0:
            raise ValueError("reasoning_off_fraction must be in [0, 1]")
        if min(self.train_size, self.validation_size, self.test_size, self.rl_size) < 0:
            raise ValueError("split sizes must be >= 0")


@dataclass
class Problem:
    question: str
    trace: str
    answer: int
    steps: int


def _next_step(rng: random.Random, value: int) -> tuple[str, str, int]:
    """Pick one operation that keeps the value in range. Returns (wording, symbol line, new value)."""
    while True:
        op = rng.choice(("add", "subtract", "multiply"))
        if op == "add":
            n = rng.randint(1, 9)
            if value + n <= MAX_VALUE:
                return f"add {n}", f"{value} + {n} = {value + n}", value + n
        elif op == "subtract":
            n = rng.randint(1, 9)
            if value - n >= 0:
                return f"subtract {n}", f"{value} - {n} = {value - n}", value - n
        else:
            n = rng.randint(2, 3)
            if value * n <= MAX_VALUE:
                return f"multiply by {n}", f"{value} * {n} = {value * n}", value * n


def make_problem(rng: random.Random, min_steps: int, max_steps: int) -> Problem:
    steps = rng.randint(min_steps, max_steps)
    value = rng.randint(1, 30)
    wordings, lines = [], []
    start = value
    for _ in range(steps):
        wording, line, value = _next_step(rng, value)
        wordings.append(wording)
        lines.append(line)
    question = f"Start with {start}. " + ", then ".join(wordings).capitalize() + ". What is the result?"
    trace = "".join(line + "\n" for line in lines)
    return Problem(question=question, trace=trace, answer=value, steps=steps)


def answer_text(answer: int | str) -> str:
    return f"The result is \\boxed{{{answer}}}."


def problem_to_row(problem: Problem, row_id: str, split: str, reasoning_on: bool) -> dict:
    messages = []
    if not reasoning_on:
        messages.append({"role": "system", "content": "/no_think"})
    messages.append({"role": "user", "content": problem.question})
    messages.append(
        {
            "role": "assistant",
            "content": answer_text(problem.answer),
            "reasoning_content": problem.trace if reasoning_on else "",
        }
    )
    return {
        "id": row_id,
        "task": "math",
        "messages": messages,
        "answer": str(problem.answer),
        "metadata": {"steps": problem.steps, "reasoning": "on" if reasoning_on else "off", "split": split},
    }


def generate_splits(config: MathTaskConfig) -> dict[str, list[dict]]:
    """Train/validation/test(/rl) rows with no prompt shared between splits (nor repeated within one).

    Prompts are compared as the stages' split guard compares them (`alignment.split_guard.prompt_key`), so the
    written splits always pass it.
    """
    config.validate()
    rng = random.Random(config.seed)
    seen: set[str] = set()
    splits: dict[str, list[dict]] = {}
    # Held-out splits first so that they keep the full difficulty distribution even if the space is crowded; the RL
    # prompts last, so that adding them leaves the other splits as they were.
    sizes = [("test", config.test_size), ("validation", config.validation_size), ("train", config.train_size)]
    for split, size in sizes + ([("rl", config.rl_size)] if config.rl_size else []):
        rows: list[dict] = []
        attempts = 0
        while len(rows) < size:
            attempts += 1
            if attempts > 50 * size + 1000:
                raise ValueError(f"could not draw {size} distinct {split} problems; widen min_steps..max_steps")
            problem = make_problem(rng, config.min_steps, config.max_steps)
            key = prompt_key(problem_to_row(problem, "", split, reasoning_on=True))  # the mode does not change it
            if key in seen:
                continue
            seen.add(key)
            reasoning_on = split != "train" or rng.random() >= config.reasoning_off_fraction
            rows.append(problem_to_row(problem, f"math-{split}-{len(rows):06d}", split, reasoning_on))
        splits[split] = rows
    return splits


@dataclass
class MathDataConfig:
    """The `align data` stage: write the synthetic splits as JSONL."""

    task: MathTaskConfig = field(default_factory=MathTaskConfig, metadata={"help": "Task generator settings."})
    output_dir: str = field(default="runs/data/tiny", metadata={"help": "Where train/validation/test(/rl).jsonl go."})


def write_splits(config: MathDataConfig) -> dict[str, str]:
    """Generate and write the splits (atomically, one file each) plus a small manifest; returns the paths."""
    import json
    from pathlib import Path

    from alignment.data import write_rows

    out = Path(config.output_dir)
    splits = generate_splits(config.task)
    paths = {}
    for name, rows in splits.items():
        write_rows(out / f"{name}.jsonl", rows)
        paths[name] = str(out / f"{name}.jsonl")
    counts = {name: len(rows) for name, rows in splits.items()}
    off = sum(r["metadata"]["reasoning"] == "off" for r in splits["train"])
    manifest = {"recipe": "synthetic_math", "config": {"task": vars(config.task)}, "rows": counts,
                "train_reasoning_off": off}
    (out / "manifest.json").write_text(json.dumps(manifest, indent=2))
    print(f"data: {counts} rows in {out} ({off} reasoning-off training rows)")
    return paths
