"""The plugin API, in-process scoring with failing rewards, routing, configs and the `rewards` CLI."""

from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest

from rewards import (
    RewardResult,
    RewardScorer,
    RewardsConfig,
    RewardsConfigError,
    RewardSpec,
    get_reward,
    list_rewards,
    reward,
    score_batch,
)
from rewards.cli import add_rewards_parser
from rewards.scoring import RewardFailingError


@reward("test_exact")
def exact(completion: str, answer: str) -> float:
    """1 when the completion is the answer."""
    return float(completion.strip() == answer)


@reward("test_raises")
def raises(completion: str) -> float:
    if completion == "boom":
        raise RuntimeError("plugin bug")
    return 1.0


@reward("test_nan")
def returns_nan(completion: str) -> float:
    return math.nan if completion == "nan" else 1.0


@reward("test_none")
def returns_none(completion: str):
    return None if completion == "none" else 1.0


HANG = threading.Event()


@reward("test_hangs")
def hangs(completion: str) -> float:
    if completion == "hang":
        HANG.wait(60)  # released at the end of the test module
    return 1.0


@reward("test_async")
async def async_reward(completion: str, answer: str) -> RewardResult:
    return RewardResult(float(answer in completion), {"async": True})


@reward("test_batched", batched=True)
def batched(completions: list[str], answer: list[str], scale: float = 1.0) -> list[float]:
    return [scale * float(c == a) for c, a in zip(completions, answer)]


@pytest.fixture(scope="module", autouse=True)
def release_hung_threads():
    yield
    HANG.set()


def inprocess(*specs: RewardSpec, **settings) -> RewardsConfig:
    return RewardsConfig(rewards=list(specs), mode="inprocess", **settings)


def test_decorator_registers_and_returns_the_function():
    assert exact("4", "4") == 1.0  # still a plain function
    registered = get_reward("test_exact")
    assert registered.fn is exact and registered.source == f"module {__name__}"
    assert registered.description == "1 when the completion is the answer."
    assert get_reward("test_async").is_async and get_reward("test_batched").batched
    names = {r.name: r.source for r in list_rewards()}
    assert names["math"] == "builtin" and names["test_exact"] == f"module {__name__}"
    with pytest.raises(KeyError, match="unknown reward 'nope'.*module:function"):
        get_reward("nope")


def test_rows_pass_only_the_fields_a_reward_names():
    rows = [{"answer": "4", "id": 1, "task": "t", "extra": [1, 2]}]
    [sample] = score_batch(["4"], rows, inprocess(RewardSpec("test_exact")))
    assert sample.score == 1.0 and not sample.failed


def test_failing_rewards_leave_the_batch_scored():
    config = inprocess(RewardSpec("test_raises"), RewardSpec("test_nan"), RewardSpec("test_none"),
                       RewardSpec("test_hangs"), failure_score=-1.0, timeout_s=0.5)
    scorer = RewardScorer(config)
    completions = ["fine", "boom", "nan", "none", "hang", "also fine"]
    start = time.monotonic()
    samples = scorer.score_batch(completions, [{"id": f"row-{i}"} for i in range(len(completions))])
    assert time.monotonic() - start < 3
    assert [s.score for s in samples] == [4.0, 2.0, 2.0, 2.0, 2.0, 4.0]  # one failed reward: 3 * 1 + (-1)
    assert [s.failed for s in samples] == [False, True, True, True, True, False]
    assert samples[1].errors == {"test_raises": "RuntimeError: plugin bug"}
    assert samples[2].errors == {"test_nan": "returned nan"}
    assert samples[3].errors == {"test_none": "returned None"}
    assert samples[4].errors == {"test_hangs": "timed out after 0.5 s"}
    assert samples[4].scores["test_hangs"] == -1.0
    assert scorer.failure_counts == {"test_raises": 1, "test_nan": 1, "test_none": 1, "test_hangs": 1}


def test_failures_are_logged_with_the_row_id(caplog):
    score_batch(["boom"], [{"id": "row-77"}], inprocess(RewardSpec("test_raises")))
    assert any("test_raises" in r.message and "row-77" in r.message for r in caplog.records)


STARTED: list[str] = []


@reward("test_always_hangs")
def always_hangs(completion: str) -> float:
    STARTED.append(completion)
    HANG.wait(60)
    return 1.0


