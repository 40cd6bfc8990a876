"""The `align` command: one subcommand per stage, each taking a YAML config and `key=value` overrides.

    align data configs/tiny/data.yaml
    align sft configs/tiny/sft.yaml train.max_steps=100
    align eval runs/tiny/sft/checkpoint
    align rewards list
"""

from __future__ import annotations

import argparse
import sys
from typing import Callable

from alignment.config import ConfigError, describe_fields, load_config


def _fields_help(config_cls: type) -> str:
    lines = ["config keys (set in the YAML file or as key=value):"]
    for key, type_name, default, help_text in describe_fields(config_cls):
        lines.append(f"  {key} ({type_name}, default {default})\n      {help_text}")
    return "\n".join(lines)


def _add_stage(subparsers, name: str, help_text: str, config_cls: type, run: Callable, config_optional: bool = False):
    parser = subparsers.add_parser(
        name, help=help_text, description=help_text, epilog=_fields_help(config_cls),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("config", nargs="?" if config_optional else None, help="YAML config file.")
    parser.add_argument("overrides", nargs="*", help="key=value overrides, dotted keys for sections.")

    def handler(args) -> int:
        config = load_config(config_cls, args.config, args.overrides)
        run(config)
        return 0

    parser.set_defaults(func=handler)


def _eval_command(subparsers) -> None:
    from alignment.evaluate import EvalRunConfig, run_eval

    parser = subparsers.add_parser(
        "eval", help="Evaluate one or more checkpoints: accuracy with reasoning on/off and across thinking budgets.",
        epilog=_fields_help(EvalRunConfig), formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("checkpoints", nargs="+", help="Checkpoint directories, then optional key=value overrides.")
    parser.add_argument("--config", help="YAML config file for the evaluation.")

    def handler(args) -> int:
        checkpoints = [c for c in args.checkpoints if "=" not in c]
        overrides = [c for c in args.checkpoints if "=" in c]
        config = load_config(EvalRunConfig, args.config, overrides)
        run_eval(checkpoints, config)
        return 0

    parser.set_defaults(func=handler)


def _pipeline_command(subparsers) -> None:
    from alignment.pipeline import PipelineConfig, run_pipeline

    parser = subparsers.add_parser(
        "pipeline", help="Run the stages in order on Ray (local instance, or a cluster via RAY_ADDRESS/--address).",
        epilog=_fields_help(PipelineConfig), formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("config", help="YAML pipeline config.")
    parser.add_argument("overrides", nargs="*", help="key=value overrides, e.g. run_dir=/shared/runs/x.")
    parser.add_argument("--address", help="Ray cluster address to join (default: RAY_ADDRESS, else a local Ray).")

    def handler(args) -> int:
        config = load_config(PipelineConfig, args.config, args.overrides)
        if args.address:
            config.address = args.address
        run_pipeline(config)
        return 0

    parser.set_defaults(func=handler)


def build_parser() -> argparse.ArgumentParser:
    from alignment.pipeline import stage_entry

    parser = argparse.ArgumentParser(prog="align", description="Post-training for hybrid reasoning models.")
    subparsers = parser.add_subparsers(dest="command", required=True)
    _add_stage(subparsers, "data", "Write the synthetic reasoning task splits.", *stage_entry("data"),
               config_optional=True)
    _add_stage(subparsers, "sft", "Supervised fine-tuning on reasoning-on/off traces.", *stage_entry("sft"))
    _eval_command(subparsers)
    _add_stage(subparsers, "dpo", "Preference optimisation (DPO), on a preference file or pairs mined on-policy.",
               *stage_entry("dpo"))
    _add_stage(subparsers, "grpo", "RL with verifiable rewards (GRPO), budget-aware rollouts.", *stage_entry("grpo"))
    _pipeline_command(subparsers)
    try:
        from rewards.cli import add_rewards_parser
    except ImportError:
        pass
    else:
        add_rewards_parser(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    # `align eval CKPT --config X key=value`: positionals after an option arrive as extras; they belong to the list.
    if extra and args.command == "eval" and not any(e.startswith("-") for e in extra):
        args.checkpoints += extra
    elif extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    try:
        return args.func(args)
    except ConfigError as exc:
        print(f"config error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
