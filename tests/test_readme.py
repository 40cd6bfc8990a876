"""The README's commands as written: a README change that breaks a documented command breaks a test.

- Every `align` command of the README (its shell blocks and the stage table) parses, and loads its config files
  with its overrides: a renamed key, a moved config or a bad override fails here.
- The data-adapter block runs line by line on the fixture file of each line's schema (the hub ids and downloads are
  the one thing replaced; `--limit` keeps it small).
- The quick-start stage commands run on the CPU, with sizes made small by overrides appended after the documented
  ones (later overrides win), in the slow suite.
"""

from __future__ import annotations

import json
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from alignment.cli import COMMANDS, _worker_keys, build_parser, split_stage_overrides
from alignment.config import DATA_PARALLEL_STAGES, load_config
from data_recipes.adapters.loading import main as adapters_main
from tests.conftest import REPO

README = (REPO / "README.md").read_text(encoding="utf-8")
FIXTURES = REPO / "tests" / "fixtures" / "datasets"


def shell_blocks() -> list[list[str]]:
    """The command lines of each ```console/bash block: continuations joined, `$ ` prompts and comments dropped."""
    blocks = []
    for body in re.findall(r"^```(?:console|bash|sh)\n(.*?)^```", README, flags=re.M | re.S):
        lines, joined = [], ""
        for raw in body.splitlines():
            line = raw.removeprefix("$ ")
            if raw.startswith(("{", "[")) and not joined:  # printed output in a console block
                continue
            joined += line.rstrip("\\").rstrip() + " " if line.rstrip().endswith("\\") else line
            if not line.rstrip().endswith("\\"):
                command = re.sub(r"\s+#.*$", "", joined).strip()  # a trailing comment
                if command and not command.startswith("#"):
                    lines.append(command)
                joined = ""
        blocks.append(lines)
    return blocks


def align_commands() -> list[str]:
    table = re.findall(r"^\| `make [^`]*` \| `(align [^`]*)` \|", README, flags=re.M)
    lines = [line for block in shell_blocks() for line in block if line.startswith("align ")]
    jobs = [line.split(" -- python -m alignment.cli ", 1)[1] for block in shell_blocks() for line in block
            if " -- python -m alignment.cli " in line]
    return list(dict.fromkeys([*table, *lines, *("align " + job for job in jobs)]))


def test_the_readme_documents_the_stage_commands():
    commands = align_commands()
    for stage in ("data", "sft", "dpo", "grpo", "eval", "pipeline", "template", "merge", "export"):
        assert any(c.split()[1] == stage for c in commands), stage


@pytest.mark.parametrize("line", align_commands())
def test_every_documented_align_command_loads_its_config(line):
    argv = shlex.split(line)[1:]
    command = argv[0]
    assert command in COMMANDS, f"README: unknown command in `{line}`"
    if "--help" in argv:
        with pytest.raises(SystemExit) as exit_info:
            build_parser(command).parse_args(argv)
        assert exit_info.value.code == 0
        return
    if command == "eval" and "CKPT" in argv:  # the stage table's placeholder
        argv = [a for a in argv if a not in ("CKPT", "[CKPT", "...]")] + ["runs/tiny/sft/checkpoint"]
    args, extra = build_parser(command).parse_known_args(argv)
    if command in ("template", "rewards", "budget-report", "merge", "export"):  # no config: parsing can break
        assert not extra, line
        return
    from alignment.pipeline import PipelineConfig, stage_entry

    if command == "pipeline":
        own, per_stage = split_stage_overrides(args.overrides)
        config = load_config(PipelineConfig, args.config, own)
        for name in config.stages:
            settings = getattr(config, name)
            load_config(stage_entry(name)[0], settings.config or None, [*settings.overrides, *per_stage.get(name, [])])
        return
    if command == "eval":
        overrides = [a for a in args.checkpoints + extra if "=" in a]
        load_config(stage_entry("eval")[0], args.config, overrides)
        return
    overrides = _worker_keys(command, args.overrides)[0] if command in DATA_PARALLEL_STAGES else args.overrides
    load_config(stage_entry(command)[0], args.config, overrides)


def adapter_lines() -> list[str]:
    block = next(b for b in shell_blocks() if any(line.startswith('A="python -m data_recipes.adapters"') for line in b))
    return [line for line in block if line.startswith("$A ")]


