"""The `align` command: one subcommand per stage, each taking a YAML config and `key=value` overrides.

    align data configs/tiny/data.yaml
    align sft configs/tiny/sft.yaml train.max_steps=100
    align eval runs/tiny/sft/checkpoint
    align rewards list
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import shutil
import sys
from pathlib import Path
from typing import Callable, Iterator

from alignment.config import DATA_PARALLEL_STAGES, ConfigError, describe_fields, load_config


def _fields_help(config_cls: type) -> str:
    lines = ["config keys (set in the YAML file or as key=value):"]
    for key, type_name, default, help_text in describe_fields(config_cls):
        lines.append(f"  {key} ({type_name}, default {default})\n      {help_text}")
    return "\n".join(lines)


WORKER_KEYS_HELP = """
  num_workers (int, default 0)
      Data-parallel Ray Train workers on a local Ray (or the cluster in RAY_ADDRESS); 0 runs in this process.
  gpus_per_worker (float, default 0)
      With num_workers: 1 runs each worker on its own GPU (NCCL); 0 on CPUs (gloo)."""


def _worker_keys(stage: str, overrides: list[str]) -> tuple[list[str], dict[str, float]]:
    """Split the `num_workers=` / `gpus_per_worker=` keys (how to run the stage) from the config overrides."""
    workers, rest = {"num_workers": 0.0, "gpus_per_worker": 0.0}, []
    for item in overrides:
        key, _, value = item.partition("=")
        if key in workers:
            if stage not in DATA_PARALLEL_STAGES:
                raise ConfigError(f"{key}: only {', '.join(DATA_PARALLEL_STAGES)} run on several workers")
            try:
                workers[key] = float(value)
            except ValueError:
                raise ConfigError(f"{key}={value!r}: expected a number") from None
        else:
            rest.append(item)
    return rest, workers


def _add_stage(subparsers, name: str, help_text: str, config_cls: type, run: Callable, config_optional: bool = False):
    epilog = _fields_help(config_cls) + (WORKER_KEYS_HELP if name in DATA_PARALLEL_STAGES else "")
    parser = subparsers.add_parser(
        name, help=help_text, description=help_text, epilog=epilog,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("config", nargs="?" if config_optional else None, help="YAML config file.")
    parser.add_argument("overrides", nargs="*", help="key=value overrides, dotted keys for sections.")

    def handler(args) -> int:
        overrides, workers = _worker_keys(name, args.overrides)
        config = load_config(config_cls, args.config, overrides)
        with _removed_if_left_empty(config.output_dir):
            if workers["num_workers"] > 0:
                from alignment.distributed import connect_ray, run_data_parallel

                connect_ray()
                run_data_parallel(run, config, int(workers["num_workers"]), use_gpu=workers["gpus_per_worker"] > 0,
                                  name=name)
            else:
                run(config)
        return 0

    parser.set_defaults(func=handler)


def _eval_command(subparsers, help_text: str) -> None:
    from alignment.evaluate import EvalRunConfig, run_eval

    parser = subparsers.add_parser(
        "eval", help=help_text, description=help_text, epilog=_fields_help(EvalRunConfig),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("checkpoints", nargs="+", help="Checkpoint directories, then optional key=value overrides.")
    parser.add_argument("--config", help="YAML config file for the evaluation.")
    parser.add_argument("--sets", help="Named benchmark sets, comma-separated NAME=PATH (or NAME:SCHEMA=PATH): "
                                       "math500=data/math500.jsonl,gpqa=data/gpqa_diamond.csv")

    def handler(args) -> int:
        checkpoints = [c for c in args.checkpoints if "=" not in c]
        overrides = [c for c in args.checkpoints if "=" in c]
        config = load_config(EvalRunConfig, args.config, overrides)
        if args.sets:
            config.sets = [entry.strip() for entry in args.sets.split(",") if entry.strip()]
            config.validate()
        with _removed_if_left_empty(config.output_dir):
            run_eval(checkpoints, config)
        return 0

    parser.set_defaults(func=handler)


def _budget_report_command(subparsers, help_text: str) -> None:
    parser = subparsers.add_parser("budget-report", help=help_text, description=help_text)
    parser.add_argument("eval_dirs", nargs="+", help="Each seed's `align eval` output directory (its eval.json).")
    parser.add_argument("--out", required=True, help="Where budget_study.json, report.md and budget_curve.png go.")

    def handler(args) -> int:
        from alignment.budget_study import write_budget_report

        write_budget_report(args.eval_dirs, args.out)
        return 0

    parser.set_defaults(func=handler)


def _merge_command(subparsers, help_text: str) -> None:
    parser = subparsers.add_parser("merge", help=help_text, description=help_text)
    parser.add_argument("checkpoint_a", help="Checkpoint A (alpha 0 gives it back).")
    parser.add_argument("checkpoint_b", help="Checkpoint B, the same architecture (alpha 1 gives it back).")
    parser.add_argument("--out", required=True, help="Output checkpoint (with --alphas: a folder of merges).")
    parser.add_argument("--alpha", type=float, default=0.5, help="The weight of B (default 0.5).")
    parser.add_argument("--alphas", help="A sweep, e.g. 0.25,0.5,0.75: a merge at each, then A, the merges and B "
                                         "evaluated with --eval-config and plotted against alpha.")
    parser.add_argument("--eval-config", default="configs/tiny/eval.yaml", help="align eval config of the sweep.")
    parser.add_argument("overrides", nargs="*", help="key=value overrides of the sweep's eval config.")

    def handler(args) -> int:
        from alignment.merge import MergeError, merge_checkpoints, merge_sweep
        from alignment.runtime import setup_logging

        setup_logging()
        if not args.alphas:
            if args.overrides:
                raise MergeError(f"{' '.join(args.overrides)}: eval overrides need --alphas")
            print(merge_checkpoints(args.checkpoint_a, args.checkpoint_b, args.alpha, args.out))
            return 0
        try:
            alphas = [float(x) for x in args.alphas.split(",")]
        except ValueError as exc:
            raise MergeError(f"--alphas {args.alphas}: comma-separated numbers in [0, 1] ({exc})") from exc
        result = merge_sweep(args.checkpoint_a, args.checkpoint_b, alphas, args.out, args.eval_config, args.overrides)
        print(f"sweep: {Path(args.out) / 'merge_sweep.json'}, plot: {result['plot']}")
        return 0

    parser.set_defaults(func=handler)


def _export_command(subparsers, help_text: str) -> None:
    parser = subparsers.add_parser("export", help=help_text, description=help_text)
    parser.add_argument("checkpoint", help="A stage's checkpoint folder.")
    parser.add_argument("--out", required=True, help="Output folder.")
    parser.add_argument("--adapter", action="store_true", help="The LoRA adapter alone (a stage run with "
                                                               "lora.enabled=true), instead of the full weights.")
    parser.add_argument("--base", help="With --adapter: the base model's name to record (e.g. its hub id), instead "
                                       "of the local path the stage trained from.")
    parser.add_argument("--max-shard-size", default="5GB", help="Largest safetensors shard of the full weights.")
    parser.add_argument("--eval", help="eval.json for the model card (default: the one beside the checkpoint).")

    def handler(args) -> int:
        from alignment.export import export_checkpoint
        from alignment.runtime import setup_logging

        setup_logging()
        print(export_checkpoint(args.checkpoint, args.out, adapter=args.adapter, base=args.base,
                                max_shard_size=args.max_shard_size, eval_path=args.eval))
        return 0

    parser.set_defaults(func=handler)


def _pipeline_command(subparsers, help_text: str) -> None:
    from alignment.pipeline import PipelineConfig, run_pipeline

    parser = subparsers.add_parser(
        "pipeline", help=help_text, description=help_text, epilog=_fields_help(PipelineConfig),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("config", help="YAML pipeline config.")
    parser.add_argument("overrides", nargs="*", help="key=value overrides, e.g. run_dir=/shared/runs/x.")
    parser.add_argument("--address", help="Ray cluster address to join (default: RAY_ADDRESS, else a local Ray).")

    def handler(args) -> int:
        pipeline_overrides, stage_overrides = split_stage_overrides(args.overrides)
        config = load_config(PipelineConfig, args.config, pipeline_overrides)
        for stage, overrides in stage_overrides.items():
            getattr(config, stage).overrides += overrides
        if args.address:
            config.address = args.address
        with _removed_if_left_empty(config.run_dir):
            run_pipeline(config)
        return 0

    parser.set_defaults(func=handler)


def split_stage_overrides(overrides: list[str]) -> tuple[list[str], dict[str, list[str]]]:
    """`align pipeline CONFIG sft.train.max_steps=5`: a key under a stage that is none of the stage's pipeline
    settings (config, overrides, num_cpus, ...) overrides the stage's own config; it is added to its `overrides`.
    Returns the pipeline's own overrides and, per stage, the stage's."""
    from alignment.pipeline import STAGE_ORDER, StageSettings

    settings = {f.name for f in dataclasses.fields(StageSettings)}
    own, per_stage = [], {}
    for text in overrides:
        stage, _, rest = text.partition(".")
        if stage in STAGE_ORDER and rest and rest.split("=", 1)[0].split(".")[0] not in settings:
            per_stage.setdefault(stage, []).append(rest)
        else:
            own.append(text)
    return own, per_stage


_EXAMPLE_MESSAGES = [
    {"role": "system", "content": "You are a helpful assistant."},
    {"role": "user", "content": "What is 2 + 3?"},
    {"role": "assistant", "content": "The result is \\boxed{5}.",
     "reasoning_content": "2 + 3 = 5.\nCheck: 5 - 3 = 2, so the sum is right.\n"},
]


def _read_messages_file(path: str):
    """The JSON value in the `--messages` file."""
    import json
    from pathlib import Path

    try:
        return json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise ConfigError(f"--messages {path}: {exc}") from exc


def _read_messages(path: str) -> list[dict]:
    messages = _read_messages_file(path)
    if not isinstance(messages, list) or not all(isinstance(m, dict) and "role" in m and "content" in m
                                                 for m in messages):
        raise ConfigError(f"--messages {path}: expected a JSON list of chat messages with `role` and `content`")
    if not messages or messages[-1]["role"] != "assistant":
        raise ConfigError(f"--messages {path}: the last message must be the assistant turn (`content` is the answer, "
                          "`reasoning_content` the trace)")
    return messages


def _trained_parts(tokenizer, sample: dict[str, list[int]]) -> tuple[str, str]:
    """(the text before the first token with loss, the decoded tokens with loss) of an encoded training sample."""
    from alignment.chat_format import IGNORE_INDEX

    first = next(i for i, label in enumerate(sample["labels"]) if label != IGNORE_INDEX)
    trained = [t for t, label in zip(sample["input_ids"], sample["labels"]) if label != IGNORE_INDEX]
    return (tokenizer.decode(sample["input_ids"][:first], skip_special_tokens=False),
            tokenizer.decode(trained, skip_special_tokens=False))


def _template_cases(tokenizer, messages: list[dict], cut_fraction: float = 0.5) -> dict:
    """For reasoning on, off and a truncated-thinking row: the generation prompt and the trained text.

    `messages` ends with the assistant turn: `content` is the answer, `reasoning_content` the trace. The trained
    text is the decoded tokens that carry loss.
    """
    from alignment.chat_format import chat_format_of, encode_for_training, render_prompt, with_reasoning
    from data_recipes.truncation import TruncationConfig, truncate_rows

    *history, final = messages
    trace = final.get("reasoning_content") or ""
    rows = {
        "on": with_reasoning(history, True) + [dict(final, reasoning_content=trace)],
        "off": with_reasoning(history, False) + [dict(final, reasoning_content="")],
    }
    cut = TruncationConfig(fraction=1.0, budget_mode="fraction", min_fraction=cut_fraction, max_fraction=cut_fraction,
                           close_marker=".\n")
    (truncated,), _ = truncate_rows([{"messages": rows["on"]}], cut, tokenizer)
    rows["truncated"] = truncated["messages"]
    cases = {}
    for case, row in rows.items():
        training_prompt, trained = _trained_parts(tokenizer, encode_for_training(tokenizer, row))
        cases[case] = {"prompt": render_prompt(tokenizer, row[:-1]), "trained": trained,
                       "training_prompt": training_prompt}
    return {"format": chat_format_of(tokenizer).name, "cases": cases}


def _example_tool_row() -> dict:
    """A synthetic tool task of three call turns (read, add, write back), reasoning on."""
    import random

    from envs.tool_tasks import make_task, task_to_row

    rng = random.Random(0)
    return task_to_row(make_task(rng, "update") | {"kind": "update"}, "example", "example", True, rng)


def _read_tool_row(path: str) -> dict:
    row = _read_messages_file(path)
    if not isinstance(row, dict) or not isinstance(row.get("messages"), list) or not row.get("tools"):
        raise ConfigError(f"--messages {path}: with --tools, expected a row object with `messages` and `tools`")
    return row


def _tool_cases(tokenizer, row: dict) -> dict:
    """Each assistant turn of a tool conversation as training sees it (the prompt before it, the trained text) and
    the calls the format's parser reads back from the trained text."""
    from alignment.chat_format import chat_format_of, encode_row_for_training, tool_syntax_of
    from envs.tool_env import parse_turn

    turns = []
    for sample in encode_row_for_training(tokenizer, row):
        training_prompt, trained = _trained_parts(tokenizer, sample)
        _, parsed = parse_turn(trained, row["tools"])
        turns.append({"training_prompt": training_prompt, "trained": trained, "malformed": parsed.malformed,
                      "parsed_calls": [{"name": c.name, "arguments": c.arguments} for c in parsed.calls]})
    return {"format": chat_format_of(tokenizer).name, "tool_syntax": tool_syntax_of(tokenizer).name, "turns": turns}


