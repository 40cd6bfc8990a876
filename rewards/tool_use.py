"""`tool_call` and `tool_state`: tool calls graded against the row's reference calls and its ground-truth world.

- `tool_call` scores one assistant turn: the calls parsed from the completion against the reference calls of
  that turn (`metadata.reference_calls[turn]`, default the first), by name and by JSON value of the arguments, in
  any order unless the row says `metadata.ordered_calls: true`.
- `tool_state` scores a whole episode: `episode_turns` (the text of every assistant turn, as
  `alignment.rollout.episodes` records them; the completion alone is a one-turn episode) is executed again against
  the row's initial world (`envs.tool_env.replay`); 1 when the final world is the target and the answer right.

Both score 0, with the reason in `info`, for a call to a tool the row does not offer (hallucinated), a call block
that cannot be read (malformed) and arguments that do not fit the tool (missing, unknown, mistyped).
"""

from __future__ import annotations

from typing import Any

from alignment.tool_calls import ToolCall, tool_name
from envs.tool_env import arguments_problem, parse_turn, replay, same_calls
from rewards.registry import RewardResult, reward


@reward("tool_call")
def tool_call(completion: str, tools: list[dict], metadata: dict[str, Any], turn: int = 0) -> RewardResult:
    """1 when the completion's calls are the reference calls of `turn` (names, arguments by value), else 0."""
    reference = (metadata.get("reference_calls") or [])[turn:turn + 1]
    if not reference:
        raise ValueError(f"tool_call: the row has no metadata.reference_calls[{turn}]")
    _, parsed = parse_turn(completion, tools)
    if parsed.malformed:
        return RewardResult(0.0, {"reason": f"malformed: {parsed.malformed}"})
    specs = {tool_name(t): t for t in tools}
    for call in parsed.calls:
        if call.name not in specs:
            return RewardResult(0.0, {"reason": f"hallucinated tool {call.name!r}", "hallucinated": True})
        problem = arguments_problem(specs[call.name], call.arguments)
        if problem:
            return RewardResult(0.0, {"reason": f"bad arguments: {problem}"})
    expected = reference[0]
    if metadata.get("ordered_calls"):
        matched = [c.key() for c in parsed.calls] == [ToolCall(r["name"], r["arguments"]).key() for r in expected]
    else:
        matched = same_calls(parsed.calls, expected)
    if not matched:
        got = [f"{c.name}({c.arguments})" for c in parsed.calls] or "no call"
        return RewardResult(0.0, {"reason": f"calls {got} are not the reference"})
    return RewardResult(1.0, {"calls": len(parsed.calls)})


@reward("tool_state")
def tool_state(completion: str, tools: list[dict], metadata: dict[str, Any], answer: str | None = None,
               episode_turns: list[str] | None = None) -> RewardResult:
    """1 when replaying the episode's turns leaves the target world and the right answer, with no bad call."""
    row = {"tools": tools, "metadata": metadata, "answer": answer}
    outcome = replay(row, episode_turns if episode_turns else [completion])
    return RewardResult(float(outcome.success), outcome.info())
