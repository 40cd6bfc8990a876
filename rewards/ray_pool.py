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
from rewards.scoring import Outcome, RewardCall, execute_call, timeout_outcomes


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
        if not ray.is_initialized():
            ray.init(address="local", include_dashboard=False, _node_ip_address="127.0.0.1", configure_logging=False)
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
        self.timeout_s = timeout_s

    def run(self, calls: list[RewardCall]) -> list[list[Outcome]]:
        results: list[list[Outcome] | None] = [None] * len(calls)
        pending = deque(range(len(calls)))
        idle = deque(self._actors)
        in_flight: dict[ray.ObjectRef, tuple[int, object, float]] = {}  # ref -> (call, actor, deadline)
        while pending or in_flight:
            while pending and idle:
                i, actor = pending.popleft(), idle.popleft()
                in_flight[actor.run.remote(calls[i])] = (i, actor, time.monotonic() + self.timeout_s)
            next_deadline = min(deadline for _, _, deadline in in_flight.values())
            ready, _ = ray.wait(list(in_flight), num_returns=1, timeout=max(0.0, next_deadline - time.monotonic()))
            for ref in ready:
                i, actor, _ = in_flight.pop(ref)
                try:
                    results[i] = ray.get(ref)
                    idle.append(actor)
                except ray.exceptions.RayError as e:  # the actor died (a reward called os._exit), or unpickling failed
                    error = f"reward worker failed: {type(e).__name__}: {_last_line(e)}"
                    results[i] = [(float("nan"), {}, error)] * len(calls[i].completions)
                    idle.append(self._replace(actor))
            now = time.monotonic()
            for ref, (i, actor, deadline) in list(in_flight.items()):
                if deadline <= now:
                    del in_flight[ref]
                    results[i] = timeout_outcomes(calls[i], self.timeout_s)
                    idle.append(self._replace(actor))
        return results  # type: ignore[return-value]

    def _replace(self, actor) -> object:
        ray.kill(actor, no_restart=True)
        fresh = self._worker_cls.remote()
        ray.get(fresh.ready.remote())
        self._actors[self._actors.index(actor)] = fresh
        return fresh

    def close(self) -> None:
        for actor in self._actors:
            ray.kill(actor, no_restart=True)
        self._actors = []


def _last_line(error: Exception) -> str:
    lines = [line for line in str(error).strip().splitlines() if line.strip()]
    return lines[-1][:300] if lines else ""