def _template_command(subparsers, help_text: str) -> None:
    parser = subparsers.add_parser(
        "template", help=help_text,
        description="Renders a conversation through the tokenizer's own chat template the way every stage does: the "
        "generation prompt (what rollouts and evaluation start from) and the trained text (the tokens that carry "
        "loss), for reasoning on, off and a truncated-thinking row (the trace cut at half its tokens).",
    )
    parser.add_argument("tokenizer", help="Tokenizer or checkpoint directory (or a hub id already in the local cache).")
    parser.add_argument("--messages", help="JSON list of chat messages; the last is the assistant turn with `content` "
                        "(the answer) and `reasoning_content` (the trace). Default: a short arithmetic example.")
    parser.add_argument("--chat-format", default="auto", help="Force a format (model.chat_format), e.g. keyword+inline.")
    parser.add_argument("--tools", action="store_true", help="Show a tool conversation instead: every assistant turn's "
                        "training row (calls included; tool results carry no loss) and the calls the format's parser "
                        "reads back from it. --messages is then a row object with `messages` and `tools` (default: "
                        "a synthetic three-call task).")
    parser.add_argument("--json", action="store_true", help="Print one JSON object as the last line of stdout.")

    def handler(args) -> int:
        import json

        from alignment.chat_format import TemplateError, chat_format_of
        from alignment.modeling import ModelConfig, load_tokenizer

        if args.tools:
            row = _read_tool_row(args.messages) if args.messages else _example_tool_row()
        else:
            messages = _read_messages(args.messages) if args.messages else _EXAMPLE_MESSAGES
        try:
            tokenizer = load_tokenizer(ModelConfig(name_or_path=args.tokenizer, chat_format=args.chat_format))
            shown = _tool_cases(tokenizer, row) if args.tools else _template_cases(tokenizer, messages)
        except (TemplateError, ValueError) as exc:
            raise ConfigError(f"{args.tokenizer}: {exc}") from exc
        visible = lambda text: text.replace("\n", "\u23ce\n")  # noqa: E731 - newlines shown as a return sign
        if args.tools:
            if args.json:
                print(json.dumps(shown, ensure_ascii=False))
                return 0
            print(f"chat format: {chat_format_of(tokenizer).describe()}\ntool calls: {shown['tool_syntax']} syntax")
            print("(newlines are shown as \u23ce; the trained part of a training row is between \u27e6 and \u27e7)")
            for n, turn in enumerate(shown["turns"], 1):
                print(f"\n=== assistant turn {n} of {len(shown['turns'])} ===\n--- training row ---\n"
                      f"{visible(turn['training_prompt'])}\u27e6{visible(turn['trained'])}\u27e7")
                calls = ", ".join(f"{c['name']}({json.dumps(c['arguments'])})" for c in turn["parsed_calls"])
                print(f"--- parsed back --- {calls or 'no call (the answer)'}"
                      + (f"; malformed: {turn['malformed']}" if turn["malformed"] else ""))
            return 0
        if args.json:
            cases = {case: {k: shown["cases"][case][k] for k in ("prompt", "trained")} for case in shown["cases"]}
            print(json.dumps({"format": shown["format"], "cases": cases}, ensure_ascii=False))
            return 0
        print(f"chat format: {chat_format_of(tokenizer).describe()}")
        print("(newlines are shown as \u23ce; the trained part of a training row is between \u27e6 and \u27e7)")
        for case, title in (("on", "reasoning on"), ("off", "reasoning off"), ("truncated", "truncated thinking")):
            shown_case = shown["cases"][case]
            print(f"\n=== {title} ===\n--- generation prompt ---\n{visible(shown_case['prompt'])}")
            print(f"--- training row ---\n{visible(shown_case['training_prompt'])}\u27e6{visible(shown_case['trained'])}"
                  "\u27e7")
        return 0

    parser.set_defaults(func=handler)


