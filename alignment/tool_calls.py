"""Tool calls in the chat formats: the row schema, how a template writes calls, and the parser that reads them back.

Rows carry tools the OpenAI way: a `tools` list of function specs (`{"type": "function", "function": {"name",
"description", "parameters": JSON schema}}`), assistant messages with `tool_calls` (`[{"type": "function",
"function": {"name", "arguments": {...}}}]`, arguments as an object) and `tool` messages holding each result. The
model's own template renders them (`tools=` of `apply_chat_template`); this module finds which syntax it writes by
rendering a probe call, and parses generated text with that syntax:

- `json-list` (Nano 2): `<TOOLCALL>[{"name": ..., "arguments": {...}}, ...]</TOOLCALL>`;
- `xml-function` (Nemotron 3, Qwen3.5): `<tool_call>\\n<function=NAME>\\n<parameter=P>\\nVALUE\\n</parameter>\\n
  </function>\\n</tool_call>`, one block per call, a string value written raw and any other as JSON;
- `hermes-json` (Qwen3, Hermes): `<tool_call>\\n{"name": ..., "arguments": {...}}\\n</tool_call>`, one per call.

A malformed call (markers without a parseable call inside) is reported, not guessed at: the rewards score it 0.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase


class ToolSchemaError(ValueError):
    """A `tools` list or a `tool_calls` entry that is not in the OpenAI layout."""


@dataclass(frozen=True)
class ToolCall:
    name: str
    arguments: dict[str, Any]

    def message_entry(self) -> dict:
        """The call as an assistant message's `tool_calls` entry."""
        return {"type": "function", "function": {"name": self.name, "arguments": dict(self.arguments)}}

    def key(self) -> str:
        """The call by value: equal for equal names and JSON-equal arguments, whatever their key order."""
        return json.dumps([self.name, self.arguments], sort_keys=True)


@dataclass
class ParsedTurn:
    """An assistant turn read back from generated text: its text, its calls, and what could not be read."""

    content: str
    calls: list[ToolCall] = field(default_factory=list)
    malformed: str | None = None  # why a call block could not be read; None when every block parsed


# ---------------------------------------------------------------------------------------------------------------
# The row schema


def tool_name(spec: dict) -> str:
    return (spec.get("function") or spec).get("name", "")


def check_tools(tools: Any) -> list[dict]:
    """A `tools` list in the OpenAI layout, or ToolSchemaError naming the entry that is not."""
    if not isinstance(tools, list) or not tools:
        raise ToolSchemaError("`tools` must be a non-empty list of function specs")
    names = set()
    for i, spec in enumerate(tools):
        function = spec.get("function") if isinstance(spec, dict) else None
        if not isinstance(function, dict) or not isinstance(function.get("name"), str) or not function["name"]:
            raise ToolSchemaError(f"tools[{i}] is not {{\"type\": \"function\", \"function\": {{\"name\": ...}}}}")
        parameters = function.get("parameters", {})
        if not isinstance(parameters, dict):
            raise ToolSchemaError(f"tools[{i}] ({function['name']}): `parameters` must be a JSON-schema object")
        if function["name"] in names:
            raise ToolSchemaError(f"tools[{i}]: the name {function['name']!r} is given twice")
        names.add(function["name"])
    return tools


def calls_of_message(message: dict) -> list[ToolCall]:
    """The `tool_calls` of an assistant message as ToolCalls; arguments given as a JSON string are decoded."""
    out = []
    for i, entry in enumerate(message.get("tool_calls") or []):
        function = entry.get("function") if isinstance(entry, dict) else None
        if not isinstance(function, dict) or not isinstance(function.get("name"), str) or not function["name"]:
            raise ToolSchemaError(f"tool_calls[{i}] is not {{\"function\": {{\"name\": ..., \"arguments\": ...}}}}")
        arguments = function.get("arguments", {})
        if isinstance(arguments, str):
            try:
                arguments = json.loads(arguments) if arguments.strip() else {}
            except json.JSONDecodeError as exc:
                raise ToolSchemaError(f"tool_calls[{i}] ({function['name']}): arguments are not JSON ({exc.msg})")
        if not isinstance(arguments, dict):
            raise ToolSchemaError(f"tool_calls[{i}] ({function['name']}): arguments must be an object")
        out.append(ToolCall(function["name"], arguments))
    return out


def normalized_message(message: dict) -> dict:
    """An assistant message with its `tool_calls` in the layout templates render (arguments as objects)."""
    if not message.get("tool_calls"):
        return message
    return dict(message, tool_calls=[call.message_entry() for call in calls_of_message(message)])


# ---------------------------------------------------------------------------------------------------------------
# Syntaxes


_XML_FUNCTION = re.compile(r"^\s*<function=([^>\n]+)>(.*?)</function>\s*$", re.DOTALL)
_XML_PARAMETER = re.compile(r"<parameter=([^>\n]+)>\n?(.*?)\n?</parameter>", re.DOTALL)


