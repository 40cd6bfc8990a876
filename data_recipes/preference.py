"""Preference pairs: the schemas of public preference sets, turned into one pair format.

Every reader yields the same pair:

    id        row id (the file's `id` column, else "<file stem>-<line>")
    prompt    chat messages up to the response (system / user / assistant / tool turns; the last is not assistant)
    chosen    one assistant message {"role": "assistant", "content": ..., optional "reasoning_content": ...}
    rejected  one assistant message, as `chosen`
    metadata  the row's other columns (scores, sources), kept for the record

Schemas (one JSON object per line; `schema: auto` recognises each row by the type of its columns):

    prompt_messages  TRL's conversational form, also what mined pairs are written as:
                     {"prompt": [messages], "chosen": [assistant message], "rejected": [assistant message]}
    conversations    full chats sharing every turn but the last (UltraFeedback-binarized; HH in message form):
                     {"chosen": [messages ..., assistant], "rejected": [messages ..., assistant], "prompt": "..."}
    text             plain strings with a shared prompt (TRL's standard form):
                     {"prompt": "...", "chosen": "...", "rejected": "..."}
    hh               Anthropic HH transcripts, the prompt being the turns both strings share:
                     {"chosen": "\\n\\nHuman: ...\\n\\nAssistant: ...", "rejected": "\\n\\nHuman: ...\\n\\nAssistant: ..."}

A malformed row is rejected with its line number and reason (as `alignment.data.read_rows` does for SFT rows): a
missing or empty side, a prompt that differs between the two sides, a response that is not a single assistant turn,
identical chosen and rejected (no preference to learn), an unclosed `<think>`. The run stops when more than
`max_bad_fraction` of the file is bad.
"""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path
from typing import Literal

from alignment.data import BadDataError, RowReport, read_jsonl, row_problem

log = logging.getLogger(__name__)

Schema = Literal["auto", "prompt_messages", "conversations", "text", "hh"]
SCHEMAS = ("prompt_messages", "conversations", "text", "hh")
PAIR_COLUMNS = ("id", "prompt", "chosen", "rejected", "messages")

# HH transcripts separate turns with a blank line and a speaker tag.
_HH_TURN = re.compile(r"\n\n(Human|Assistant):[ ]?")
_HH_ROLES = {"Human": "user", "Assistant": "assistant"}


class PairError(ValueError):
    """A row that cannot become a preference pair; the message is the reason."""


def detect_schema(row: dict) -> str:
    """The schema a row is written in, from the types of its `prompt` / `chosen` / `rejected` columns."""
    chosen, prompt = row.get("chosen"), row.get("prompt")
    if isinstance(chosen, list):
        return "prompt_messages" if isinstance(prompt, list) else "conversations"
    if isinstance(chosen, str):
        return "text" if isinstance(prompt, str) else "hh"
    if "chosen" not in row or "rejected" not in row:
        raise PairError("needs `chosen` and `rejected` columns")
    raise PairError(f"`chosen` must be a list of messages or a string, got {type(chosen).__name__}")


def to_pair(row: object, schema: Schema = "auto", default_id: str = "") -> dict:
    """One row in `schema` as a pair (see the module docstring); raises PairError with the reason."""
    if not isinstance(row, dict):
        raise PairError("row is not a JSON object")
    schema = detect_schema(row) if schema == "auto" else schema
    if schema not in SCHEMAS:
        raise PairError(f"unknown schema {schema!r}; known: {', '.join(SCHEMAS)}")
    for side in ("chosen", "rejected"):
        if side not in row:
            raise PairError(f"missing `{side}`")
    if schema == "prompt_messages":
        prompt = _messages(row.get("prompt"), "prompt")
        chosen = _single_assistant(_messages(row["chosen"], "chosen"), "chosen")
        rejected = _single_assistant(_messages(row["rejected"], "rejected"), "rejected")
    elif schema == "conversations":
        chosen_chat, rejected_chat = _messages(row["chosen"], "chosen"), _messages(row["rejected"], "rejected")
        prompt, chosen, rejected = _split_shared_prompt(chosen_chat, rejected_chat)
    elif schema == "text":
        prompt = [{"role": "user", "content": _text(row.get("prompt"), "prompt")}]
        chosen = {"role": "assistant", "content": _text(row["chosen"], "chosen")}
        rejected = {"role": "assistant", "content": _text(row["rejected"], "rejected")}
    else:
        prompt, chosen, rejected = _split_shared_prompt(
            _hh_turns(_text(row["chosen"], "chosen"), "chosen"), _hh_turns(_text(row["rejected"], "rejected"), "rejected")
        )
    if not prompt or prompt[-1]["role"] == "assistant":
        raise PairError("the prompt must end with a user (or tool) turn")
    if not any(m["role"] == "user" for m in prompt):
        raise PairError("the prompt has no user turn")
    for side, message in (("chosen", chosen), ("rejected", rejected)):
        problem = row_problem({"messages": prompt + [message]}, "train")
        if problem is not None:
            raise PairError(f"{side}: {problem}")
    if _response_text(chosen) == _response_text(rejected):
        raise PairError("chosen and rejected are identical")
    return {
        "id": str(row.get("id") or default_id),
        "prompt": prompt,
        "chosen": chosen,
        "rejected": rejected,
        # A `metadata` column (as pair_to_row writes) is unpacked, so pairs round-trip through a file unchanged.
        "metadata": {**(row.get("metadata") if isinstance(row.get("metadata"), dict) else {}),
                     **{k: v for k, v in row.items() if k not in PAIR_COLUMNS + ("metadata",)}},
    }


