"""An external plugin package, installed with pip, is found through its entry point and used by name."""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import textwrap
from importlib import metadata
from pathlib import Path

import pytest

from rewards import RewardsConfig, get_reward, score_batch
from rewards.cli import add_rewards_parser
from rewards.registry import reload_entry_points

PLUGIN_SOURCE = Path(__file__).parent / "fixtures" / "reward_plugin"


@pytest.fixture(scope="module")
def installed_plugin(tmp_path_factory):
    """pip-install the fixture package (offline) into a private directory and put it on sys.path."""
    work = tmp_path_factory.mktemp("plugin")
    source = shutil.copytree(PLUGIN_SOURCE, work / "src")  # setuptools writes build files next to the source
    target = work / "site"
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-build-isolation", "--no-index",
         "--target", str(target), str(source)],
        check=True, timeout=120,
    )
    sys.path.insert(0, str(target))
    reload_entry_points()
    yield target
    sys.path.remove(str(target))


def test_the_plugin_is_a_real_installed_distribution(installed_plugin):
    dist = metadata.distribution("ha-shout-reward")
    assert Path(str(dist.locate_file(""))).resolve() == installed_plugin.resolve()
    assert {e.name for e in dist.entry_points if e.group == "hybrid_align.rewards"} == {"shout", "exclamations"}


def test_plugin_rewards_are_used_by_name_from_a_yaml_config(installed_plugin, tmp_path):
    path = tmp_path / "grpo_rewards.yaml"
    path.write_text(textwrap.dedent("""
        rewards:
          - {name: shout, weight: 2.0, args: {min_letters: 2}}
          - {name: exclamations, weight: 0.5}
        mode: inprocess
    """))
    samples = score_batch(["HELLO!!", "quiet", "A"], [{}, {}, {}], RewardsConfig.from_yaml(path))
    assert samples[0].scores == {"shout": 1.0, "exclamations": 2.0} and samples[0].score == 3.0
    assert samples[1].score == 0.0
    assert samples[2].scores["shout"] == 0.0 and samples[2].info["shout"] == {"letters": 1}  # args reached it
    assert not any(s.failed for s in samples)


def test_plugin_source_is_shown_by_rewards_list(installed_plugin, capsys):
    parser = argparse.ArgumentParser(prog="align")
    add_rewards_parser(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["rewards", "list", "--json"])
    assert args.func(args) == 0
    entries = {e["name"]: e for e in map(json.loads, capsys.readouterr().out.splitlines())}
    assert entries["shout"]["source"] == "entry point ha-shout-reward (ha_shout_reward:shout)"
    assert entries["exclamations"]["description"] == "Number of exclamation marks, capped at 3."
    assert get_reward("shout").fn.__module__ == "ha_shout_reward"


def test_the_readme_plugin_example_runs_as_written_from_the_folder_that_holds_it(tmp_path):
    """README, "Write your own reward": the module next to the user, `align rewards check` run from there."""
    readme = (Path(__file__).parents[1] / "README.md").read_text()
    source = readme.split("```python\n# my_rewards/polite.py\n", 1)[1].split("```", 1)[0]
    command, expected = readme.split("```console\n$ align rewards check ", 1)[1].split("\n")[:2]
    (tmp_path / "my_rewards").mkdir()
    (tmp_path / "my_rewards" / "polite.py").write_text(source)
    align = Path(sys.executable).parent / "align"
    assert align.exists(), "the align console script is installed next to the interpreter"
    done = subprocess.run(["bash", "-c", f"{align} rewards check {command}"], cwd=tmp_path, capture_output=True,
                          text=True, timeout=120, env={k: v for k, v in os.environ.items() if k != "PYTHONPATH"})
    assert done.returncode == 0, done.stderr[-2000:]
    assert json.loads(done.stdout.strip().splitlines()[-1]) == json.loads(expected)
