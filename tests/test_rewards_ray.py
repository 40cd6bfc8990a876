"""Ray mode: rewards run in a pool of actors; failures and hangs are contained there too.

Starting Ray takes ~10 s on a small machine, so the module starts it once and keeps to two tests.
"""

from __future__ import annotations

import math
import os
import time

import pytest

from rewards import RewardResult, RewardScorer, RewardsConfig, RewardSpec, reward

ray = pytest.importorskip("ray")


@reward("ray_test_mixed")
def mixed(completion: str) -> RewardResult:
    """Misbehaves on request; reports the worker process it ran in."""
    if completion == "raise":
        raise ValueError("bad plugin")
    if completion == "nan":
        return RewardResult(math.nan)
    if completion == "hang":
        time.sleep(600)
    if completion == "exit":
        os._exit(1)  # takes its actor down
    return RewardResult(1.0, {"pid": os.getpid()})


@pytest.fixture(scope="module")
def scorer():
    started_here = not ray.is_initialized()
    config = RewardsConfig(rewards=[RewardSpec("ray_test_mixed"), RewardSpec("math")], mode="ray",
                           timeout_s=4.0, max_concurrency=2, failure_score=-1.0)
    scorer = RewardScorer(config)
    yield scorer
    scorer.close()
    if started_here:
        ray.shutdown()


def test_actors_score_the_batch_despite_failing_rewards(scorer):
    completions = ["ok \\boxed{2}", "raise", "nan", "hang", "exit", "ok \\boxed{3}"]
    rows = [{"id": i, "answer": "2"} for i in range(len(completions))]
    samples = scorer.score_batch(completions, rows)
    assert [s.scores["ray_test_mixed"] for s in samples] == [1.0, -1.0, -1.0, -1.0, -1.0, 1.0]
    assert [s.scores["math"] for s in samples] == [1.0, 0.0, 0.0, 0.0, 0.0, 0.0]
    assert samples[1].errors["ray_test_mixed"] == "ValueError: bad plugin"
    assert samples[3].errors["ray_test_mixed"] == "timed out after 4.0 s"
    assert samples[4].errors["ray_test_mixed"].startswith("reward worker failed")
    assert samples[0].info["ray_test_mixed"]["pid"] != os.getpid()  # scored in an actor, not here


def test_the_pool_recovers_after_killing_hung_actors(scorer):
    start = time.monotonic()
    samples = scorer.score_batch(["ok"] * 4, [{"answer": "1"}] * 4)
    assert [s.scores["ray_test_mixed"] for s in samples] == [1.0] * 4
    assert time.monotonic() - start < 30


def test_a_reward_hanging_on_every_call_is_disabled_after_its_window(scorer):
    config = RewardsConfig(rewards=[RewardSpec("ray_test_mixed")], mode="ray", timeout_s=2.0, max_concurrency=2,
                           failure_window=4, on_failing="disable")
    hanging = RewardScorer(config)
    try:
        samples = hanging.score_batch(["hang"] * 24, [{"id": i} for i in range(24)])
    finally:
        hanging.close()
    errors = [s.errors["ray_test_mixed"] for s in samples]
    timed_out = errors.count("timed out after 2.0 s")
    assert 4 <= timed_out <= 4 + 2 - 1  # the window, plus a call already running when it filled
    assert all(e.startswith("disabled after reward 'ray_test_mixed'") for e in errors if "timed out" not in e)
