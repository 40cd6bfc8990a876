"""Public tool-calling data in its two common layouts -> rows with `tools`, `tool_calls` and `tool` messages.

- `openai_tools`: `messages` (system / user / assistant with `tool_calls` / `tool`) and `tools` (OpenAI function
  specs); `arguments` may be a JSON string (the OpenAI API's layout) and are stored as objects. Every assistant
  turn is trained (`chat_format.encode_row_for_training`); an optional `reasoning` flag ("on" / "off") is kept.
- `xlam` (Salesforce xLAM / APIGen function-calling sets): `query`, `tools` and `answers`, the last two JSON
  strings or lists. `tools` entries are `{name, description, parameters: {param: {type, description, default?}}}`
  with Python-ish types (`int`, `str`, `List[int]`, `float, optional`); they become JSON-schema specs, a parameter
  with a default or `optional` in its type not required. The row is the query and one assistant turn holding the
  answer calls, with the calls in `metadata.reference_calls` for the `tool_call` reward.

A record is rejected, with its index and the reason, when its JSON does not parse, a tool spec is malformed, or a
reference call names a tool the record does not offer or misses a required argument.
"""

from __future__ import annotations

import json
import re
from typing import Any

from alignment.tool_calls import ToolSchemaError, calls_of_message, check_tools, tool_name
from data_recipes.adapters.base import (RecordError, adapt, reasoning_flag, record_id, register_schema, text_field,
                                        with_switch)

_TYPE_WORDS = [("list", "array"), ("dict", "object"), ("bool", "boolean"), ("int", "integer"), ("float", "number"),
               ("str", "string")]


def _json_field(record: dict[str, Any], key: str) -> Any:
    value = record.get(key)
    if isinstance(value, str):
        try:
            return json.loads(value)
        except json.JSONDecodeError as exc:
            raise RecordError(f"`{key}` is not valid JSON ({exc.msg})") from None
    if value is None:
        raise RecordError(f"`{key}` is missing")
    return value


def _json_type(python_type: str) -> str | None:
    lowered = python_type.lower()
    for word, kind in _TYPE_WORDS:
        if re.search(rf"\b{word}", lowered):
            return kind
    return None


def xlam_tool_spec(tool: Any, i: int) -> dict:
    """An xLAM tool entry as an OpenAI function spec."""
    if not isinstance(tool, dict) or not isinstance(tool.get("name"), str) or not tool["name"]:
        raise RecordError(f"tools[{i}] has no `name`")
    parameters = tool.get("parameters") or {}
    if not isinstance(parameters, dict):
        raise RecordError(f"tools[{i}] ({tool['name']}): `parameters` is not a mapping")
    properties, required = {}, []
    for name, info in parameters.items():
        info = info if isinstance(info, dict) else {}
        kind = _json_type(str(info.get("type", "")))
        properties[name] = {k: v for k, v in (("type", kind), ("description", info.get("description"))) if v}
        if "default" not in info and "optional" not in str(info.get("type", "")).lower():
            required.append(name)
    return {"type": "function", "function": {"name": tool["name"], "description": str(tool.get("description", "")),
                                             "parameters": {"type": "object", "properties": properties,
                                                            "required": required}}}


def _checked_calls(calls: list[dict], tools: list[dict], where: str) -> None:
    """Reference calls must name an offered tool and give its required arguments (the sets' type words are too
    loose to check more)."""
    specs = {tool_name(t): t for t in tools}
    for j, call in enumerate(calls):
        if call["name"] not in specs:
            raise RecordError(f"{where}[{j}] calls {call['name']!r}, which the record's tools do not offer")
        required = specs[call["name"]]["function"].get("parameters", {}).get("required", [])
        missing = [p for p in required if p not in call["arguments"]]
        if missing:
            raise RecordError(f"{where}[{j}] ({call['name']}): missing required argument(s) {missing}")


