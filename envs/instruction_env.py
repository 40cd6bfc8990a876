"""Instruction following graded by rule-checked constraints (`instruction` reward)."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from envs.base import Environment
from rewards import RewardSpec
from rewards.instruction import describe_constraint


@dataclass
class InstructionEnv(Environment):
    """Rows: `prompt`, `constraints` (see `rewards.instruction`).

    describe_constraints: append the constraints, in words, to the prompt (for rows whose prompt does not state them).
    """

    task: str = "instruction"
    rewards: list[RewardSpec] = field(default_factory=lambda: [RewardSpec("instruction", 1.0)])
    describe_constraints: bool = True

    def user_prompt(self, row: dict[str, Any]) -> str:
        constraints = row.get("constraints") or []
        if isinstance(constraints, str):
            constraints = json.loads(constraints)
        if not self.describe_constraints or not constraints:
            return row["prompt"]
        return row["prompt"] + "\n\n" + "\n".join(describe_constraint(c) for c in constraints)
