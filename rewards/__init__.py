"""Reward plugins: register with `@reward("name")`, score batches with `score_batch` or a `RewardScorer`.

    from rewards import reward, RewardResult

    @reward("exact_answer")
    def exact_answer(completion: str, answer: str) -> float:
        return float(completion.strip() == answer.strip())

Built-ins: math, code_tests, think_format, think_budget, length, instruction, json_schema, tool_call, tool_state,
reward_model.
"""

from rewards.config import RewardsConfig, RewardsConfigError, RewardSpec
from rewards.registry import ENTRY_POINT_GROUP, Reward, RewardResult, get_reward, list_rewards, reward
from rewards.scoring import RewardScorer, ScoredSample, close_scorers, score_batch

__all__ = [
    "ENTRY_POINT_GROUP",
    "Reward",
    "RewardResult",
    "RewardScorer",
    "RewardSpec",
    "RewardsConfig",
    "RewardsConfigError",
    "ScoredSample",
    "close_scorers",
    "get_reward",
    "list_rewards",
    "reward",
    "score_batch",
]
