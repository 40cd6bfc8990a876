"""The rewards section of a GRPO/DPO config: which rewards score which rows, and how failures are handled.

    rewards:                       # rows without a route
      - {name: math, weight: 1.0}
      - think_format               # a bare name means weight 1
    routes:                        # by the row's `task` column
      code: [{name: code_tests, args: {max_tests: 50}}]
    failure_score: 0.0
    timeout_s: 30
    mode: ray                      # or inprocess (tests, debugging)

A row's own `reward` column (a name or a list of names, weight 1 each) overrides both.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

MODES = ("ray", "inprocess")


class RewardsConfigError(ValueError):
    """A rewards config that cannot be used; the message names the key, and the file when there is one."""

    def __init__(self, key: str, problem: str, source: str | None = None):
        super().__init__(f"{key}: {problem}" if source is None else f"{source}: {key}: {problem}")
        self.key, self.problem = key, problem


@dataclass
class RewardSpec:
    """One reward of a config and its weight in the total score."""

    name: str = field(metadata={"help": "registered name, entry-point name, or module:function path"})
    weight: float = field(default=1.0, metadata={"help": "multiplies this reward's score in the sample's total"})
    args: dict[str, Any] = field(
        default_factory=dict, metadata={"help": "fixed keyword arguments; they override same-named row fields"}
    )


@dataclass
class RewardsConfig:
    """Which rewards score which rows, and how failures, timeouts and concurrency are handled."""

    rewards: list[RewardSpec] = field(
        default_factory=lambda: [RewardSpec("math")], metadata={"help": "rewards for rows without a route"}
    )
    routes: dict[str, list[RewardSpec]] = field(
        default_factory=dict, metadata={"help": "value of the row's route column -> the rewards for that row"}
    )
    route_column: str = field(default="task", metadata={"help": "row column that picks a route"})
    failure_score: float = field(
        default=0.0, metadata={"help": "score of a reward that raised, returned None/NaN or timed out"}
    )
    timeout_s: float = field(
        default=30.0, metadata={"help": "seconds per reward call (a batched reward's call covers its batch)"}
    )
    mode: Literal["ray", "inprocess"] = field(
        default="ray", metadata={"help": "ray: a pool of actors; inprocess: threads here (tests, debugging)"}
    )
    max_concurrency: int = field(
        default=4, metadata={"help": "reward calls running at once (Ray actors, or threads in process)"}
    )
    id_column: str = field(default="id", metadata={"help": "row column logged with each failure"})
    max_failure_rate: float = field(
        default=0.5, metadata={"help": "a reward that fails on more than this share of its last `failure_window` "
                                       "samples is stopped or disabled (`on_failing`); 1 never trips"}
    )
    failure_window: int = field(
        default=16, metadata={"help": "samples per reward over which the failure rate is judged"}
    )
    on_failing: Literal["stop", "disable"] = field(
        default="stop", metadata={"help": "stop: end the stage with an error; disable: stop calling the reward, "
                                          "its samples score failure_score, with a warning each batch"}
    )

    def __post_init__(self) -> None:
        # Accept bare names and plain mappings however the config was built (YAML, a generic loader, code);
        # anything else is left for validate() to report.
        if isinstance(self.rewards, list):
            self.rewards = [_to_spec(item) for item in self.rewards]
        if isinstance(self.routes, dict):
            self.routes = {
                str(task): [_to_spec(item) for item in specs] if isinstance(specs, list) else specs
                for task, specs in self.routes.items()
            }

    def validate(self) -> None:
        """Raise RewardsConfigError naming the first bad key."""
        if self.mode not in MODES:
            raise RewardsConfigError("mode", f"must be one of {list(MODES)}, got {self.mode!r}")
        for key in ("failure_score", "timeout_s"):
            if not _is_number(getattr(self, key)):
                raise RewardsConfigError(key, f"must be a number, got {getattr(self, key)!r}")
        if self.timeout_s <= 0:
            raise RewardsConfigError("timeout_s", f"must be > 0, got {self.timeout_s}")
        if not _is_number(self.max_failure_rate) or not 0 <= self.max_failure_rate <= 1:
            raise RewardsConfigError("max_failure_rate", f"must be a number in [0, 1], got {self.max_failure_rate!r}")
        if not isinstance(self.failure_window, int) or isinstance(self.failure_window, bool) \
                or self.failure_window < 1:
            raise RewardsConfigError("failure_window", f"must be an integer >= 1, got {self.failure_window!r}")
        if self.on_failing not in ("stop", "disable"):
            raise RewardsConfigError("on_failing", f"must be one of ['stop', 'disable'], got {self.on_failing!r}")
        if not isinstance(self.max_concurrency, int) or isinstance(self.max_concurrency, bool) \
                or self.max_concurrency < 1:
            raise RewardsConfigError("max_concurrency", f"must be an integer >= 1, got {self.max_concurrency!r}")
        if not isinstance(self.rewards, list):
            raise RewardsConfigError("rewards", f"expected a list of {{name, weight}}, got {self.rewards!r}")
        if not isinstance(self.routes, dict):
            raise RewardsConfigError("routes", f"expected a mapping of task -> list of rewards, got {self.routes!r}")
        if not self.rewards and not self.routes:
            raise RewardsConfigError("rewards", "no rewards configured")
        for where, specs in self.spec_lists():
            if not isinstance(specs, list):
                raise RewardsConfigError(where, f"expected a list of {{name, weight}}, got {specs!r}")
            for i, spec in enumerate(specs):
                _check_spec(spec, f"{where}[{i}]")
            names = [spec.name for spec in specs]
            for name in names:
                if names.count(name) > 1:  # scores are reported by name
                    raise RewardsConfigError(where, f"reward {name!r} is listed twice")

    def spec_lists(self) -> list[tuple[str, Any]]:
        """(key, list of rewards) for the default list and every route: `rewards`, `routes.code`, ..."""
        return [("rewards", self.rewards)] + [(f"routes.{task}", specs) for task, specs in self.routes.items()]

    @classmethod
    def from_dict(cls, data: Any, source: str = "<dict>") -> RewardsConfig:
        """Build and validate from a mapping (a YAML document or section); errors name `source` and the key."""
        if not isinstance(data, dict):
            raise RewardsConfigError("(top level)", f"expected a mapping, got {type(data).__name__}", source)
        known = list(cls.__dataclass_fields__)
        for key in data:
            if key not in known:
                raise RewardsConfigError(key, f"unknown key; known: {', '.join(known)}", source)
        config = cls(**data)
        try:
            config.validate()
        except RewardsConfigError as e:
            raise RewardsConfigError(e.key, e.problem, source) from None
        return config

    @classmethod
    def from_yaml(cls, path: str | Path) -> RewardsConfig:
        """Load a YAML file holding the fields of this class."""
        with open(path, encoding="utf-8") as f:
            return cls.from_dict(yaml.safe_load(f) or {}, source=str(path))

    def specs_for(self, row: dict[str, Any]) -> list[RewardSpec]:
        """The rewards for one row: its `reward` column, else its route, else the default list."""
        names = row.get("reward")
        if names:
            return [RewardSpec(name) for name in ([names] if isinstance(names, str) else names)]
        route = row.get(self.route_column)
        if route is not None and str(route) in self.routes:
            return self.routes[str(route)]
        if not self.rewards:
            raise ValueError(f"row has {self.route_column}={route!r}, which has no route "
                             f"(routes: {sorted(self.routes)}), and the config has no default rewards")
        return self.rewards


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _to_spec(item: Any) -> Any:
    if isinstance(item, str):
        return RewardSpec(item)
    if isinstance(item, dict) and "name" in item and set(item) <= {"name", "weight", "args"}:
        return RewardSpec(item["name"], item.get("weight", 1.0), item.get("args") or {})
    return item


def _check_spec(spec: Any, key: str) -> None:
    if isinstance(spec, dict):
        unknown = sorted(set(spec) - {"name", "weight", "args"})
        problem = f"unknown keys {unknown}; known: name, weight, args" if unknown else "needs a `name`"
        raise RewardsConfigError(key, problem)
    if not isinstance(spec, RewardSpec):
        raise RewardsConfigError(key, f"expected a reward name or a mapping with `name`, got {spec!r}")
    if not isinstance(spec.name, str) or not spec.name:
        raise RewardsConfigError(f"{key}.name", f"must be a non-empty string, got {spec.name!r}")
    if not _is_number(spec.weight):
        raise RewardsConfigError(f"{key}.weight", f"must be a number, got {spec.weight!r}")
    if not isinstance(spec.args, dict):
        raise RewardsConfigError(f"{key}.args", f"must be a mapping, got {spec.args!r}")