@pytest.mark.parametrize("action", ["disable", "stop"])
def test_a_reward_that_hangs_on_every_call_costs_a_few_timeouts_not_one_per_sample(action, caplog):
    STARTED.clear()
    config = inprocess(RewardSpec("test_always_hangs"), RewardSpec("test_exact"), timeout_s=0.2, max_concurrency=2,
                       failure_window=4, on_failing=action)
    scorer = RewardScorer(config)
    completions, rows = ["4"] * 40, [{"answer": "4", "id": f"row-{i}"} for i in range(40)]
    if action == "stop":
        with pytest.raises(RewardFailingError, match="'test_always_hangs' failed on 4 of its last 4 samples .*"
                                                     "timed out after 0.2 s.*rewards.on_failing=disable"):
            scorer.score_batch(completions, rows)
        assert 4 <= len(STARTED) <= 4 + 2 - 1  # the window, plus a call already running when it filled
        return
    samples = scorer.score_batch(completions, rows)
    started = len(STARTED)
    assert 4 <= started <= 4 + 2 - 1  # the window, plus a call already running when it filled; never the other 35
    assert all(s.failed and s.scores == {"test_always_hangs": 0.0, "test_exact": 1.0} for s in samples)
    assert samples[-1].errors["test_always_hangs"].startswith("disabled after reward 'test_always_hangs' failed")
    warnings = [r.message for r in caplog.records if r.levelname == "WARNING"]
    assert warnings == ["reward 'test_always_hangs' failed on 40 of 40 samples of this batch; first: row row-0: "
                        "timed out after 0.2 s"]  # one line per reward and batch, not one per sample
    scorer.score_batch(completions, rows)
    assert len(STARTED) == started  # disabled for the rest of the run


def test_a_reward_failing_now_and_then_stays_on():
    config = inprocess(RewardSpec("test_raises"), failure_window=4, max_failure_rate=0.5)
    scorer = RewardScorer(config)
    for _ in range(3):
        samples = scorer.score_batch(["boom", "ok", "boom", "ok"], [{}] * 4)  # half of every window fails
    assert [s.failed for s in samples] == [True, False, True, False] and scorer.failure_counts["test_raises"] == 6


def test_slow_rewards_run_concurrently():
    @reward("test_slow")
    def slow(completion: str) -> float:
        time.sleep(0.3)
        return 1.0

    start = time.monotonic()
    samples = score_batch(["a"] * 8, [{}] * 8, inprocess(RewardSpec("test_slow"), max_concurrency=8))
    assert [s.score for s in samples] == [1.0] * 8
    assert time.monotonic() - start < 1.5  # 8 x 0.3 s serially would be 2.4 s


def test_weights_async_batched_and_args():
    config = inprocess(RewardSpec("test_async", 2.0), RewardSpec("test_batched", 0.5, {"scale": 3.0}))
    samples = score_batch(["x=4", "4"], [{"answer": "4"}, {"answer": "4"}], config)
    assert samples[0].scores == {"test_async": 1.0, "test_batched": 0.0}
    assert samples[1].scores == {"test_async": 1.0, "test_batched": 3.0}
    assert samples[1].score == 2.0 * 1.0 + 0.5 * 3.0
    assert samples[0].info["test_async"] == {"async": True}


def test_batched_reward_with_wrong_length_fails_its_samples():
    @reward("test_short_batch", batched=True)
    def short(completions: list[str]) -> list[float]:
        return [1.0]

    samples = score_batch(["a", "b"], [{}, {}], inprocess(RewardSpec("test_short_batch")))
    assert all(s.failed and "not a list of 2" in s.errors["test_short_batch"] for s in samples)


def test_rows_route_to_their_task_rewards_or_their_reward_column():
    config = RewardsConfig(
        rewards=[RewardSpec("test_exact")],
        routes={"math": [RewardSpec("math")], "code": [RewardSpec("test_raises", 0.5)]},
        mode="inprocess",
    )
    rows = [{"task": "math", "answer": "1/2"}, {"task": "code"}, {"answer": "ok"}, {"reward": "test_nan"}]
    samples = score_batch(["\\boxed{0.5}", "fine", "ok", "fine"], rows, config)
    assert [list(s.scores) for s in samples] == [["math"], ["test_raises"], ["test_exact"], ["test_nan"]]
    assert [s.score for s in samples] == [1.0, 0.5, 1.0, 1.0]


def test_config_from_yaml_with_paths_and_bare_names(tmp_path):
    path = tmp_path / "rewards.yaml"
    path.write_text(textwrap.dedent(f"""
        rewards:
          - math
          - name: {__name__}:plain_function
            weight: 0.5
        routes:
          code: [{{name: code_tests, args: {{max_tests: 5}}}}]
        failure_score: -1
        mode: inprocess
    """))
    config = RewardsConfig.from_yaml(path)
    assert [s.name for s in config.rewards] == ["math", f"{__name__}:plain_function"]
    assert config.routes["code"][0].args == {"max_tests": 5} and config.failure_score == -1
    [sample] = score_batch(["\\boxed{2}"], [{"answer": "2"}], config)
    assert sample.scores == {"math": 1.0, f"{__name__}:plain_function": 1.0} and sample.score == 1.5
    assert get_reward(f"{__name__}:plain_function").source == f"path {__name__}:plain_function"


def plain_function(completion: str) -> float:
    """Not decorated: usable through its module:function path."""
    return float(len(completion) > 0)