@contextlib.contextmanager
def _removed_if_left_empty(output_dir: str) -> Iterator[None]:
    """A run that fails leaves no empty output folder of its own making behind (one that existed stays)."""
    made = Path(output_dir).absolute()  # the outermost folder the run will create, if any
    while not made.parent.exists():
        made = made.parent
    existed = made.exists()
    try:
        yield
    except BaseException:
        if not existed and made.is_dir() and not any(p.is_file() for p in made.rglob("*")):
            shutil.rmtree(made, ignore_errors=True)
        raise


def _bad_input_errors() -> tuple[type[BaseException], ...]:
    """Errors whose message says all a user needs (bad config, data, template, checkpoint): printed, no traceback."""
    from alignment.chat_format import TemplateError
    from alignment.checkpoint import CorruptCheckpointError
    from alignment.data import BadDataError
    from alignment.export import ExportError
    from alignment.merge import MergeError
    from alignment.packed_model import PackingNotSupportedError
    from alignment.split_guard import SplitOverlapError
    from data_recipes.adapters.base import RecordError
    from data_recipes.preference import PairError
    from envs.sandbox import SandboxUnavailable
    from rewards.config import RewardsConfigError
    from rewards.scoring import RewardFailingError

    return (ConfigError, BadDataError, TemplateError, CorruptCheckpointError, ExportError, MergeError,
            PackingNotSupportedError, SplitOverlapError, RecordError, PairError, SandboxUnavailable,
            RewardsConfigError, RewardFailingError, FileNotFoundError)


