"""Tool use: a small in-memory world, the tools that act on it, and the replay that grades an episode.

The world is a key-value memory of integers (`{"apples": 12, ...}`); the built-in tools compute (`add`, `subtract`,
`multiply`) or read and write it (`get_value`, `set_value`). A task row lists the tools it offers (OpenAI specs in
`tools`) and keeps in `metadata` the world it starts from (`initial_state`), the world it must end in
(`target_state`), the reference calls of each turn (`reference_calls`) and, in `answer`, the final answer.

An episode is the model's assistant turns: each turn's calls are executed against the row's world in order and
their results fed back as `tool` messages (`alignment.rollout.episodes` drives the model). `replay` executes the
turns again from the initial state, so grading needs nothing but the row and the turns' text: the `tool_state`
reward, the evaluation and DPO mining all call it.

A user adds a tool with `@register_tool` in a module the reward plugin imports (README, "Tool calling"):

    @register_tool("double", "Twice a number.", x="integer")
    def double(state, x):
        return 2 * x
"""

from __future__ import annotations

import copy
import json
from dataclasses import dataclass, field
from typing import Any, Callable

from alignment.tool_calls import SYNTAXES, ParsedTurn, ToolCall, calls_of_message, tool_name
from envs.answers import answers_match, extract_boxed, split_thinking

JSON_TYPES = {"integer": int, "number": (int, float), "string": str, "boolean": bool, "object": dict, "array": list}


class ToolError(Exception):
    """A call the world refuses (a missing key, a bad argument); its text goes back to the model as the result."""


@dataclass(frozen=True)
class Tool:
    """A function the model may call. `run(state, **arguments)` returns a JSON value and may change `state`."""

    name: str
    description: str
    parameters: dict[str, str]  # argument name -> JSON type; all are required
    run: Callable[..., Any]

    def spec(self) -> dict:
        """The OpenAI function spec a row's `tools` lists."""
        properties = {name: {"type": kind} for name, kind in self.parameters.items()}
        return {"type": "function", "function": {
            "name": self.name, "description": self.description,
            "parameters": {"type": "object", "properties": properties, "required": list(self.parameters)}}}

    def argument_problem(self, arguments: dict) -> str | None:
        return arguments_problem(self.spec(), arguments)


def arguments_problem(spec: dict, arguments: dict) -> str | None:
    """Why `arguments` do not fit a function spec (missing required, unknown, wrong JSON type); None when fine."""
    function = spec.get("function") or spec
    name, parameters = function["name"], function.get("parameters") or {}
    properties = parameters.get("properties") or {}
    missing = [p for p in parameters.get("required", []) if p not in arguments]
    if missing:
        return f"{name}: missing argument(s) {missing}"
    unknown = [a for a in arguments if properties and a not in properties]
    if unknown:
        return f"{name}: unknown argument(s) {unknown}"
    for key, value in arguments.items():
        kind = (properties.get(key) or {}).get("type")
        if kind in JSON_TYPES and (isinstance(value, bool) and kind != "boolean" or not isinstance(value, JSON_TYPES[kind])):
            return f"{name}: `{key}` must be {kind}, got {json.dumps(value)}"
    return None


TOOLS: dict[str, Tool] = {}


def register_tool(name: str, description: str, **parameters: str) -> Callable:
    """Register the decorated `fn(state, **arguments)` as the tool `name`; parameters are name=JSON type."""
    for kind in parameters.values():
        if kind not in JSON_TYPES:
            raise ValueError(f"tool {name}: parameter type {kind!r} is not one of {list(JSON_TYPES)}")

    def decorate(fn: Callable) -> Callable:
        if name in TOOLS:
            raise ValueError(f"a tool named {name!r} is registered already")
        TOOLS[name] = Tool(name, description, dict(parameters), fn)
        return fn

    return decorate


@register_tool("add", "Add two integers.", a="integer", b="integer")
def _add(state, a, b):
    return a + b


@register_tool("subtract", "Subtract b from a.", a="integer", b="integer")
def _subtract(state, a, b):
    return a - b


@register_tool("multiply", "Multiply two integers.", a="integer", b="integer")
def _multiply(state, a, b):
    return a * b


@register_tool("get_value", "Read the integer stored under a key.", key="string")
def _get_value(state, key):
    if key not in state:
        raise ToolError(f"no value stored under {key!r}")
    return state[key]


@register_tool("set_value", "Store an integer under a key.", key="string", value="integer")
def _set_value(state, key, value):
    state[key] = value
    return "ok"


def tool_specs(names: list[str]) -> list[dict]:
    return [TOOLS[name].spec() for name in names]


# ---------------------------------------------------------------------------------------------------------------
# Reading and executing turns


def parse_turn(text: str, tools: list[dict] | None = None) -> tuple[str | None, ParsedTurn]:
    """(trace, turn) of an assistant turn's generated text, in whichever syntax it writes calls.

    The syntaxes are told apart by their markers, so grading needs no tokenizer: `<TOOLCALL>` is the JSON list,
    `<tool_call>` holding `<function=` the XML form, any other `<tool_call>` the Hermes JSON form.
    """
    trace, after = split_thinking(text)
    if "<TOOLCALL>" in after or "</TOOLCALL>" in after:
        syntax = SYNTAXES["json-list"]
    elif "<function=" in after:
        syntax = SYNTAXES["xml-function"]
    else:
        syntax = SYNTAXES["hermes-json"]
    return trace, syntax.parse(after, tools)