def test_the_readme_adapter_commands_run_on_the_fixture_of_each_schema(tmp_path):
    lines = adapter_lines()
    assert len(lines) >= 8
    for line in lines:
        argv = shlex.split(line)[1:]
        schema = argv[argv.index("--schema") + 1]
        out = tmp_path / argv[argv.index("--out") + 1]
        # The one change: the source is the fixture in this schema (hub ids and downloads need a network).
        argv[0] = str(FIXTURES / f"{schema}.jsonl")
        argv[argv.index("--out") + 1] = str(out)
        for hub_option in ("--split", "--name"):  # a local file has neither
            if hub_option in argv:
                del argv[argv.index(hub_option):argv.index(hub_option) + 2]
        adapters_main(argv)  # what `python -m data_recipes.adapters` runs
        assert out.read_text().strip(), line


QUICK_START_SIZES = {  # overrides appended to the documented command: small sizes, a private output folder
    "data": ["task.train_size=60", "task.validation_size=20", "task.test_size=20"],
    "sft": ["train.max_steps=2", "eval.max_samples=2", "eval.budgets=[0]"],
}


@pytest.mark.slow
def test_the_quick_start_commands_run_as_written(tmp_path):
    """`align data`, the stage table's and the config section's `align sft`, `align sft --help` and `align template`
    on the fixture tokenizer, run from a copy of the README's lines in a fresh working folder."""
    data_line = next(c for c in align_commands() if c.startswith("align data "))
    sft_lines = [c for c in align_commands() if c.startswith("align sft configs/tiny/")]
    help_line = next(c for c in align_commands() if c.startswith("align sft --help"))
    template_line = next(c for c in align_commands() if c.startswith("align template tests/fixtures/"))
    data_dir = tmp_path / "runs" / "data" / "tiny"

    def run(line: str, *extra: str) -> subprocess.CompletedProcess:
        argv = [sys.executable, "-m", "alignment.cli", *shlex.split(line)[1:], *extra]
        done = subprocess.run(argv, cwd=REPO, capture_output=True, text=True, timeout=600)
        assert done.returncode == 0, f"{line}\n{done.stderr[-3000:]}"
        return done

    run(data_line, *QUICK_START_SIZES["data"], f"output_dir={data_dir}")
    data = [f"data.train_path={data_dir / 'train.jsonl'}", f"data.test_path={data_dir / 'test.jsonl'}"]
    for i, line in enumerate(sft_lines):
        run(line, *QUICK_START_SIZES["sft"], *data, f"output_dir={tmp_path / f'sft{i}'}")
        assert (tmp_path / f"sft{i}" / "checkpoint" / "manifest.json").is_file(), line
    assert "train.lr" in run(help_line).stdout
    assert "chat format" in run(template_line).stdout


DEMO_SIZES = [  # per-stage overrides after the documented ones: every stage runs, on a few rows and steps
    "data.task.train_size=96", "data.task.validation_size=8", "data.task.test_size=8", "data.task.rl_size=16",
    "sft.train.max_steps=2", "sft.eval.max_samples=4", "sft.eval.max_new_tokens=16",
    "dpo.rounds=1", "dpo.mining.prompts_per_round=8", "dpo.mining.samples_per_prompt=4",
    "dpo.mining.max_new_tokens=16", "dpo.train.max_steps=1", "dpo.train.pairs_per_step=4",
    "dpo.selection.max_samples=4", "dpo.eval.max_samples=4", "dpo.eval.max_new_tokens=16",
    "grpo.rollout.prompts_per_step=4", "grpo.rollout.group_size=4", "grpo.rollout.max_new_tokens=8",
    "grpo.train.max_steps=1", "grpo.eval.max_samples=4", "grpo.eval.max_new_tokens=16",
    "eval.eval.max_samples=4", "eval.eval.max_new_tokens=16", "eval.eval.budgets=[0,null]",
]


@pytest.mark.slow
def test_make_demo_runs_as_written_at_small_sizes(tmp_path):
    """`make demo` from the README's two commands, with a private run_dir and small sizes through its ARGS."""
    line = next(line for block in shell_blocks() for line in block if line.startswith("make demo"))
    venv = Path(sys.executable).parents[1]
    if not (venv / ".installed").is_file():
        pytest.skip(f"{venv} was not made by `make setup`: make demo would install into it")
    args = " ".join(shlex.quote(a) for a in [f"run_dir={tmp_path}", *DEMO_SIZES])
    done = subprocess.run(["make", *shlex.split(line)[1:], f"VENV={venv}", f"ARGS={args}"], cwd=REPO,
                          capture_output=True, text=True, timeout=1200)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert set(metrics["stages"]) >= {"sft", "dpo", "grpo"} and (tmp_path / "report.md").is_file()
