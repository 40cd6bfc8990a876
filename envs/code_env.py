"""Programming problems graded by running the row's tests in the sandbox (`code_tests` reward)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from envs.base import Environment
from rewards import RewardSpec

CODE_INSTRUCTION = "Write your solution as a single ```python code block."


@dataclass
class CodeEnv(Environment):
    """Rows: `prompt`, `tests` (statements like `assert f(2) == 4`, or {"input", "output"} pairs)."""

    task: str = "code"
    rewards: list[RewardSpec] = field(default_factory=lambda: [RewardSpec("code_tests", 1.0)])

    def user_prompt(self, row: dict[str, Any]) -> str:
        return f"{row['prompt']}\n\n{CODE_INSTRUCTION}"