@register_schema("xlam")
def xlam_row(record: dict[str, Any], index: int) -> dict[str, Any]:
    query = text_field(record, "query")
    tools_raw, answers = _json_field(record, "tools"), _json_field(record, "answers")
    if not isinstance(tools_raw, list) or not tools_raw:
        raise RecordError("`tools` is not a non-empty list")
    if not isinstance(answers, list) or not answers:
        raise RecordError("`answers` is not a non-empty list of calls")
    tools = [xlam_tool_spec(t, i) for i, t in enumerate(tools_raw)]
    try:
        check_tools(tools)
        calls = calls_of_message({"tool_calls": [{"function": a} for a in answers]})
    except (ToolSchemaError, AttributeError, TypeError) as exc:
        raise RecordError(f"`answers`: {exc}") from None
    reference = [{"name": c.name, "arguments": c.arguments} for c in calls]
    _checked_calls(reference, tools, "answers")
    messages = with_switch([{"role": "user", "content": query}], False) + [
        {"role": "assistant", "content": "", "reasoning_content": "", "tool_calls": [c.message_entry() for c in calls]}]
    return {"id": record_id("xlam", record, index, "id"), "task": "tool_call", "messages": messages, "tools": tools,
            "metadata": {"source": "xlam", "index": index, "reference_calls": [reference], "reasoning": "off"}}


@register_schema("openai_tools")
def openai_tools_row(record: dict[str, Any], index: int) -> dict[str, Any]:
    messages, tools = record.get("messages"), _json_field(record, "tools")
    if not isinstance(messages, list) or len(messages) < 2:
        raise RecordError("`messages` must hold at least a user turn and an assistant turn")
    try:
        check_tools(tools)
    except ToolSchemaError as exc:
        raise RecordError(str(exc)) from None
    out, reference = [], []
    for i, message in enumerate(messages):
        if not isinstance(message, dict) or message.get("role") not in ("system", "user", "assistant", "tool"):
            raise RecordError(f"messages[{i}] is not a message with a system, user, assistant or tool role")
        content = message.get("content")
        content = "" if content is None and message["role"] == "assistant" else content
        if not isinstance(content, str):
            raise RecordError(f"messages[{i}].content is not a string")
        kept = {"role": message["role"], "content": content}
        if message["role"] == "assistant" and message.get("reasoning_content"):
            kept["reasoning_content"] = str(message["reasoning_content"])
        if message["role"] == "tool" and isinstance(message.get("name"), str):
            kept["name"] = message["name"]
        if message.get("tool_calls"):
            try:
                calls = calls_of_message(message)
            except ToolSchemaError as exc:
                raise RecordError(f"messages[{i}].{exc}") from None
            turn = [{"name": c.name, "arguments": c.arguments} for c in calls]
            _checked_calls(turn, tools, f"messages[{i}].tool_calls")
            kept["tool_calls"] = [c.message_entry() for c in calls]
            reference.append(turn)
        out.append(kept)
    if out[-1]["role"] != "assistant":
        raise RecordError("the last message is not an assistant turn")
    flag = reasoning_flag(record.get("reasoning"))
    has_trace = any(m.get("reasoning_content") or "</think>" in m["content"] for m in out if m["role"] == "assistant")
    reasoning_on = has_trace if flag is None else flag
    if not reasoning_on:
        out = [dict(m, reasoning_content="") if m["role"] == "assistant" else m for m in out]
    return {"id": record_id("openai_tools", record, index, "id"), "task": "tool_call",
            "messages": with_switch(out, reasoning_on), "tools": tools,
            "metadata": {"source": "openai_tools", "index": index, "reference_calls": reference,
                         "reasoning": "on" if reasoning_on else "off"}}


def rows_from_xlam(records, **options) -> list[dict[str, Any]]:
    """Rows from xLAM / APIGen records (`query`, `tools`, `answers`)."""
    return adapt(records, "xlam", **options)[0]


def rows_from_openai_tools(records, **options) -> list[dict[str, Any]]:
    """Rows from OpenAI-layout tool conversations (`messages` with `tool_calls`, `tools`)."""
    return adapt(records, "openai_tools", **options)[0]