@pytest.mark.parametrize(
    "text, message",
    [
        ("mode: fast", "rewards.yaml: mode: must be one of"),
        ("rewards: [{name: math, weight: heavy}]", "rewards.yaml: rewards[0].weight: must be a number"),
        ("rewards: [{weight: 1}]", "rewards.yaml: rewards[0]: needs a `name`"),
        ("rewards: [[math]]", "rewards.yaml: rewards[0]: expected a reward name"),
        ("rewards: [{name: math, wieght: 1}]", "rewards.yaml: rewards[0]: unknown keys ['wieght']"),
        ("timeout: 3", "rewards.yaml: timeout: unknown key"),
        ("routes: {code: code_tests}", "rewards.yaml: routes.code: expected a list"),
        ("max_concurrency: 0", "rewards.yaml: max_concurrency: must be an integer >= 1"),
    ],
)
def test_config_errors_name_the_file_and_key(tmp_path, text, message):
    path = tmp_path / "rewards.yaml"
    path.write_text(text)
    with pytest.raises(RewardsConfigError) as error:
        RewardsConfig.from_yaml(path)
    assert message in str(error.value)


def test_config_built_by_a_generic_loader_is_normalised_and_validated():
    # A stage config loader builds nested dataclasses from plain mappings and then calls validate().
    config = RewardsConfig(rewards=["math", {"name": "length", "weight": 0.1}], routes={"code": ["code_tests"]})
    assert config.rewards == [RewardSpec("math"), RewardSpec("length", 0.1)]
    assert config.routes == {"code": [RewardSpec("code_tests")]}
    with pytest.raises(RewardsConfigError, match=r"^routes.code\[0\].weight: must be a number"):
        RewardsConfig(routes={"code": [RewardSpec("code_tests", "high")]}).validate()


def test_inprocess_mode_never_imports_ray():
    code = (
        "import sys\n"
        "from rewards import RewardsConfig, score_batch\n"
        "[s] = score_batch(['\\\\boxed{1}'], [{'answer': '1'}], RewardsConfig(mode='inprocess'))\n"
        "assert s.score == 1.0, s\n"
        "print('ray' in sys.modules)\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60,
                            cwd=Path(__file__).parents[1])
    assert result.returncode == 0, result.stderr
    assert result.stdout == "False\n"


def test_unknown_reward_fails_when_the_scorer_is_built():
    with pytest.raises(RewardsConfigError, match=r"rewards\.rewards\[0\]\.name: unknown reward 'not_a_reward'"):
        RewardScorer(inprocess(RewardSpec("not_a_reward")))


def run_cli(capsys, *argv: str) -> tuple[int, str, str]:
    parser = argparse.ArgumentParser(prog="align")
    add_rewards_parser(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    code = args.func(args)
    out, err = capsys.readouterr()
    return code, out, err


def test_cli_list_shows_names_and_sources(capsys):
    code, out, _ = run_cli(capsys, "rewards", "list")
    lines = {line.split()[0]: line for line in out.splitlines()}
    assert code == 0 and "builtin" in lines["math"] and f"module {__name__}" in lines["test_exact"]
    code, out, _ = run_cli(capsys, "rewards", "list", "--json")
    entries = {entry["name"]: entry for entry in map(json.loads, out.splitlines())}
    assert code == 0 and entries["math"]["source"] == "builtin" and entries["test_batched"]["batched"]


def test_cli_check_prints_one_json_line(capsys):
    completion = "Half.\n</think>\n\\boxed{\\dfrac{1}{2}}"
    code, out, _ = run_cli(capsys, "rewards", "check", "math", "--completion", completion, "--row", '{"answer": "0.5"}')
    assert code == 0 and out.count("\n") == 1
    assert json.loads(out) == {"score": 1.0, "info": {"extracted": "\\dfrac{1}{2}", "reference": "0.5"}}
    code, out, _ = run_cli(capsys, "rewards", "check", "math", "--completion", "\\boxed{3}", "--row", '{"answer": "2"}')
    assert code == 0 and json.loads(out)["score"] == 0.0  # a zero is still a score


def test_cli_check_failures_and_usage_errors(capsys):
    code, out, _ = run_cli(capsys, "rewards", "check", "test_raises", "--completion", "boom")
    # A failing reward still scores (the failure score), so the exit code is 0; the JSON line says why.
    assert code == 0 and json.loads(out) == {"score": 0.0, "info": {"error": "RuntimeError: plugin bug", "failed": True}}
    code, out, err = run_cli(capsys, "rewards", "check", "no_such_reward", "--completion", "x")
    assert code == 2 and out == "" and "unknown reward 'no_such_reward'" in err
    code, out, err = run_cli(capsys, "rewards", "check", "math", "--completion", "x", "--row", "{not json")
    assert code == 2 and out == ""
    with pytest.raises(SystemExit):
        run_cli(capsys, "rewards", "check", "math")  # --completion is required


def test_cli_runs_as_a_module():
    result = subprocess.run(
        [sys.executable, "-m", "rewards.cli", "rewards", "check", "think_format", "--completion", "\nHi",
         "--row", '{"reasoning": "off"}'],
        capture_output=True, text=True, timeout=60, cwd=Path(__file__).parents[1],
    )
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout) == {"score": 1.0, "info": {"reasoning": "off", "problems": []}}
