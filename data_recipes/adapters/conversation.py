"""NVIDIA post-training conversation sets: a per-sample reasoning flag and a trace inline or in its own field.

Two layouts:
- `llama_nemotron` (Llama-Nemotron-Post-Training-Dataset): `input` (messages before the answer), `output` (the
  answer, with the trace inline as a leading `<think>...</think>` block), `reasoning` ("on"/"off"),
  `system_prompt` ("detailed thinking on/off", possibly with more text), plus `category`, `generator`, `license`.
- `nemotron_post_training` (Nemotron-Post-Training-Dataset v1/v2): `messages` ending with the assistant turn, whose
  trace is either inline in `content` or in `reasoning_content`; `reasoning` ("on"/"off") per sample.

The flag is authoritative and must agree with the output: reasoning on needs a non-empty trace, reasoning off must
have none (an empty `<think></think>` is fine). Without a flag, a trace means on. The row carries the switch the
Nano 2 way (`/no_think` in the system message for off; on is the default), whatever keyword the source used.

Rows get `task: "math"` and an `answer` when the category is math and the answer has a `\\boxed{}` (so they can also
serve as graded prompts); every other row is `task: "chat"`, with the source category kept in `metadata`.
"""

from __future__ import annotations

from typing import Any

from data_recipes.adapters.base import (
    RecordError,
    adapt,
    assistant_turn,
    last_boxed,
    reasoning_flag,
    record_id,
    register_schema,
    split_think,
    text_field,
    with_switch,
)

ROLES = ("system", "user", "assistant", "tool")
_KEPT_METADATA = ("category", "generator", "license", "version", "used_in_training")


def _context_messages(messages: Any, key: str) -> list[dict[str, str]]:
    """The messages before the answer, as rows keep them: earlier assistant turns hold only their answer."""
    if not isinstance(messages, list) or not messages:
        raise RecordError(f"`{key}` is missing or not a non-empty list of messages")
    out = []
    for i, message in enumerate(messages):
        if not isinstance(message, dict) or message.get("role") not in ROLES:
            raise RecordError(f"`{key}`[{i}] is not a message with a role in {ROLES}")
        content = message.get("content")
        if content is None and message["role"] == "assistant":
            content = ""  # a tool-calling turn may have no text
        if not isinstance(content, str):
            raise RecordError(f"`{key}`[{i}].content is not a string")
        if message["role"] == "assistant":
            # Past reasoning is dropped by the template anyway; storing it would only make rows bigger.
            content = split_think(content)[1]
        out.append({"role": message["role"], "content": content})
    if out[-1]["role"] not in ("user", "tool"):
        raise RecordError(f"the last message of `{key}` before the answer must be a user or tool turn")
    return out


def _finish_row(
    schema: str, record: dict[str, Any], index: int, context: list[dict[str, str]],
    trace: str | None, answer: str, flag: bool | None,
) -> dict[str, Any]:
    has_trace = bool(trace and trace.strip())
    reasoning_on = has_trace if flag is None else flag
    if reasoning_on and not has_trace:
        raise RecordError("reasoning is on but the output has no trace")
    if not reasoning_on and has_trace:
        raise RecordError("reasoning is off but the output holds a trace")
    messages = with_switch(context, reasoning_on) + [assistant_turn(answer, trace or "")]
    metadata: dict[str, Any] = {"source": schema, "index": index, "reasoning": "on" if reasoning_on else "off"}
    metadata.update({k: record[k] for k in _KEPT_METADATA if isinstance(record.get(k), (str, int, float))})
    row: dict[str, Any] = {"id": record_id(schema, record, index, "uuid", "id"), "task": "chat",
                           "messages": messages, "metadata": metadata}
    boxed = last_boxed(answer)
    if str(record.get("category", "")).lower() == "math" and boxed:
        row["task"], row["answer"] = "math", boxed
    return row


@register_schema("llama_nemotron")
def llama_nemotron_row(record: dict[str, Any], index: int) -> dict[str, Any]:
    context = _context_messages(record.get("input"), "input")
    system = record.get("system_prompt") or ""
    if not isinstance(system, str):
        raise RecordError("`system_prompt` is not a string")
    flag = reasoning_flag(record.get("reasoning"))
    if flag is None and system:
        try:
            flag = reasoning_flag(system)
        except RecordError:
            flag = None  # a system prompt with other text and no toggle says nothing about reasoning
    if system.strip():
        if context[0]["role"] == "system":
            context[0] = {"role": "system", "content": f"{system}\n{context[0]['content']}"}
        else:
            context.insert(0, {"role": "system", "content": system})
    trace, answer = split_think(text_field(record, "output"))
    return _finish_row("llama_nemotron", record, index, context, trace, answer, flag)


@register_schema("nemotron_post_training")
def nemotron_post_training_row(record: dict[str, Any], index: int) -> dict[str, Any]:
    messages = record.get("messages")
    if not isinstance(messages, list) or len(messages) < 2:
        raise RecordError("`messages` must hold at least a user turn and the assistant answer")
    final = messages[-1]
    if not isinstance(final, dict) or final.get("role") != "assistant":
        raise RecordError("the last message is not the assistant answer")
    if not isinstance(final.get("content"), str):
        raise RecordError("the assistant answer's content is not a string")
    trace, answer = split_think(final["content"])
    separate = final.get("reasoning_content")
    if separate is not None and not isinstance(separate, str):
        raise RecordError("`reasoning_content` is not a string")
    if separate and separate.strip():
        if trace:
            raise RecordError("the answer has both an inline trace and `reasoning_content`")
        if "<think>" in separate or "</think>" in separate:
            raise RecordError("`reasoning_content` holds think tags")
        trace = separate
    context = _context_messages(messages[:-1], "messages")
    return _finish_row("nemotron_post_training", record, index, context, trace, answer,
                       reasoning_flag(record.get("reasoning")))


def rows_from_llama_nemotron(records, **options) -> list[dict[str, Any]]:
    """Rows from Llama-Nemotron-Post-Training-Dataset records (`input`, `output`, `reasoning`, `system_prompt`)."""
    return adapt(records, "llama_nemotron", **options)[0]


def rows_from_nemotron_post_training(records, **options) -> list[dict[str, Any]]:
    """Rows from Nemotron-Post-Training-Dataset v1/v2 records (`messages`, `reasoning`)."""
    return adapt(records, "nemotron_post_training", **options)[0]