def _call_from_json(value: Any, where: str) -> ToolCall:
    if not isinstance(value, dict) or not isinstance(value.get("name"), str) or not value["name"]:
        raise ValueError(f"{where} is not an object with a `name`")
    arguments = value.get("arguments", value.get("parameters", {}))
    if isinstance(arguments, str):
        arguments = json.loads(arguments)
    if not isinstance(arguments, dict):
        raise ValueError(f"{where}: `arguments` is not an object")
    return ToolCall(value["name"], arguments)


def _read_json_list(block: str) -> list[ToolCall]:
    value = json.loads(block)
    return [_call_from_json(item, "a call in <TOOLCALL>") for item in (value if isinstance(value, list) else [value])]


def _xml_value(raw: str, schema: dict | None) -> Any:
    """A parameter's text as its value: raw for a string parameter, else JSON when it parses (a number, a list)."""
    if (schema or {}).get("type") == "string":
        return raw
    try:
        return json.loads(raw)
    except json.JSONDecodeError:
        return raw


def _parse_blocks(text: str, opening: str, closing: str, read: Callable[[str], list[ToolCall]]) -> ParsedTurn:
    """The text outside `opening`...`closing` blocks, and the calls `read` finds in each block."""
    block = re.compile(re.escape(opening) + "(.*?)" + re.escape(closing), re.DOTALL)
    content = block.sub("", text).strip()
    calls, malformed = [], None
    if opening in content or closing in content:
        malformed = f"an unclosed {opening} block"
    for inside in block.findall(text):
        try:
            calls += read(inside)
        except (ValueError, json.JSONDecodeError) as exc:
            malformed = f"a {opening} block could not be read ({exc})"
    return ParsedTurn(content, calls, malformed)


def _xml_reader(tools: list[dict] | None) -> Callable[[str], list[ToolCall]]:
    properties = {tool_name(t): (t.get("function") or {}).get("parameters", {}).get("properties", {})
                  for t in tools or []}

    def read(block: str) -> list[ToolCall]:
        match = _XML_FUNCTION.match(block)
        if match is None:
            raise ValueError("no <function=NAME>...</function> inside")
        name = match.group(1).strip()
        schema = properties.get(name, {})
        arguments = {p.strip(): _xml_value(v, schema.get(p.strip())) for p, v in _XML_PARAMETER.findall(match.group(2))}
        return [ToolCall(name, arguments)]

    return read


def _read_hermes(block: str) -> list[ToolCall]:
    return [_call_from_json(json.loads(block), "a <tool_call> block")]


@dataclass(frozen=True)
class ToolSyntax:
    """One way templates write calls; `parse` reads an assistant turn's text (after its trace) back."""

    name: str
    marker: str  # what a rendered call starts with

    def parse(self, text: str, tools: list[dict] | None = None) -> ParsedTurn:
        if self.name == "json-list":
            return _parse_blocks(text, "<TOOLCALL>", "</TOOLCALL>", _read_json_list)
        read = _xml_reader(tools) if self.name == "xml-function" else _read_hermes
        return _parse_blocks(text, "<tool_call>", "</tool_call>", read)


SYNTAXES = {s.name: s for s in (ToolSyntax("json-list", "<TOOLCALL>"), ToolSyntax("xml-function", "<tool_call>"),
                                ToolSyntax("hermes-json", "<tool_call>"))}

_PROBE_TOOL = {"type": "function", "function": {
    "name": "probe_lookup", "description": "Look a word up.",
    "parameters": {"type": "object", "properties": {"word": {"type": "string"}, "limit": {"type": "integer"}},
                   "required": ["word"]}}}
_PROBE_CALL = ToolCall("probe_lookup", {"word": "zebra", "limit": 3})


def detect_tool_syntax(tokenizer: "PreTrainedTokenizerBase", render_turn: Callable[[list[dict], dict], str],
                       source: str = "the tokenizer") -> ToolSyntax:
    """The syntax the template writes calls in, found by rendering one probe call and reading it back.

    `render_turn(tools, assistant_message)` renders a conversation ending with that message (the chat format's
    training text). Raises ValueError when the template renders no call or none of the syntaxes reads it back.
    """
    message = {"role": "assistant", "content": "", "tool_calls": [_PROBE_CALL.message_entry()]}
    try:
        text = render_turn([_PROBE_TOOL], message)
    except Exception as exc:  # a template that fails on tools is a finding, whatever its error type
        raise ValueError(f"the chat template of {source} fails on a tool call ({type(exc).__name__}: {exc})") from exc
    if _PROBE_CALL.name not in text:
        raise ValueError(f"the chat template of {source} does not render assistant `tool_calls`; tool rows need a "
                         "template that does")
    for syntax in SYNTAXES.values():
        if syntax.marker in text and syntax.parse(text, [_PROBE_TOOL]).calls == [_PROBE_CALL]:
            return syntax
    raise ValueError(f"the chat template of {source} writes tool calls in a syntax this project does not read "
                     f"({text[text.find(_PROBE_CALL.name) - 40:][:120]!r}); known: {', '.join(SYNTAXES)}")
