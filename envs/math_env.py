"""Math word problems graded by the `math` reward (final \\boxed{} answer against the row's `answer`)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from envs.base import Environment
from rewards import RewardSpec

MATH_INSTRUCTION = "Put the final answer in \\boxed{}."


@dataclass
class MathEnv(Environment):
    """Rows: `problem` (or `question`), `answer`; optional `reasoning` ("on"/"off")."""

    task: str = "math"
    rewards: list[RewardSpec] = field(default_factory=lambda: [RewardSpec("math", 1.0)])

    def user_prompt(self, row: dict[str, Any]) -> str:
        problem = row.get("problem", row.get("question"))
        if problem is None:
            raise KeyError("a math row needs a `problem` (or `question`) field")
        return f"{problem}\n\n{MATH_INSTRUCTION}"
