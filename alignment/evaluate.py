"""Held-out evaluation: accuracy with reasoning on and off, toggle compliance, and a sweep over thinking budgets.

Generation is batched through `alignment.rollout.generation`: greedy by default, or `samples_per_prompt` (k) samples
per prompt at each mode's temperature and top-p. For each (mode, budget) cell it reports accuracy (the final boxed
answer equals the reference; with k samples avg@k, the mean over prompts of the fraction correct), maj@k (the most
given answer is right) and pass@k (some sample is right), each with its standard error over prompts; the well-formed
rate, the mean and p90 thinking and answer lengths, and the generated tokens per correct answer.

A completion is well-formed when it ended on its own (end-of-turn token), has exactly one `</think>` in reasoning-on
mode and none in reasoning-off mode (the prefill already holds the empty think block), no `<think>` after the close,
an extractable `\\boxed{}` answer, and an answer part no longer than `max_answer_tokens` (a model whose thinking was
cut and that carries on reasoning in its answer fails this).

An early close is a reasoning-on trace the model closed itself in the middle of a line (or before writing anything):
what a trained `</think>` label after a mid-line cut could teach, while at inference only the budget rule cuts.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

import torch

from alignment.chat_format import (
    STATE_BUDGET_HELP, budget_is_stated, check_state_budget, completion_text, encode_prompt, state_budget,
    stop_token_ids, strip_switch,
)
from alignment.config import check_paths, option, to_dict
from alignment.eval_stats import (format_gain, majority_answer, mean_and_stderr, paired_gains, pass_at_k,
                                  sampling_stderr, with_stderr)
from alignment.rollout.generation import (DECODE_HELP, SSM_STATE_HELP, GenerationSettings, check_decode_keys, generate,
                                  line_end_token_ids)
from alignment.trackers import TrackingConfig, log_finished
from data_recipes.adapters.choice_sets import MULTIPLE_CHOICE
from envs.answers import THINK_CLOSE, THINK_OPEN, answer_part, answers_match, choice_letter, extract_boxed

log = logging.getLogger(__name__)


@dataclass
class EvalConfig:
    """What to evaluate and how to decode."""

    test_path: str = option(
        "runs/data/tiny/test.jsonl", "JSONL rows to evaluate on (prompt rows with `answer`).", path="file"
    )
    max_samples: int = option(300, "Evaluate on at most this many rows (the first ones); 0 means all.")
    budgets: list = option(
        [None], "Thinking budgets (tokens) to sweep in reasoning-on mode; null means unlimited."
    )
    max_new_tokens: int = option(192, "Most tokens generated per sample, trace and answer together.")
    max_answer_tokens: int = option(48, "An answer part longer than this is not well-formed.")
    grace_tokens: int = option(-1, "Grace window after the budget to finish the line; -1 uses grace_fraction.")
    grace_fraction: float = option(0.1, "Grace window as a fraction of the budget (NVIDIA's serving default).")
    batch_size: int = option(64, "Samples generated together.")
    max_bad_fraction: float = option(0.01, "Stop when more than this fraction of test_path's rows is bad (at 0.01 a "
                                           "file of under 100 rows stops at its first bad row).")
    decode: str = option("auto", DECODE_HELP)
    ssm_state_dtype: str = option("float32", SSM_STATE_HELP)
    samples_per_prompt: int = option(
        1, "Completions per prompt in every cell (k): accuracy is then avg@k, with maj@k and pass@k beside it.")
    temperature: float = option(0.0, "Sampling temperature with reasoning on; 0 is greedy (the model card: 0.6).")
    top_p: float = option(1.0, "Nucleus mass with reasoning on (the model card: 0.95).")
    temperature_no_think: float = option(0.0, "Sampling temperature with reasoning off (the model card: greedy).")
    top_p_no_think: float = option(1.0, "Nucleus mass with reasoning off.")
    seed: int = option(0, "Seed of the samples (each sample draws from its own stream, whatever its batch).")
    state_budget: str = option("auto", STATE_BUDGET_HELP)
    tool_test_path: str = option(
        "", "Tool tasks (rows with `tools` and a world in `metadata`, envs/tool_tasks.py) run as multi-turn episodes "
            "in the tool environment, with reasoning on and off: final-state success, exact calls and the "
            "hallucinated-tool rate go in eval.json under `tools`. Empty: none.", path="file")
    reward_model: str = option("", "An `align rm` checkpoint: the mean score it gives each model's completions "
                               "(reasoning on and off) joins the summary (rm_score_think, rm_score_no_think).",
                               path="reward_model")
    tool_max_samples: int = option(200, "Evaluate on at most this many tool rows (the first ones); 0 means all.")
    tool_max_turns: int = option(4, "Most assistant turns of a tool episode (calls and the answer).")

    def validate(self) -> None:
        for b in self.budgets:
            if b is not None and (not isinstance(b, int) or b < 0):
                raise ValueError(f"budgets must hold non-negative integers or null, got {b!r}")
        if self.max_new_tokens < 1 or self.batch_size < 1:
            raise ValueError("max_new_tokens and batch_size must be at least 1")
        if self.samples_per_prompt < 1:
            raise ValueError("samples_per_prompt must be at least 1")
        if self.samples_per_prompt > 1 and self.temperature == 0 and self.temperature_no_think == 0:
            raise ValueError("samples_per_prompt > 1 with temperature 0 in both modes gives k equal greedy "
                             "completions; set temperature (and temperature_no_think) above 0")
        for key in ("temperature", "temperature_no_think"):
            if getattr(self, key) < 0:
                raise ValueError(f"{key} must be >= 0")
        for key in ("top_p", "top_p_no_think"):
            if not 0 < getattr(self, key) <= 1:
                raise ValueError(f"{key} must be in (0, 1]")
        check_decode_keys(self.decode, self.ssm_state_dtype)
        check_state_budget(self.state_budget)
        if self.tool_max_turns < 1 or self.tool_max_samples < 0:
            raise ValueError("tool_max_turns must be at least 1 and tool_max_samples >= 0")

    def sampling(self, reasoning: bool) -> tuple[float, float]:
        """(temperature, top_p) of a mode."""
        return (self.temperature, self.top_p) if reasoning else (self.temperature_no_think, self.top_p_no_think)


def generation_settings(tokenizer, config: EvalConfig, temperature: float = 0.0, top_p: float = 1.0,
                        ) -> GenerationSettings:
    return GenerationSettings(
        max_new_tokens=config.max_new_tokens,
        temperature=temperature,
        top_p=top_p,
        eos_token_ids=stop_token_ids(tokenizer),
        pad_token_id=tokenizer.pad_token_id,
        think_end_ids=tokenizer(THINK_CLOSE, add_special_tokens=False)["input_ids"],
        line_end_ids=line_end_token_ids(tokenizer),
        grace_tokens=None if config.grace_tokens < 0 else config.grace_tokens,
        grace_fraction=config.grace_fraction,
        batch_size=config.batch_size,
        decode=config.decode,
        ssm_state_dtype=config.ssm_state_dtype,
    )


def judge(completion: str, reasoning: bool, finished: bool, answer_tokens: int, max_answer_tokens: int) -> dict:
    """Format checks of one completion (text after the prefill)."""
    closes = completion.count(THINK_CLOSE)
    answer = answer_part(completion, reasoning)  # an unclosed trace has no answer
    boxed = extract_boxed(answer)
    format_ok = closes == (1 if reasoning else 0) and THINK_OPEN not in answer
    return {
        "toggle_ok": format_ok and (not reasoning or bool(completion.split(THINK_CLOSE)[0].strip())),
        "well_formed": format_ok and finished and boxed is not None and answer_tokens <= max_answer_tokens,
        "boxed": boxed,
        "answer": answer,
    }


def row_answer(verdict: dict, row: dict) -> str | None:
    """What a completion answers: the letter it picks for a multiple-choice row, else its last boxed text."""
    if row.get("task") == MULTIPLE_CHOICE:
        choices = (row.get("metadata") or {}).get("choices")
        if not isinstance(choices, dict) or not choices:
            raise ValueError(f"row {row.get('id')!r}: a multiple_choice row needs metadata.choices (letter -> option)")
        return choice_letter(verdict["answer"], choices)
    return verdict["boxed"]


def answer_is_right(given: str | None, row: dict) -> bool:
    if given is None:
        return False
    if row.get("task") == MULTIPLE_CHOICE:
        return given == str(row["answer"]).strip().upper()
    return is_correct(given, str(row["answer"]))


def is_correct(boxed: str, reference: str) -> bool:
    """Exact match first (cheap), then symbolic equivalence through the `math` reward (math-verify)."""
    if answers_match(boxed, reference):
        return True
    from rewards.math_answer import math_answer

    try:
        return math_answer(f"\\boxed{{{boxed}}}", reference).score == 1.0
    except ValueError:  # an unparseable reference counts as not matched
        return False


Cell = tuple[bool, int | None]  # (reasoning on, thinking budget; None is unlimited)


@torch.no_grad()
def run_cells(model, tokenizer, rows: list[dict], cells: list[Cell], config: EvalConfig) -> list[dict]:
    """Generate k samples for every row in every (mode, budget) cell, and grade each cell.

    The cells whose modes decode alike go to one `generate` call, so the decoder's batches (or slots) stay full
    across cells, and the continuous engine prefills each prompt once for all the budgets it is evaluated at. There
    every sample draws from its own random stream (its cell, row and index), so sampled figures do not depend on the
    batching either (the other paths are reproducible for the same batches).
    """
    k = config.samples_per_prompt
    stated = budget_is_stated(tokenizer, config.state_budget)

    def prompt_of(cell: Cell) -> Cell:  # the cells whose prompts are the same text
        reasoning, budget = cell
        return reasoning, budget if stated and reasoning else None

    prompts = {key: [encode_prompt(tokenizer, state_budget(prompt_messages(row), key[1]), key[0]) for row in rows]
               for key in dict.fromkeys(map(prompt_of, cells))}
    calls: dict[tuple[float, float], list[int]] = {}  # (temperature, top_p) -> the cells decoded that way
    for i, (reasoning, _) in enumerate(cells):
        calls.setdefault(config.sampling(reasoning), []).append(i)
    graded: dict[int, dict] = {}
    for (temperature, top_p), members in calls.items():
        settings = generation_settings(tokenizer, config, temperature, top_p)
        order = [(i, r, j) for i in members for r in range(len(rows)) for j in range(k)]  # cell, row, sample
        results = generate(
            model, [prompts[prompt_of(cells[i])][r] for i, r, _ in order], settings=settings,
            budgets=[cells[i][1] for i, _, _ in order], reasoning=[cells[i][0] for i, _, _ in order],
            seed=config.seed, stream_ids=[(i * len(rows) + r) * k + j for i, r, j in order],
        )
        per_cell = len(rows) * k
        for m, i in enumerate(members):
            reasoning, budget = cells[i]
            graded[i] = grade_cell(tokenizer, rows, results[m * per_cell : (m + 1) * per_cell], reasoning, budget,
                                   settings, config)
    return [graded[i] for i in range(len(cells))]


def run_cell(model, tokenizer, rows: list[dict], reasoning: bool, budget: int | None, config: EvalConfig) -> dict:
    """`run_cells` for one mode and budget."""
    return run_cells(model, tokenizer, rows, [(reasoning, budget)], config)[0]


def grade_cell(tokenizer, rows: list[dict], results: list, reasoning: bool, budget: int | None,
               settings: GenerationSettings, config: EvalConfig) -> dict:
    """One cell's figures from its rows' generations (`samples_per_prompt` consecutive results per row)."""
    think_end = set(settings.think_end_ids)
    k = config.samples_per_prompt
    records = []
    for index, result in enumerate(results):
        row = rows[index // k]
        text = completion_text(tokenizer, result.tokens)
        body = result.tokens[:-1] if result.finished else result.tokens
        close_at = next((i for i, t in enumerate(body) if t in think_end), -1)
        answer_tokens = len(body) - close_at - 1
        early_close = reasoning and not result.forced_close and close_at >= 0 and \
            (close_at == 0 or body[close_at - 1] not in settings.line_end_ids)
        verdict = judge(text, reasoning, result.finished, answer_tokens, config.max_answer_tokens)
        given = row_answer(verdict, row)
        records.append({
            "id": row.get("id"),
            "boxed": given,
            "correct": answer_is_right(given, row),
            "well_formed": verdict["well_formed"],
            "toggle_ok": verdict["toggle_ok"],
            "thinking_tokens": result.thinking_tokens,
            "answer_tokens": answer_tokens,
            "forced_close": result.forced_close,
            "early_close": early_close,
            "completion": text,
        })
    n = len(records)
    per_row = [records[r * k : (r + 1) * k] for r in range(len(rows))]
    fractions = [sum(s["correct"] for s in samples) / k for samples in per_row]  # k = 1: 0 or 1
    passed = [pass_at_k(k, sum(s["correct"] for s in samples), k) for samples in per_row]
    majority = []
    for row, samples in zip(rows, per_row):
        voted = majority_answer([s["boxed"] for s in samples], answers_match)
        majority.append(float(answer_is_right(voted, row)))
    generated = sum(r["thinking_tokens"] + r["answer_tokens"] for r in records)
    n_correct = sum(r["correct"] for r in records)
    return {
        "reasoning": reasoning,
        "budget": budget,
        "completions": [r["completion"] for r in records],  # for eval.reward_model; not written to eval.json
        "samples_per_prompt": k,
        "temperature": settings.temperature,
        "top_p": settings.top_p,
        "accuracy": sum(fractions) / len(rows),  # avg@k
        "accuracy_stderr": mean_and_stderr(fractions)[1],
        "accuracy_sampling_stderr": sampling_stderr(fractions, k),
        "maj_at_k": sum(majority) / len(rows),
        "maj_at_k_stderr": mean_and_stderr(majority)[1],
        "pass_at_k": sum(passed) / len(rows),
        "pass_at_k_stderr": mean_and_stderr(passed)[1],
        "tokens_per_correct": generated / n_correct if n_correct else None,
        "p90_thinking_tokens": _quantile([r["thinking_tokens"] for r in records], 0.9),
        "p90_answer_tokens": _quantile([r["answer_tokens"] for r in records], 0.9),
        "correct": fractions,  # per row, in row order: paired comparisons between models on the same rows
        "well_formed": sum(r["well_formed"] for r in records) / n,
        # What a client that reads the answer after `</think>` strictly gets: correct and well-formed.
        "accuracy_well_formed": sum(r["correct"] and r["well_formed"] for r in records) / n,
        "toggle_compliance": sum(r["toggle_ok"] for r in records) / n,
        "mean_thinking_tokens": sum(r["thinking_tokens"] for r in records) / n,
        "mean_answer_tokens": sum(r["answer_tokens"] for r in records) / n,
        "forced_fraction": sum(r["forced_close"] for r in records) / n,
        "early_close_rate": sum(r["early_close"] for r in records) / n,
        "examples": records[:3],
    }


def _quantile(values: list[int], q: float) -> float:
    """The q-quantile, linear between the order statistics (numpy's default)."""
    ordered = sorted(values)
    position = q * (len(ordered) - 1)
    low = int(position)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


def prompt_messages(row: dict) -> list[dict]:
    """A row's conversation up to (not including) its reference assistant turn, without any reasoning switch."""
    messages = row["messages"][:-1] if row["messages"][-1]["role"] == "assistant" else row["messages"]
    return strip_switch(messages)


def reference_fits(tokenizer, rows: list[dict], budgets: list[int | None], config: EvalConfig,
                   minimal: bool = False) -> list[float | None]:
    """Per budget, the share of rows whose reference trace ends within it plus its grace window (None: the rows
    carry no reference traces). `minimal`: the row's `metadata.minimal_trace` (the steps alone) instead.

    A model that needs a trace as long as the reference's cannot do better than this at that budget; accuracy above
    it comes from answering without finishing the trace (or from leaving out what the minimal trace does not need).
    """
    if minimal:
        traces = [(row.get("metadata") or {}).get("minimal_trace") for row in rows]
    else:
        traces = [row["messages"][-1].get("reasoning_content") for row in rows
                  if row["messages"][-1]["role"] == "assistant"]
    lengths = [len(tokenizer(t, add_special_tokens=False)["input_ids"]) for t in traces if t]
    if not lengths:
        return [None] * len(budgets)
    grace_window = generation_settings(tokenizer, config).grace_window
    return [1.0 if b is None else sum(n <= b + grace_window(b) for n in lengths) / len(lengths) for b in budgets]


# Figures of a cell beyond its accuracy: what k samples per prompt add, and the cost of a correct answer.
SAMPLED_KEYS = ("accuracy_sampling_stderr", "maj_at_k", "maj_at_k_stderr", "pass_at_k", "pass_at_k_stderr",
                "tokens_per_correct", "p90_thinking_tokens", "p90_answer_tokens")


def _mode_key(key: str, mode: str) -> str:
    """A cell's key in the summary, per mode, its standard error last: maj_at_k_stderr -> maj_at_k_think_stderr."""
    if key == "accuracy_sampling_stderr":
        return f"accuracy_{mode}_sampling_stderr"
    if key.endswith("_stderr"):
        return f"{key.removesuffix('_stderr')}_{mode}_stderr"
    return f"{key}_{mode}"


def evaluate_model(model, tokenizer, rows: list[dict], config: EvalConfig) -> dict:
    """Reasoning on (unlimited), reasoning off, and the budget sweep. Returns the summary `metrics.json` uses."""
    if config.max_samples:
        rows = rows[: config.max_samples]
    was_training = model.training
    model.eval()
    cells = [(True, None), (False, None)] + [(True, b) for b in dict.fromkeys(config.budgets) if b is not None]
    graded = dict(zip(cells, run_cells(model, tokenizer, rows, cells, config)))
    think, no_think = graded[(True, None)], graded[(False, None)]
    sweep = [graded[(True, b)] for b in config.budgets]
    model.train(was_training)
    summary = {
        "samples": len(rows),
        "row_ids": [row.get("id", i) for i, row in enumerate(rows)],
        "accuracy_think": think["accuracy"],
        "accuracy_think_stderr": think["accuracy_stderr"],
        "accuracy_no_think": no_think["accuracy"],
        "accuracy_no_think_stderr": no_think["accuracy_stderr"],
        "correct_think": think["correct"],
        "correct_no_think": no_think["correct"],
        "toggle_compliance": min(think["toggle_compliance"], no_think["toggle_compliance"]),
        "toggle_compliance_think": think["toggle_compliance"],
        "toggle_compliance_no_think": no_think["toggle_compliance"],
        "well_formed_think": think["well_formed"],
        "well_formed_no_think": no_think["well_formed"],
        "mean_thinking_tokens": think["mean_thinking_tokens"],
        "early_close_think": think["early_close_rate"],
        "samples_per_prompt": config.samples_per_prompt,
        **{_mode_key(key, mode): cell[key] for mode, cell in (("think", think), ("no_think", no_think))
           for key in SAMPLED_KEYS},
        "budget_sweep": [
            {**{k: cell[k] for k in ("budget", "accuracy", "accuracy_stderr", "well_formed", "accuracy_well_formed",
                                     "mean_thinking_tokens", "mean_answer_tokens", "forced_fraction",
                                     "early_close_rate", "correct", *SAMPLED_KEYS)},
             "reference_fits": fits, "minimal_fits": minimal_fits}
            for cell, fits, minimal_fits in zip(sweep, reference_fits(tokenizer, rows, config.budgets, config),
                                                reference_fits(tokenizer, rows, config.budgets, config, minimal=True))
        ],
        "examples": {"think": think["examples"], "no_think": no_think["examples"]},
    }
    if config.tool_test_path:
        summary["tools"] = evaluate_tools(model, tokenizer, config)
    if config.reward_model:
        summary |= reward_model_scores(rows, {"think": think, "no_think": no_think}, config,
                                       str(next(model.parameters()).device))
    log.info(
        "eval on %d rows: accuracy think %.3f / no-think %.3f, toggle compliance %.3f",
        len(rows), summary["accuracy_think"], summary["accuracy_no_think"], summary["toggle_compliance"],
    )
    return summary


TOOL_KEYS = ("success", "exact_calls", "hallucinated", "malformed", "bad_arguments")


@torch.no_grad()
def evaluate_tools(model, tokenizer, config: EvalConfig) -> dict:
    """Tool episodes on `tool_test_path`, reasoning on and off: the rate of each outcome, with standard errors.

    success: the final world is the target and the answer right, with no bad call; exact_calls: every turn's calls
    are the reference's; hallucinated: some call named a tool the row does not offer (per episode).
    """
    from alignment.data import read_rows

    rows, _ = read_rows(config.tool_test_path, "prompt", config.max_bad_fraction)
    rows = rows[: config.tool_max_samples or None]
    was_training = model.training
    model.eval()
    summary: dict = {"rows": len(rows), "path": config.tool_test_path, "examples": {}}
    for mode, reasoning in (("think", True), ("no_think", False)):
        episodes = tool_episodes(model, tokenizer, rows, config, reasoning)
        outcomes = [episode.outcome() for episode in episodes]
        for key in TOOL_KEYS:
            summary[f"{key}_{mode}"], summary[f"{key}_{mode}_stderr"] = mean_and_stderr(
                [float(getattr(o, key)) for o in outcomes])
        summary[f"mean_turns_{mode}"] = sum(len(e.turns) for e in episodes) / len(episodes)
        summary[f"row_success_{mode}"] = [int(o.success) for o in outcomes]  # for gains paired over the rows
        summary["examples"][mode] = [{"id": e.row.get("id"), "turns": e.turn_texts, "ended": e.ended,
                                      "success": o.success, "reason": o.reason} for e, o in zip(episodes[:4], outcomes)]
    model.train(was_training)
    log.info("tool episodes on %d rows: success think %.3f / no-think %.3f, hallucinated tools %.3f / %.3f",
             len(rows), summary["success_think"], summary["success_no_think"], summary["hallucinated_think"],
             summary["hallucinated_no_think"])
    return summary


def reward_model_scores(rows: list[dict], cells: dict[str, dict], config: EvalConfig, device: str) -> dict:
    """The mean score `eval.reward_model` gives the completions of each mode (per row too, for paired gains), on
    the evaluated model's device."""
    from alignment.dpo import completion_message
    from rewards.reward_model import load_cached

    rm, tokenizer = load_cached(config.reward_model, device)
    k = config.samples_per_prompt
    figures = {}
    for mode, cell in cells.items():
        conversations = [prompt_messages(rows[i // k]) + [completion_message(text, mode == "think")]
                         for i, text in enumerate(cell["completions"])]
        scores = rm.score(tokenizer, conversations)
        per_row = [sum(scores[r * k:(r + 1) * k]) / k for r in range(len(rows))]
        figures[f"rm_score_{mode}"], figures[f"rm_score_{mode}_stderr"] = mean_and_stderr(per_row)
        figures[f"row_rm_score_{mode}"] = per_row
    log.info("reward model %s: mean score think %.3f / no-think %.3f", config.reward_model,
             figures["rm_score_think"], figures["rm_score_no_think"])
    return figures


def tool_episodes(model, tokenizer, rows: list[dict], config: EvalConfig, reasoning: bool) -> list:
    """The evaluation's episodes of tool tasks `rows` in one reasoning mode (its decoding settings and seed)."""
    from alignment.rollout.episodes import run_episodes

    settings = generation_settings(tokenizer, config, *config.sampling(reasoning))
    return run_episodes(model, tokenizer, rows, [reasoning] * len(rows), settings, config.tool_max_turns,
                        seed=config.seed)


def tools_report(results: dict[str, dict]) -> list[str]:
    """The tool-episode table of the report (models evaluated with eval.tool_test_path only)."""
    with_tools = {name: s["tools"] for name, s in results.items() if s.get("tools")}
    if not with_tools:
        return []
    lines = ["", "## Tool calling (multi-turn episodes in the tool environment)", "",
             "Rates per episode, one standard error after ±. Success: the final world is the target and the answer "
             "right, with no bad call.", "",
             "| model | rows | success think | success no-think | exact calls think | hallucinated tool think | "
             "hallucinated tool no-think | malformed think |", "|---|---|---|---|---|---|---|---|"]
    for name, t in with_tools.items():
        lines.append(f"| {name} | {t['rows']} | {with_stderr(t, 'success_think')} | {with_stderr(t, 'success_no_think')} | "
                     f"{with_stderr(t, 'exact_calls_think')} | {with_stderr(t, 'hallucinated_think')} | "
                     f"{with_stderr(t, 'hallucinated_no_think')} | {with_stderr(t, 'malformed_think')} |")
    return lines


def budget_label(budget: int | None) -> str:
    return "unlimited" if budget is None else str(budget)



# ---------------------------------------------------------------------------------------------------------------
# `align eval CHECKPOINT [CHECKPOINT ...]`: the budget sweep on one or several checkpoints, with a plot and a report.

DEFAULT_SWEEP = [0, 8, 16, 32, 64, 128, None]


# Benchmark names `sets` knows, and the schema of their released files (data_recipes/adapters).
NAMED_SETS = {"math500": "math", "aime24": "aime", "aime25": "aime", "gsm8k": "gsm8k", "gpqa": "gpqa",
              "gpqa_diamond": "gpqa"}
CODE_SCHEMAS = ("humaneval", "livecodebench", "mbpp")


@dataclass(frozen=True)
class EvalSet:
    name: str
    schema: str
    path: str


def parse_sets(entries: list[str]) -> list[EvalSet]:
    """`NAME=PATH` (a name of NAMED_SETS reads its released schema, any other name the project's rows) or
    `NAME:SCHEMA=PATH`; errors name the `sets` key and the entry."""
    from data_recipes.adapters import schema_names

    sets = []
    for entry in entries:
        label, sep, path = str(entry).partition("=")
        name, _, schema = label.partition(":")
        if not sep or not name.strip() or not path.strip():
            raise ValueError(f"sets: {entry!r} is not NAME=PATH or NAME:SCHEMA=PATH")
        schema = schema.strip() or NAMED_SETS.get(name.strip(), "rows")
        if schema in CODE_SCHEMAS:
            raise ValueError(f"sets: {entry!r} is a code set; align eval grades math answers and multiple-choice "
                             "letters (code sets train and score through GRPO's code_tests reward)")
        if schema not in schema_names():
            raise ValueError(f"sets: {entry!r}: unknown schema {schema!r}; known: {schema_names()}")
        sets.append(EvalSet(name.strip(), schema, path.strip()))
    if len({s.name for s in sets}) != len(sets):
        raise ValueError(f"sets: a name is given twice in {entries}")
    return sets


@dataclass
class EvalRunConfig:
    """Evaluation of saved checkpoints."""

    eval: EvalConfig = option(EvalConfig(budgets=list(DEFAULT_SWEEP)), "What to evaluate and how to decode.")
    sets: list = option(
        [], "Named benchmark sets, NAME=PATH (math500, aime24, aime25, gsm8k, gpqa, gpqa_diamond read their "
            "released schema; other names the project's rows) or NAME:SCHEMA=PATH; eval.test_path is then unused. "
            "On the command line: --sets math500=PATH,gpqa=PATH.",
    )
    output_dir: str = option("runs/tiny/eval", "Where eval.json, accuracy_vs_budget.png and report.md go.")
    device: str = option("auto", "cpu, cuda, cuda:N or auto.")
    tracking: TrackingConfig = option(TrackingConfig(), "Experiment trackers: each model's figures, the plot and "
                                                        "eval.json go to wandb, mlflow, trackio (tensorboard: none).")

    def validate(self) -> None:
        parse_sets(self.sets)

    def unused_paths(self) -> tuple[str, ...]:
        return ("eval.test_path",) if self.sets else ()


def efficiency_points(summary: dict) -> list[tuple[float, float, float, str]]:
    """(mean generated tokens, accuracy, its standard error, budget label) of each reasoning-on budget, by tokens.

    Generated tokens are the trace and the answer together: what a budget costs at inference. Read left to right,
    the points are the accuracy a model buys with more tokens (its efficiency frontier).
    """
    points = [(c["mean_thinking_tokens"] + c["mean_answer_tokens"], c["accuracy"], c.get("accuracy_stderr") or 0.0,
               budget_label(c["budget"])) for c in summary["budget_sweep"]]
    return sorted(points)


def plot_budget_sweep(results: dict[str, dict], path) -> None:
    """Accuracy and well-formed rate against thinking budget, and accuracy against generated tokens, per model."""
    try:
        import matplotlib
    except ImportError:  # a dependency, but a stripped-down GPU image may lack it: the figures are in eval.json
        log.warning("matplotlib not installed; no plot written")
        return

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    first = next(iter(results.values()))["budget_sweep"]
    if all(c.get("reference_fits") is not None for c in first):
        axes[0].plot(range(len(first)), [c["reference_fits"] for c in first], linestyle="--", color="gray",
                     label="reference trace fits the budget")
    if all(c.get("minimal_fits") is not None for c in first) and \
            [c["minimal_fits"] for c in first] != [c.get("reference_fits") for c in first]:
        axes[0].plot(range(len(first)), [c["minimal_fits"] for c in first], linestyle=":", color="gray",
                     label="minimal trace (steps alone) fits")
    for name, summary in results.items():
        sweep = summary["budget_sweep"]
        labels = [budget_label(c["budget"]) for c in sweep]
        errors = [c.get("accuracy_stderr") or 0.0 for c in sweep]  # one standard error over the rows
        axes[0].errorbar(range(len(sweep)), [c["accuracy"] for c in sweep], yerr=errors, marker="o", capsize=3,
                         label=name)
        axes[1].plot(range(len(sweep)), [c["well_formed"] for c in sweep], marker="o", label=name)
        for ax in axes[:2]:
            ax.set_xticks(range(len(sweep)), labels)
        tokens, accuracy, stderr, _ = zip(*efficiency_points(summary))
        axes[2].errorbar(tokens, accuracy, yerr=stderr, marker="o", capsize=3, label=name)
    for ax, title in zip(axes, ("accuracy (bars: one standard error)", "well-formed rate",
                                "accuracy against generated tokens, one point per budget")):
        ax.set_xlabel("thinking budget (tokens)")
        ax.set_title(title, fontsize=10)
        ax.set_ylim(-0.02, 1.02)
        ax.grid(alpha=0.3)
    axes[2].set_xlabel("mean generated tokens (trace + answer)")
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def markdown_report(results: dict[str, dict]) -> str:
    gains = paired_gains(results)
    lines = ["# Evaluation", "", "One standard error after ±, over the rows. Gain: accuracy (reasoning on) minus the "
             "model above, paired over the same rows.", "",
             "| model | accuracy think | gain over the one above | accuracy no-think | toggle compliance | "
             "mean thinking tokens |", "|---|---|---|---|---|---|"]
    for name, s in results.items():
        lines.append(f"| {name} | {with_stderr(s, 'accuracy_think')} | {format_gain(gains.get(name))} | "
                     f"{with_stderr(s, 'accuracy_no_think')} | {s['toggle_compliance']:.3f} | "
                     f"{s['mean_thinking_tokens']:.1f} |")
    sampled = {name: s for name, s in results.items() if s.get("samples_per_prompt", 1) > 1}
    if sampled:
        lines += ["", "With k samples per prompt, accuracy above is avg@k; its standard error over the rows includes "
                  "the sampling's, shown alone in brackets.", "",
                  "| model | k | avg@k think | maj@k think | pass@k think | avg@k no-think | tokens per correct "
                  "answer (think) |", "|---|---|---|---|---|---|---|"]
        for name, s in sampled.items():
            per_correct = s.get("tokens_per_correct_think")
            lines.append(f"| {name} | {s['samples_per_prompt']} | {with_stderr(s, 'accuracy_think')} "
                         f"({s['accuracy_think_sampling_stderr']:.3f}) | {with_stderr(s, 'maj_at_k_think')} | "
                         f"{with_stderr(s, 'pass_at_k_think')} | {with_stderr(s, 'accuracy_no_think')} | "
                         f"{'-' if per_correct is None else f'{per_correct:.1f}'} |")
    lines += tools_report(results)
    lines += ["", "## Accuracy / well-formed rate across thinking budgets", "",
              "![accuracy vs budget](accuracy_vs_budget.png)", ""]
    for name, s in results.items():
        lines += [f"### {name}", "", "| budget | accuracy | well-formed | correct and well-formed | thinking tokens | "
                  "answer tokens | forced | reference trace fits | minimal trace fits |",
                  "|---|---|---|---|---|---|---|---|---|"]
        for c in s["budget_sweep"]:
            fits = "-" if c.get("reference_fits") is None else f"{c['reference_fits']:.3f}"
            minimal = "-" if c.get("minimal_fits") is None else f"{c['minimal_fits']:.3f}"
            strict = "-" if c.get("accuracy_well_formed") is None else f"{c['accuracy_well_formed']:.3f}"
            lines.append(f"| {budget_label(c['budget'])} | {with_stderr(c, 'accuracy')} | {c['well_formed']:.3f} | "
                         f"{strict} | {c['mean_thinking_tokens']:.1f} | {c['mean_answer_tokens']:.1f} | "
                         f"{c['forced_fraction']:.2f} | {fits} | {minimal} |")
        lines.append("")
    return "\n".join(lines)


def model_label(checkpoint: str, taken) -> str:
    """runs/x/sft/checkpoint -> "sft"; the whole path when that name is taken already."""
    path = Path(checkpoint)
    name = path.parent.name if path.name == "checkpoint" else path.name
    return checkpoint if name in taken else name


def load_checkpoint(checkpoint: str, device):
    """(model, tokenizer) of a checkpoint `align eval` names, verified first."""
    from alignment.checkpoint import verify_checkpoint
    from alignment.modeling import ModelConfig, load_model, load_tokenizer

    verify_checkpoint(checkpoint)
    model_config = ModelConfig(name_or_path=checkpoint)
    tokenizer = load_tokenizer(model_config)  # seconds, before minutes of model loading
    return load_model(model_config, device), tokenizer


def figures_of(results: dict[str, dict], prefix: str = "") -> dict:
    """Each model's summary flattened for the trackers: {"<prefix><model>/<key>": value}."""
    return {f"{prefix}{name}/{key}": value for name, summary in results.items() for key, value in summary.items()}


def run_eval_sets(checkpoints: list[str], config: EvalRunConfig, device) -> dict:
    """Every checkpoint on every named set: eval.json holds each set's source and settings, and every result."""
    from data_recipes.adapters import load_dataset_rows

    sets = parse_sets(config.sets)
    rows = {}
    for s in sets:  # before any model loads: a missing file fails in seconds
        try:
            rows[s.name] = load_dataset_rows(s.path, s.schema, max_bad_fraction=config.eval.max_bad_fraction)
        except FileNotFoundError as error:
            raise FileNotFoundError(f"sets: {s.name}: {error}") from error
    results: dict[str, dict[str, dict]] = {s.name: {} for s in sets}
    for checkpoint in checkpoints:
        model, tokenizer = load_checkpoint(checkpoint, device)
        label = model_label(checkpoint, results[sets[0].name])
        for s in sets:
            log.info("eval: %s on %s (%d rows, schema %s)", label, s.name, len(rows[s.name]), s.schema)
            results[s.name][label] = evaluate_model(model, tokenizer, rows[s.name], config.eval)
    record = {
        "sets": {s.name: {"path": s.path, "schema": s.schema, "rows": len(rows[s.name]),
                          "rows_evaluated": min(len(rows[s.name]), config.eval.max_samples or len(rows[s.name])),
                          "settings": to_dict(config.eval) | {"test_path": None}} for s in sets},
        "results": results,
    }
    out = Path(config.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "eval.json").write_text(json.dumps(record, indent=2))
    plots = [out / f"accuracy_vs_budget_{s.name}.png" for s in sets]
    for s, plot in zip(sets, plots):
        plot_budget_sweep(results[s.name], plot)
    (out / "report.md").write_text(sets_report(record))
    figures = {}
    for set_name, by_model in results.items():
        figures |= figures_of(by_model, f"{set_name}/")
    log_finished(config.tracking, "eval", out, to_dict(config), figures, [*plots, out / "eval.json", out / "report.md"])
    print(f"eval: {out / 'eval.json'}\nreport: {out / 'report.md'}")
    return record


def sets_report(record: dict) -> str:
    """One table across the sets: each model's accuracy with reasoning on and off, one standard error after ±."""
    names = list(record["sets"])
    models = list(next(iter(record["results"].values())))
    lines = ["# Evaluation on named sets", "", "One standard error after ±, over the rows of the set.", "",
             "| model | " + " | ".join(f"{n} think | {n} no-think" for n in names) + " |",
             "|---|" + "---|---|" * len(names)]
    for model in models:
        cells = []
        for name in names:
            summary = record["results"][name][model]
            cells += [with_stderr(summary, "accuracy_think"), with_stderr(summary, "accuracy_no_think")]
        lines.append(f"| {model} | " + " | ".join(cells) + " |")
    lines += ["", "| set | schema | rows | evaluated | source |", "|---|---|---|---|---|"]
    for name, info in record["sets"].items():
        lines.append(f"| {name} | {info['schema']} | {info['rows']} | {info['rows_evaluated']} | `{info['path']}` |")
    return "\n".join(lines) + "\n"


def run_eval(checkpoints: list[str], config: EvalRunConfig) -> dict[str, dict]:
    from alignment.data import read_rows
    from alignment.runtime import pick_device, setup_logging

    setup_logging()
    check_paths(config)
    device = pick_device(config.device)
    if config.sets:
        return run_eval_sets(checkpoints, config, device)
    rows, _ = read_rows(config.eval.test_path, "prompt", config.eval.max_bad_fraction)
    results: dict[str, dict] = {}
    for checkpoint in checkpoints:
        model, tokenizer = load_checkpoint(checkpoint, device)
        results[model_label(checkpoint, results)] = evaluate_model(model, tokenizer, rows, config.eval)
    out = Path(config.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "eval.json").write_text(json.dumps(results, indent=2))
    plot_budget_sweep(results, out / "accuracy_vs_budget.png")
    (out / "report.md").write_text(markdown_report(results))
    log_finished(config.tracking, "eval", out, to_dict(config), figures_of(results),
                 [out / "accuracy_vs_budget.png", out / "eval.json", out / "report.md"])
    print(f"eval: {out / 'eval.json'}\nplot: {out / 'accuracy_vs_budget.png'}\nreport: {out / 'report.md'}")
    return results
