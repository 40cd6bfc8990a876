"""Scoring a batch of completions with the configured rewards, isolating the batch from failing rewards.

A reward call that raises, returns None/NaN/inf or runs past `timeout_s` gives its samples `failure_score` for that
reward; failures are counted and logged once per reward and batch (the count and the first row id and reason), and
the other samples are scored as usual. A reward that fails on more than `max_failure_rate` of its last
`failure_window` samples, one that hangs on every call for instance, is stopped or disabled (`on_failing`): its
remaining calls are not made, so it costs a few timeouts, not one per sample.

Two ways to run the calls:
- "ray": a small pool of Ray actors, one call per actor at a time, so slow rewards do not serialise the batch and a
  hung call is ended by killing its actor (a fresh one replaces it). See `rewards.ray_pool`.
- "inprocess": threads in the calling process, for tests and debugging. It imports nothing from Ray. A hung call
  cannot be stopped there: its thread is abandoned (daemon) and its samples get the failure score.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import queue
import threading
import time
from collections import Counter, deque
from dataclasses import asdict, dataclass, field
from typing import Any

from rewards.config import RewardsConfig, RewardsConfigError, RewardSpec
from rewards.registry import Reward, RewardResult, get_reward

logger = logging.getLogger(__name__)


@dataclass
class ScoredSample:
    """The scores of one completion."""

    score: float  # sum over its rewards of weight * score
    scores: dict[str, float]  # per reward; failure_score where the reward failed
    info: dict[str, dict[str, Any]]  # per reward, as the reward returned it
    failed: bool = False  # some reward failed for this sample
    errors: dict[str, str] = field(default_factory=dict)  # per failed reward: why


@dataclass
class RewardCall:
    """One unit of work: a per-sample reward on one completion, or a batched reward on several."""

    reward: Reward
    completions: list[str]
    rows: list[dict[str, Any]]  # one per completion
    args: dict[str, Any] = field(default_factory=dict)  # the spec's fixed arguments; they override row fields


# One outcome per completion of a call: (score, info, error); error is None on success.
Outcome = tuple[float, dict[str, Any], "str | None"]


def execute_call(call: RewardCall) -> list[Outcome]:
    """Run one call and turn whatever it returns or raises into outcomes. Never raises."""
    reward = call.reward
    try:
        if reward.batched:
            # Row fields become columns (lists, one value per completion); spec args stay plain values.
            columns = {key: [row.get(key) for row in call.rows] for row in call.rows for key in row}
            values = _invoke(reward, call.completions, reward.select_kwargs({**columns, **call.args}))
            if not isinstance(values, (list, tuple)) or len(values) != len(call.completions):
                raise TypeError(f"batched reward returned {type(values).__name__}, not a list of "
                                f"{len(call.completions)} results")
        else:
            values = [_invoke(reward, completion, reward.select_kwargs({**row, **call.args}))
                      for completion, row in zip(call.completions, call.rows)]
    except Exception as e:  # any plugin error becomes a failed sample, never a failed batch
        return [(math.nan, {}, f"{type(e).__name__}: {e}")] * len(call.completions)
    return [_normalise(value) for value in values]


def _invoke(reward: Reward, first: Any, kwargs: dict[str, Any]) -> Any:
    result = reward.fn(first, **kwargs)
    return asyncio.run(result) if reward.is_async else result


def _normalise(value: Any) -> Outcome:
    if isinstance(value, RewardResult):
        score, info = value.score, dict(value.info)
    elif isinstance(value, (int, float)):  # bool included: True/False score 1/0
        score, info = value, {}
    elif value is None:
        return math.nan, {}, "returned None"
    else:
        return math.nan, {}, f"returned {type(value).__name__}, not a number or RewardResult"
    try:
        score = float(score)
    except (TypeError, ValueError):
        return math.nan, info, f"score {score!r} is not a number"
    if not math.isfinite(score):
        return math.nan, info, f"returned {score}"
    return score, info, None


class RewardFailingError(RuntimeError):
    """A reward failed on too many of its recent samples and `on_failing` is `stop`."""


class FailureGuard:
    """Per reward, whether each of its last `window` samples failed; past `max_rate`, the reward is stopped
    (RewardFailingError) or disabled (its calls are skipped, their samples fail with the reason)."""

    def __init__(self, config: RewardsConfig):
        self.window, self.max_rate, self.action = config.failure_window, config.max_failure_rate, config.on_failing
        self.recent: dict[str, deque[bool]] = {}
        self.disabled: dict[str, str] = {}  # reward name -> why

    def skip_reason(self, call: RewardCall) -> str | None:
        """Why `call` is not to be made (its reward is disabled), or None."""
        return self.disabled.get(call.reward.name)

    def record(self, call: RewardCall, outcomes: list[Outcome]) -> None:
        name = call.reward.name
        recent = self.recent.setdefault(name, deque(maxlen=self.window))
        recent.extend(error is not None for _, _, error in outcomes)
        failed = sum(recent)
        if name in self.disabled or len(recent) < self.window or failed <= self.max_rate * len(recent):
            return
        last_error = next(error for _, _, error in reversed(outcomes) if error is not None)
        problem = (f"reward {name!r} failed on {failed} of its last {len(recent)} samples (last: {last_error}), "
                   f"more than rewards.max_failure_rate={self.max_rate}")
        if self.action == "stop":
            raise RewardFailingError(f"{problem}. Fix the reward, or set rewards.on_failing=disable to go on "
                                     "without it (its samples then score failure_score)")
        self.disabled[name] = f"disabled after {problem}"
        logger.error("%s: disabled for the rest of the run (rewards.on_failing=disable); its samples score "
                     "failure_score", problem)


def run_in_threads(calls: list[RewardCall], timeout_s: float, max_concurrency: int,
                   guard: FailureGuard | None = None) -> list[list[Outcome]]:
    """Run calls on daemon threads, at most `max_concurrency` at once; a call past `timeout_s` is abandoned.

    `guard` sees every outcome as it arrives and may skip the calls not yet started (or raise)."""
    results: list[list[Outcome] | None] = [None] * len(calls)
    done: queue.Queue = queue.Queue()
    pending = deque(range(len(calls)))
    deadlines: dict[int, float] = {}

    def work(i: int) -> None:
        done.put((i, execute_call(calls[i])))

    def finish(i: int, outcome: list[Outcome]) -> None:
        results[i] = outcome
        if guard is not None:
            guard.record(calls[i], outcome)

    while pending or deadlines:
        while pending and len(deadlines) < max_concurrency:
            i = pending.popleft()
            if guard is not None and (reason := guard.skip_reason(calls[i])):
                results[i] = failed_outcomes(calls[i], reason)
                continue
            # Daemon threads, not an executor: an executor joins its threads at exit, so a hung reward would
            # hang the interpreter's exit too.
            threading.Thread(target=work, args=(i,), name=f"reward-{calls[i].reward.name}", daemon=True).start()
            deadlines[i] = time.monotonic() + timeout_s
        if not deadlines:
            continue
        try:
            i, outcome = done.get(timeout=max(0.0, min(deadlines.values()) - time.monotonic()))
            if i in deadlines:  # else it finished after being given up on
                del deadlines[i]
                finish(i, outcome)
        except queue.Empty:
            now = time.monotonic()
            for i in [i for i, deadline in deadlines.items() if deadline <= now]:
                del deadlines[i]
                finish(i, timeout_outcomes(calls[i], timeout_s))
    return results  # type: ignore[return-value]


def failed_outcomes(call: RewardCall, why: str) -> list[Outcome]:
    """Every sample of `call` failed for the same reason (timed out, skipped, its worker died)."""
    return [(math.nan, {}, why)] * len(call.completions)


def timeout_outcomes(call: RewardCall, timeout_s: float) -> list[Outcome]:
    return failed_outcomes(call, f"timed out after {timeout_s} s")


def check_reward_names(config: RewardsConfig, section: str = "rewards") -> None:
    """Every reward `config` names resolves (registered, an entry point, or an importable `module:function`) and
    takes its `args`, else RewardsConfigError naming the key, e.g. `mining.rewards.rewards[0].name`. Stages call it
    before loading a model."""
    for where, specs in config.spec_lists():
        for i, spec in enumerate(specs):
            try:
                found = get_reward(spec.name)
            except (KeyError, ImportError, AttributeError, TypeError, ValueError) as exc:
                problem = exc.args[0] if isinstance(exc, KeyError) and exc.args else str(exc)
                raise RewardsConfigError(f"{section}.{where}[{i}].name", problem) from exc
            if found.check_args is not None:
                try:
                    found.check_args(spec.args)
                except ValueError as exc:
                    raise RewardsConfigError(f"{section}.{where}[{i}].args", str(exc)) from exc


class RewardScorer:
    """Scores batches with one config. Keeps its Ray actor pool (if any) between batches; `close()` ends it."""

    def __init__(self, config: RewardsConfig):
        config.validate()
        self.config = config
        self.failure_counts: Counter[str] = Counter()  # reward name -> failed samples, over this scorer's life
        check_reward_names(config)  # unknown names fail here, before any generation
        self._releases = []  # what the rewards' prepare hooks hold (a served model): let go in close()
        for _, specs in config.spec_lists():
            for spec in specs:
                if (found := get_reward(spec.name)).prepare is not None:
                    if callable(release := found.prepare(spec.args)):
                        self._releases.append(release)
        self.guard = FailureGuard(config)
        self._pool = None
        if config.mode == "ray":
            from rewards.ray_pool import RayRewardPool  # imported only here: in-process mode never loads Ray

            self._pool = RayRewardPool(size=config.max_concurrency, timeout_s=config.timeout_s)

    def score_batch(self, completions: list[str], rows: list[dict[str, Any]]) -> list[ScoredSample]:
        """Score completion i against rows[i]. Always returns one ScoredSample per completion."""
        if len(completions) != len(rows):
            raise ValueError(f"{len(completions)} completions but {len(rows)} rows")
        calls, owners = self._plan(completions, rows)
        if self._pool is not None:
            outcomes = self._pool.run(calls, self.guard)
        else:
            outcomes = run_in_threads(calls, self.config.timeout_s, self.config.max_concurrency, self.guard)

        samples = [ScoredSample(0.0, {}, {}) for _ in completions]
        failures: dict[str, list[tuple[int, str]]] = {}  # reward -> (sample, why), for one warning per reward
        for call, (spec, members), call_outcomes in zip(calls, owners, outcomes):
            for i, (score, info, error) in zip(members, call_outcomes):
                sample = samples[i]
                if error is not None:
                    score = self.config.failure_score
                    sample.failed = True
                    sample.errors[spec.name] = error
                    self.failure_counts[spec.name] += 1
                    failures.setdefault(spec.name, []).append((i, error))
                sample.scores[spec.name] = score
                sample.info[spec.name] = info
                sample.score += spec.weight * score
        for name, failed in failures.items():
            first, why = failed[0]
            logger.warning("reward %r failed on %d of %d samples of this batch; first: row %s: %s", name, len(failed),
                           len(completions), rows[first].get(self.config.id_column, f"#{first}"), why)
        return samples

    def _plan(
        self, completions: list[str], rows: list[dict[str, Any]]
    ) -> tuple[list[RewardCall], list[tuple[RewardSpec, list[int]]]]:
        """One call per (sample, per-sample reward); one call per batched reward spec over all its samples."""
        calls: list[RewardCall] = []
        owners: list[tuple[RewardSpec, list[int]]] = []
        batched: dict[tuple[str, str], tuple[RewardSpec, list[int]]] = {}
        for i, row in enumerate(rows):
            for spec in self.config.specs_for(row):
                if get_reward(spec.name).batched:
                    key = (spec.name, json.dumps(spec.args, sort_keys=True, default=str))
                    batched.setdefault(key, (spec, []))[1].append(i)
                else:
                    calls.append(RewardCall(get_reward(spec.name), [completions[i]], [row], spec.args))
                    owners.append((spec, [i]))
        for spec, members in batched.values():
            members_rows = [rows[i] for i in members]
            calls.append(RewardCall(get_reward(spec.name), [completions[i] for i in members], members_rows, spec.args))
            owners.append((spec, members))
        return calls, owners

    def close(self) -> None:
        if self._pool is not None:
            self._pool.close()
            self._pool = None
        while self._releases:
            self._releases.pop()()


_SCORERS: dict[str, RewardScorer] = {}
_SCORERS_LOCK = threading.Lock()


def score_batch(completions: list[str], rows: list[dict[str, Any]], config: RewardsConfig) -> list[ScoredSample]:
    """Score completion i against rows[i] with `config`. Reuses one scorer (and Ray pool) per distinct config."""
    key = json.dumps(asdict(config), sort_keys=True, default=str)
    with _SCORERS_LOCK:
        scorer = _SCORERS.get(key)
        if scorer is None:
            scorer = _SCORERS[key] = RewardScorer(config)
    return scorer.score_batch(completions, rows)


def close_scorers() -> None:
    """End every scorer `score_batch` created (and their Ray actors)."""
    with _SCORERS_LOCK:
        for scorer in _SCORERS.values():
            scorer.close()
        _SCORERS.clear()