@dataclass
class CallOutcome:
    call: ToolCall
    result: Any = None
    error: str | None = None  # a refused call: its text is what the model reads back
    kind: str = "ok"  # ok, hallucinated (a tool not offered), bad_arguments, refused (the world said no)

    def message(self) -> dict:
        content = json.dumps({"error": self.error} if self.error else self.result)
        return {"role": "tool", "name": self.call.name, "content": content}


def execute(call: ToolCall, state: dict, offered: set[str]) -> CallOutcome:
    """Run one call against `state` (changed in place); a tool not offered, or not registered, is hallucinated."""
    tool = TOOLS.get(call.name)
    if call.name not in offered or tool is None:
        return CallOutcome(call, error=f"unknown tool {call.name!r}", kind="hallucinated")
    problem = tool.argument_problem(call.arguments)
    if problem:
        return CallOutcome(call, error=problem, kind="bad_arguments")
    try:
        return CallOutcome(call, result=tool.run(state, **call.arguments))
    except ToolError as exc:
        return CallOutcome(call, error=str(exc), kind="refused")


def offered_names(row: dict) -> set[str]:
    return {tool_name(spec) for spec in row.get("tools") or []}


@dataclass
class EpisodeOutcome:
    """How an episode went, from its turns' text: what `tool_state` scores and the evaluation counts."""

    success: bool  # final state equals the target and the final answer is right, with no bad call on the way
    exact_calls: bool  # each turn's calls equal the reference turn's (by value, in any order within a turn)
    hallucinated: bool  # some call named a tool the row does not offer
    malformed: bool  # some call block could not be read
    bad_arguments: bool  # some call had missing, unknown or mistyped arguments
    final_state: dict = field(default_factory=dict)
    answer: str | None = None
    reason: str = ""

    def info(self) -> dict:
        return {k: v for k, v in self.__dict__.items()}


def same_calls(calls: list[ToolCall], reference: list[dict]) -> bool:
    """Equal as multisets of (name, JSON-equal arguments): the order of calls inside one turn is free."""
    return sorted(c.key() for c in calls) == sorted(ToolCall(r["name"], r["arguments"]).key() for r in reference)


def replay(row: dict, turns: list[str]) -> EpisodeOutcome:
    """Execute an episode's assistant turns (their generated text, in order) against the row's world, and grade it.

    The episode ends at the first turn without calls (its answer is the final one) or at the last turn given.
    """
    metadata = row.get("metadata") or {}
    state = copy.deepcopy(metadata.get("initial_state") or {})
    offered = offered_names(row)
    reference = metadata.get("reference_calls") or []
    call_turns: list[list[ToolCall]] = []
    flags = {"hallucinated": False, "malformed": False, "bad_arguments": False}
    reasons: list[str] = []
    answer = None
    for i, text in enumerate(turns):
        _, turn = parse_turn(text, row.get("tools"))
        if turn.malformed:
            flags["malformed"] = True
            reasons.append(f"turn {i + 1}: {turn.malformed}")
        if not turn.calls:
            answer = extract_boxed(turn.content)
            break
        call_turns.append(turn.calls)
        for call in turn.calls:
            outcome = execute(call, state, offered)
            if outcome.kind in flags:
                flags[outcome.kind] = True
            if outcome.error:
                reasons.append(f"turn {i + 1}: {outcome.error}")
    expected_answer = row.get("answer")
    answer_ok = expected_answer is None or (answer is not None and answers_match(answer, str(expected_answer)))
    state_ok = state == (metadata.get("target_state") or {})
    if not state_ok:
        reasons.append(f"final state {json.dumps(state, sort_keys=True)} is not the target")
    if not answer_ok:
        reasons.append("no final answer" if answer is None else f"answer {answer!r} is not {expected_answer!r}")
    exact = len(call_turns) == len(reference) and all(same_calls(c, r) for c, r in zip(call_turns, reference))
    clean = not any(flags.values())
    return EpisodeOutcome(success=state_ok and answer_ok and clean, exact_calls=exact, final_state=state,
                          answer=answer, reason="; ".join(reasons), **flags)


def turn_message(text: str, tools: list[dict] | None = None) -> tuple[dict, ParsedTurn]:
    """The assistant message a generated turn adds to the conversation (trace kept apart for the template)."""
    trace, turn = parse_turn(text, tools)
    message = {"role": "assistant", "content": turn.content, "reasoning_content": (trace or "").strip()}
    if turn.calls and not turn.malformed:
        message["tool_calls"] = [c.message_entry() for c in turn.calls]
    return message, turn


def reference_turns(row: dict) -> list[list[ToolCall]]:
    """The calls of each assistant turn of a row's reference conversation."""
    return [calls_of_message(m) for m in row["messages"] if m["role"] == "assistant" and m.get("tool_calls")]