def bad_input(exc: BaseException) -> BaseException | None:
    """The bad-input error behind `exc`: itself, or the innermost one a Ray task or worker raised; None if none."""
    kinds, found = _bad_input_errors(), None
    for _ in range(8):  # the chain is short: a Ray task error, a Train error, the cause
        if exc is None:
            break
        if isinstance(exc, kinds):
            found = exc
        exc = getattr(exc, "cause", None) or exc.__cause__
    return found


def _stage_command(name: str, config_optional: bool = False) -> Callable:
    def add(subparsers, help_text: str) -> None:
        from alignment.pipeline import stage_entry

        _add_stage(subparsers, name, help_text, *stage_entry(name), config_optional=config_optional)

    return add


def _rewards_command(subparsers, help_text: str) -> None:
    from rewards.cli import add_rewards_parser

    add_rewards_parser(subparsers, help_text)


# Subcommand: (one-line help, what adds it in full). Only the subcommand being run is built in full: the stages'
# config classes import torch and transformers, which `align --help` does without.
COMMANDS: dict[str, tuple[str, Callable]] = {
    "data": ("Write the synthetic reasoning task splits.", _stage_command("data", config_optional=True)),
    "sft": ("Supervised fine-tuning on reasoning-on/off traces.", _stage_command("sft")),
    "eval": ("Evaluate one or more checkpoints: accuracy with reasoning on/off and across thinking budgets.",
             _eval_command),
    "dpo": ("Preference optimisation (DPO), on a preference file or pairs mined on-policy.", _stage_command("dpo")),
    "grpo": ("RL with verifiable rewards (GRPO), budget-aware rollouts.", _stage_command("grpo")),
    "rm": ("Train a Bradley-Terry reward model on preference pairs, from a policy checkpoint.", _stage_command("rm")),
    "pipeline": ("Run the stages in order on Ray (local instance, or a cluster via RAY_ADDRESS/--address).",
                 _pipeline_command),
    "budget-report": ("The budget study over seeds: accuracy by budget, what each model keeps at half its thinking "
                      "length (from each seed's align eval).", _budget_report_command),
    "merge": ("Merge two checkpoints of one architecture, (1 - alpha) * A + alpha * B, shard by shard; or sweep "
              "alphas, each merge evaluated.", _merge_command),
    "export": ("Export a checkpoint for serving: full weights in shards, or the LoRA adapter with its base named; "
               "with the chat template and a model card.", _export_command),
    "template": ("Show the detected chat format, and what the stages feed and train with reasoning on, off and for a "
                 "truncated-thinking row.", _template_command),
    "rewards": ("List reward plugins, or score one completion by hand.", _rewards_command),
}


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The `align` parser with `command` built in full (the others listed with their help line only)."""
    parser = argparse.ArgumentParser(prog="align", description="Post-training for hybrid reasoning models.")
    parser.add_argument("--debug", action="store_true", help="Show the full traceback when a run fails on bad input.")
    subparsers = parser.add_subparsers(dest="command", required=True)
    for name, (help_text, add_in_full) in COMMANDS.items():
        if name == command:
            add_in_full(subparsers, help_text)
        else:
            subparsers.add_parser(name, help=help_text)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = build_parser(next((a for a in argv if not a.startswith("-")), None))
    args, extra = parser.parse_known_args(argv)
    # `align eval CKPT --config X key=value`: positionals after an option arrive as extras; they belong to the list
    # (for `align merge A B --alphas ... key=value`, to the overrides).
    if extra and args.command in ("eval", "merge") and not any(e.startswith("-") for e in extra):
        if args.command == "eval":
            args.checkpoints += extra
        else:
            args.overrides += extra
    elif extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    try:
        return args.func(args)
    except Exception as exc:
        error = None if args.debug else bad_input(exc)
        if error is None:
            raise
        kind = "config error" if isinstance(error, ConfigError) else "error"
        print(f"{kind}: {error}\n(align --debug ... shows the traceback)", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
