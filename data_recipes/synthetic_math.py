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
    metadata  {"steps": int, "reasoning": "on" | "off", "split": str, "minimal_trace": str}

With `task.redundancy` rates above 0 the traces carry what real ones do and a budget can cut: verification lines
after a step ("check: 39 / 3 = 13, ok"), restatements of the goal, short explored-and-abandoned branches and
recomputed steps. `metadata.minimal_trace` is always the operations alone, so an evaluation can say how many
problems a budget leaves room for with the full trace and with the minimal one.
"""

from __future__ import annotations

import dataclasses
import random
from dataclasses import dataclass, field

from alignment.split_guard import prompt_key
from envs.tool_tasks import ToolTaskConfig, generate_tool_splits

MAX_VALUE = 99  # every intermediate result stays in 0..MAX_VALUE so one step is two-digit arithmetic


@dataclass
class RedundancyConfig:
    """How much skippable reasoning the traces carry; every rate 0 (the default) gives the operations alone."""

    verify: float = field(
        default=0.0, metadata={"help": "Chance of a check line after a step (check: 39 / 3 = 13, ok)."}
    )
    restate: float = field(
        default=0.0, metadata={"help": "Chance of restating the goal at the start, and again halfway (per trace)."}
    )
    branch: float = field(
        default=0.0, metadata={"help": "Chance per step of a wrong operation tried and abandoned before it."}
    )
    recompute: float = field(default=0.0, metadata={"help": "Chance per step of working it out again."})

    def validate(self) -> None:
        for name in ("verify", "restate", "branch", "recompute"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"redundancy.{name} must be in [0, 1], got {getattr(self, name)}")

    @property
    def any(self) -> bool:
        return any((self.verify, self.restate, self.branch, self.recompute))


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
    redundancy: RedundancyConfig = field(
        default_factory=RedundancyConfig,
        metadata={"help": "Skippable lines in the traces (the problems drawn do not change with it)."},
    )

    def validate(self) -> None:
        self.redundancy.validate()
        if not 1 <= self.min_steps <= self.max_steps:
            raise ValueError("min_steps must be >= 1 and <= max_steps")
        if not 0.0 <= self.reasoning_off_fraction <= 1.0:
            raise ValueError("reasoning_off_fraction must be in [0, 1]")
        if min(self.train_size, self.validation_size, self.test_size, self.rl_size) < 0:
            raise ValueError("split sizes must be >= 0")


@dataclass
class Step:
    value: int  # before the operation
    op: str  # "+", "-" or "*"
    n: int
    result: int

    @property
    def line(self) -> str:
        return f"{self.value} {self.op} {self.n} = {self.result}"


@dataclass
class Problem:
    question: str
    trace: str  # the operations alone, one per line
    answer: int
    steps: int
    ops: list[Step] = field(default_factory=list)


def next_step(rng: random.Random, value: int) -> tuple[str, Step]:
    """Pick one operation that keeps the value in range. Returns (wording, step)."""
    while True:
        op = rng.choice(("add", "subtract", "multiply"))
        if op == "add":
            n = rng.randint(1, 9)
            if value + n <= MAX_VALUE:
                return f"add {n}", Step(value, "+", n, value + n)
        elif op == "subtract":
            n = rng.randint(1, 9)
            if value - n >= 0:
                return f"subtract {n}", Step(value, "-", n, value - n)
        else:
            n = rng.randint(2, 3)
            if value * n <= MAX_VALUE:
                return f"multiply by {n}", Step(value, "*", n, value * n)


def make_problem(rng: random.Random, min_steps: int, max_steps: int) -> Problem:
    steps = rng.randint(min_steps, max_steps)
    value = rng.randint(1, 30)
    wordings, ops = [], []
    start = value
    for _ in range(steps):
        wording, step = next_step(rng, value)
        wordings.append(wording)
        ops.append(step)
        value = step.result
    question = f"Start with {start}. " + ", then ".join(wordings).capitalize() + ". What is the result?"
    trace = "".join(step.line + "\n" for step in ops)
    return Problem(question=question, trace=trace, answer=value, steps=steps, ops=ops)


_INVERSE = {"+": "-", "-": "+", "*": "/"}
_WRONG_OP = {"+": "-", "-": "+", "*": "+"}


def redundant_trace(problem: Problem, redundancy: RedundancyConfig, rng: random.Random) -> str:
    """The trace with skippable lines: every operation line of the minimal trace is kept, in order, with the same
    result, so only lines around them can be cut without losing the answer."""
    ops = problem.ops
    lines = []
    if rng.random() < redundancy.restate:
        lines.append(f"goal: start at {ops[0].value}, do {len(ops)} steps, give the result")
    for i, step in enumerate(ops):
        if rng.random() < redundancy.branch:
            wrong = _WRONG_OP[step.op]
            tried = step.value + step.n if wrong == "+" else step.value - step.n
            lines.append(f"maybe {step.value} {wrong} {step.n} = {tried}? no, the step is {step.op} {step.n}")
        lines.append(step.line)
        if rng.random() < redundancy.recompute:
            lines.append(f"again: {step.line}")
        if rng.random() < redundancy.verify:  # undoing the step gives back the value it started from
            lines.append(f"check: {step.result} {_INVERSE[step.op]} {step.n} = {step.value}, ok")
        if i == len(ops) // 2 - 1 and len(ops) > 2 and rng.random() < redundancy.restate:
            lines.append(f"so far {step.result}, {len(ops) - i - 1} steps left")
    return "".join(line + "\n" for line in lines)


def answer_text(answer: int | str) -> str:
    return f"The result is \\boxed{{{answer}}}."


def problem_to_row(problem: Problem, row_id: str, split: str, reasoning_on: bool, trace: str | None = None) -> dict:
    """A row; `trace` (default: the minimal one) is the reference reasoning of a reasoning-on row."""
    trace = problem.trace if trace is None else trace
    messages = []
    if not reasoning_on:
        messages.append({"role": "system", "content": "/no_think"})
    messages.append({"role": "user", "content": problem.question})
    messages.append(
        {
            "role": "assistant",
            "content": answer_text(problem.answer),
            "reasoning_content": trace if reasoning_on else "",
        }
    )
    return {
        "id": row_id,
        "task": "math",
        "messages": messages,
        "answer": str(problem.answer),
        "metadata": {"steps": problem.steps, "reasoning": "on" if reasoning_on else "off", "split": split,
                     "minimal_trace": problem.trace},
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
            row_id = f"math-{split}-{len(rows):06d}"
            # Its own generator per row: the problems drawn are the same whatever the redundancy rates.
            trace = redundant_trace(problem, config.redundancy, random.Random(f"{config.seed}:{row_id}")) \
                if config.redundancy.any else None
            rows.append(problem_to_row(problem, row_id, split, reasoning_on, trace))
        splits[split] = rows
    return splits


@dataclass
class MathDataConfig:
    """The `align data` stage: write the synthetic splits as JSONL."""

    task: MathTaskConfig = field(default_factory=MathTaskConfig, metadata={"help": "Task generator settings."})
    tools: ToolTaskConfig = field(default_factory=ToolTaskConfig, metadata={
        "help": "Synthetic tool tasks (envs/tool_tasks.py) written as tools_<split>.jsonl; train_size 0: none."})
    preferences: bool = field(default=False, metadata={
        "help": "Also write preferences.jsonl (synthetic preference pairs of the train rows, for `align rm`; "
                "data_recipes/synthetic_preferences.py) and chat_rl.jsonl (the rl prompts as task: chat, for RLHF)."})
    preferences_trace_share: float = field(default=0.4, metadata={
        "help": "Share of the reasoning-on preference pairs whose rejected trace stops early or does one operation "
                "too many (the rest box another number than the trace's end)."})
    output_dir: str = field(default="runs/data/tiny", metadata={"help": "Where train/validation/test(/rl).jsonl go."})


def write_splits(config: MathDataConfig) -> dict[str, str]:
    """Generate and write the splits (atomically, one file each) plus a small manifest; returns the paths."""
    import json
    from pathlib import Path

    from alignment.data import write_rows

    if not 0.0 <= config.preferences_trace_share <= 1.0:
        raise ValueError(f"preferences_trace_share must be in [0, 1], got {config.preferences_trace_share}")
    out = Path(config.output_dir)
    splits = generate_splits(config.task)
    paths = {}
    for name, rows in splits.items():
        write_rows(out / f"{name}.jsonl", rows)
        paths[name] = str(out / f"{name}.jsonl")
    counts = {name: len(rows) for name, rows in splits.items()}
    off = sum(r["metadata"]["reasoning"] == "off" for r in splits["train"])
    if config.tools.train_size:
        for name, rows in generate_tool_splits(config.tools).items():
            if rows:
                write_rows(out / f"tools_{name}.jsonl", rows)
                paths[f"tools_{name}"] = str(out / f"tools_{name}.jsonl")
                counts[f"tools_{name}"] = len(rows)
    if config.preferences:
        from data_recipes.synthetic_preferences import preference_pairs

        extra = {"preferences": preference_pairs(splits["train"], config.task.seed,
                                                 config.preferences_trace_share),
                 "chat_rl": [dict(row, task="chat") for row in splits.get("rl", [])]}
        for name, rows in extra.items():
            write_rows(out / f"{name}.jsonl", rows)
            paths[name], counts[name] = str(out / f"{name}.jsonl"), len(rows)
    manifest = {"recipe": "synthetic_math", "config": {"task": dataclasses.asdict(config.task),
                                                       "tools": dataclasses.asdict(config.tools)},
                "rows": counts, "train_reasoning_off": off}
    (out / "manifest.json").write_text(json.dumps(manifest, indent=2))
    print(f"data: {counts} rows in {out} ({off} reasoning-off training rows)")
    return paths