def read_pairs(
    path: str | Path, schema: Schema = "auto", max_bad_fraction: float = 0.01
) -> tuple[list[dict], RowReport]:
    """Pairs from a JSONL file in any supported schema, and a report of the rejected rows (line number, reason).

    Raises BadDataError when the file is missing or empty, or more than `max_bad_fraction` of its rows are bad.
    """
    return read_jsonl(path, lambda row, number: to_pair(row, schema, default_id=f"{Path(path).stem}-{number}"),
                      max_bad_fraction, unit="pairs")


def pair_to_row(pair: dict) -> dict:
    """A pair in the `prompt_messages` schema, the form mined pairs are written in (and read back by read_pairs)."""
    return {
        "id": pair["id"],
        "prompt": pair["prompt"],
        "chosen": [pair["chosen"]],
        "rejected": [pair["rejected"]],
        **({"tools": pair["tools"]} if pair.get("tools") else {}),
        **({"metadata": pair["metadata"]} if pair.get("metadata") else {}),
    }


def _messages(value: object, column: str) -> list[dict]:
    if not isinstance(value, list) or not value:
        raise PairError(f"`{column}` must be a non-empty list of messages")
    for i, m in enumerate(value):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
            raise PairError(f"`{column}` message {i} needs string `role` and `content`")
    return [dict(m) for m in value]


def _text(value: object, column: str) -> str:
    if not isinstance(value, str) or not value.strip():
        raise PairError(f"`{column}` must be a non-empty string")
    return value


def _single_assistant(messages: list[dict], column: str) -> dict:
    # Multi-turn responses (assistant, tool, assistant) would need a loss mask per turn; not supported here.
    if len(messages) != 1 or messages[0]["role"] != "assistant":
        roles = [m["role"] for m in messages]
        raise PairError(f"`{column}` must be a single assistant message, got roles {roles}")
    return messages[0]


def _split_shared_prompt(chosen: list[dict], rejected: list[dict]) -> tuple[list[dict], dict, dict]:
    """(shared prompt, chosen reply, rejected reply) of two chats that differ only in their last, assistant turn."""
    for side, chat in (("chosen", chosen), ("rejected", rejected)):
        if chat[-1]["role"] != "assistant":
            raise PairError(f"`{side}` must end with an assistant turn")
    if [_turn(m) for m in chosen[:-1]] != [_turn(m) for m in rejected[:-1]]:
        raise PairError("`chosen` and `rejected` do not share the same prompt turns")
    return chosen[:-1], chosen[-1], rejected[-1]


def _hh_turns(transcript: str, column: str) -> list[dict]:
    parts = _HH_TURN.split("\n\n" + transcript.lstrip("\n"))  # some dumps drop the leading blank line
    speakers, texts = parts[1::2], parts[2::2]
    if not speakers:
        raise PairError(f"`{column}` has no `Human:` / `Assistant:` turns")
    if parts[0].strip():
        raise PairError(f"`{column}` has text before its first `Human:` turn")
    return [{"role": _HH_ROLES[s], "content": t.strip()} for s, t in zip(speakers, texts)]


def _turn(message: dict) -> tuple:
    return message["role"], message["content"].strip()


def _response_text(message: dict) -> tuple[str, str]:
    return message["content"].strip(), (message.get("reasoning_content") or "").strip()
