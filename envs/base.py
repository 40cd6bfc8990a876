"""The environment interface: how a dataset row becomes prompt messages, and how a completion is graded.

An environment is single-turn here: `prompt_messages(row)` gives the conversation up to the assistant turn and
`grade(completion, row)` scores the one completion. A multi-turn (tool) environment can add a step that takes the
conversation so far and returns the next user/tool message, without changing these two methods.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from rewards import RewardScorer, RewardsConfig, RewardSpec, ScoredSample

REASONING_SWITCH = {"on": "/think", "off": "/no_think"}


@dataclass
class Environment:
    """Base class. Subclasses set `task` and `rewards` defaults and write `user_prompt`.

    task: the value of a row's `task` column this environment serves (the route in a mixed rewards config).
    system_prompt: text of the system message; the row's reasoning switch (`/think`, `/no_think`) is added to it.
    rewards: the rewards that grade a completion, with their weights.
    """

    task: str = ""
    system_prompt: str = ""
    rewards: list[RewardSpec] = field(default_factory=list)

    def user_prompt(self, row: dict[str, Any]) -> str:
        raise NotImplementedError

    def prompt_messages(self, row: dict[str, Any]) -> list[dict[str, str]]:
        """The conversation up to the assistant turn to generate.

        Rows in the project's schema carry `messages` ending with the reference assistant turn: the prompt is what
        comes before it. Otherwise: a system message (with the row's `reasoning` switch, when it has one) and the
        user message this environment writes from the row's fields.
        """
        if row.get("messages"):
            messages = list(row["messages"])
            while messages and messages[-1].get("role") == "assistant":
                messages.pop()
            return messages
        messages = []
        switch = REASONING_SWITCH.get(str(row.get("reasoning", "")).lower())
        system = " ".join(part for part in (self.system_prompt, switch) if part)
        if system:
            messages.append({"role": "system", "content": system})
        messages.append({"role": "user", "content": self.user_prompt(row)})
        return messages

    def grade(self, completion: str, row: dict[str, Any]) -> ScoredSample:
        """Score one completion in process with this environment's rewards (for evaluation and debugging)."""
        return self.grade_batch([completion], [row])[0]

    def grade_batch(self, completions: list[str], rows: list[dict[str, Any]]) -> list[ScoredSample]:
        config = RewardsConfig(rewards=list(self.rewards), mode="inprocess")
        return RewardScorer(config).score_batch(completions, [self._route_free(row) for row in rows])

    @staticmethod
    def _route_free(row: dict[str, Any]) -> dict[str, Any]:
        # This environment's rewards decide, not the row's routing columns.
        return {k: v for k, v in row.items() if k != "reward"}


def rewards_config(environments: list[Environment], **settings: Any) -> RewardsConfig:
    """A config that routes each row to the rewards of the environment named by its `task` column.

    For example `rewards_config([MathEnv(), CodeEnv()], mode="ray")` scores math and code rows mixed in one batch.
    A row whose `task` names none of the environments is an error.
    """
    routes = {env.task: list(env.rewards) for env in environments}
    return RewardsConfig(rewards=[], routes=routes, **settings)
