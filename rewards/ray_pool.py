"""A small pool of Ray actors that run reward calls, one call per actor at a time.

Ray: when Ray is not initialised in this process, the pool starts a private local one
(`ray.init(address="local")`, bound to 127.0.0.1, no dashboard) rather than joining a cluster found through
RAY_ADDRESS. A trainer that runs on a cluster calls `ray.init(...)` itself first, and the pool uses that.

A call that runs past its timeout is ended by killing its actor; a fresh actor takes the dead one's place.
"""

from __future__ import annotations

import os
import sys
import time
from collections import deque

import ray

from rewards.registry import list_rewards
from rewards.scoring import FailureGuard, Outcome, RewardCall, execute_call, failed_outcomes, timeout_outcomes


def ensure_ray() -> None:
    """Start a private local Ray instance unless this process is already connected to one."""
    if not ray.is_initialized():
        ray.init(address="local", include_dashboard=False, _node_ip_address="127.0.0.1", configure_logging=False)


class _RewardWorker:
    """Runs reward calls in its own process."""

    def __init__(self) -> None:
        list_rewards()  # import the built-ins and plugins now, not inside the first call's timeout

    def ready(self) -> bool:
        return True

    def run(self, call: RewardCall) -> list[Outcome]:
        return execute_call(call)


class RayRewardPool:
    """`size` actors; `run(calls)` keeps every idle actor busy until all calls have an outcome."""

    def __init__(self, size: int, timeout_s: float):
        ensure_ray()
        # Actors import reward functions by module name: they get this process's import path and the working
        # directory (as rewards.registry looks there too), so rewards defined in the user's own (not installed)
        # modules load there as well. Reward calls mostly wait (subprocesses, sympy): reserve no CPUs the trainer's
        # actors may need.
        import_path = os.pathsep.join(dict.fromkeys(p for p in (*sys.path, os.getcwd()) if p and os.path.isdir(p)))
        self._worker_cls = ray.remote(
            num_cpus=0, max_restarts=0, runtime_env={"env_vars": {"PYTHONPATH": import_path}}
        )(_RewardWorker)
        self._actors = [self._worker_cls.remote() for _ in range(size)]
        # Timeouts count from dispatch, so wait until the actors are up before the first call.
        ray.get([actor.ready.remote() for actor in self._actors])
        self._starting: dict[ray.ObjectRef, object] = {}
        self.timeout_s = timeout_s

    def run(self, calls: list[RewardCall], guard: FailureGuard | None = None) -> list[list[Outcome]]:
        """Every call's outcomes. Deadlines are per call, from its dispatch; an actor replaced after a timeout
        starts while the others go on, and takes calls once it is up. `guard` sees each outcome as it arrives
        and may skip the calls not yet dispatched (or raise)."""
        results: list[list[Outcome] | None] = [None] * len(calls)
        pending = deque(range(len(calls)))
        starting = self._starting  # ready() ref -> a replacement actor, kept across batches
        idle = deque(actor for actor in self._actors if actor not in starting.values())
        in_flight: dict[ray.ObjectRef, tuple[int, object, float]] = {}  # ref -> (call, actor, deadline)

        def finish(i: int, outcome: list[Outcome]) -> None:
            results[i] = outcome
            if guard is not None:
                guard.record(calls[i], outcome)

        while pending or in_flight:
            while pending and idle:
                i = pending.popleft()
                if guard is not None and (reason := guard.skip_reason(calls[i])):
                    results[i] = failed_outcomes(calls[i], reason)
                    continue
                actor = idle.popleft()
                in_flight[actor.run.remote(calls[i])] = (i, actor, time.monotonic() + self.timeout_s)
            if not in_flight and not (pending and starting):
                break
            deadlines = [deadline for _, _, deadline in in_flight.values()]
            wait_s = max(0.0, min(deadlines) - time.monotonic()) if deadlines else None
            ready, _ = ray.wait([*in_flight, *starting], num_returns=1, timeout=wait_s)
            for ref in ready:
                if ref in starting:
                    idle.append(starting.pop(ref))
                    continue
                i, actor, _ = in_flight.pop(ref)
                try:
                    outcome = ray.get(ref)
                    idle.append(actor)
                except ray.exceptions.RayError as e:  # the actor died (a reward called os._exit), or unpickling failed
                    outcome = failed_outcomes(calls[i], f"reward worker failed: {type(e).__name__}: {_last_line(e)}")
                    self._replace(actor)
                finish(i, outcome)
            now = time.monotonic()
            for ref, (i, actor, deadline) in list(in_flight.items()):
                if deadline <= now:
                    del in_flight[ref]
                    self._replace(actor)
                    finish(i, timeout_outcomes(calls[i], self.timeout_s))
        return results  # type: ignore[return-value]

    def _replace(self, actor) -> None:
        """Kill `actor` and start a fresh one in its place: it takes calls once its ready() returns."""
        ray.kill(actor, no_restart=True)
        fresh = self._worker_cls.remote()
        self._actors[self._actors.index(actor)] = fresh
        self._starting[fresh.ready.remote()] = fresh

    def close(self) -> None:
        for actor in self._actors:
            ray.kill(actor, no_restart=True)
        self._actors, self._starting = [], {}


def _last_line(error: Exception) -> str:
    lines = [line for line in str(error).strip().splitlines() if line.strip()]
    return lines[-1][:300] if lines else ""
