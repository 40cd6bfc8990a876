"""`align rewards list` and `align rewards check`: see and try reward plugins from the shell."""

from __future__ import annotations

import argparse
import json
import sys

from rewards.config import RewardsConfig, RewardSpec
from rewards.registry import get_reward, list_rewards
from rewards.scoring import RewardScorer

EXIT_SCORED, EXIT_USAGE = 0, 2


def add_rewards_parser(subparsers: argparse._SubParsersAction, help_text: str = "List reward plugins, or score one "
                       "completion by hand.") -> argparse.ArgumentParser:
    """Register `rewards list` and `rewards check` on the `align` command's subparsers."""
    parser = subparsers.add_parser("rewards", help=help_text, description=help_text)
    commands = parser.add_subparsers(dest="rewards_command", metavar="{list,check}", required=True)

    show = commands.add_parser("list", help="every registered reward and where it came from")
    show.add_argument("--json", action="store_true", help="one JSON object per line instead of a table")
    show.set_defaults(func=run_list)

    check = commands.add_parser(
        "check",
        help="score one completion and print {\"score\": ..., \"info\": {...}}",
        description="Exit code: 0 when it scored, even a zero; a reward that raised, returned None/NaN or timed "
        "out scores the failure score and the JSON line says why in info.error. 2 on usage errors.",
    )
    check.add_argument("name", help="reward name, entry-point name, or module:function path")
    check.add_argument("--completion", required=True, help="the completion text, as the model wrote it")
    check.add_argument("--row", default="{}", help="the dataset row as a JSON object (e.g. '{\"answer\": \"1/2\"}')")
    check.add_argument("--args", default="{}", help="fixed reward arguments as a JSON object, as in a config")
    check.add_argument("--timeout-s", type=float, default=60.0, help="give up on the reward after this many seconds")
    check.set_defaults(func=run_check)
    return parser


def run_list(args: argparse.Namespace) -> int:
    rewards = list_rewards()
    if args.json:
        for r in rewards:
            print(json.dumps({"name": r.name, "source": r.source, "batched": r.batched, "description": r.description}))
        return EXIT_SCORED
    width = max(len(r.name) for r in rewards)
    source_width = max(len(r.source) for r in rewards)
    for r in rewards:
        print(f"{r.name:<{width}}  {r.source:<{source_width}}  {r.description}")
    return EXIT_SCORED


def run_check(args: argparse.Namespace) -> int:
    try:
        row = json.loads(args.row)
        fixed = json.loads(args.args)
        if not isinstance(row, dict) or not isinstance(fixed, dict):
            raise ValueError("--row and --args must be JSON objects")
        get_reward(args.name)
    except (ValueError, KeyError) as e:
        print(f"align rewards check: {e.args[0] if e.args else e}", file=sys.stderr)
        return EXIT_USAGE
    config = RewardsConfig(rewards=[RewardSpec(args.name, 1.0, fixed)], mode="inprocess", timeout_s=args.timeout_s)
    row = {k: v for k, v in row.items() if k not in ("reward", config.route_column)}  # score with this reward only
    sample = RewardScorer(config).score_batch([args.completion], [row])[0]
    info = dict(sample.info[args.name])
    if sample.failed:
        info["error"] = sample.errors[args.name]
        info["failed"] = True
    print(json.dumps({"score": sample.scores[args.name], "info": info}, default=str))
    return EXIT_SCORED


def main(argv: list[str] | None = None) -> int:
    """Stand-alone entry (`python -m rewards.cli ...`), the same commands as `align rewards ...`."""
    parser = argparse.ArgumentParser(prog="align")
    add_rewards_parser(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
