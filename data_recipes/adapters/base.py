"""What every adapter shares: the schema registry, record-level rejection with reasons, and the think-block functions.

An adapter turns one record of a public dataset into one row of the project's schema (see
`data_recipes/synthetic_math.py`): `id`, `task`, `messages` (the last one the assistant turn with `content` = answer
and `reasoning_content` = trace), `answer` where there is a reference, and `metadata`. A record it cannot use raises
`RecordError` with the reason; `adapt` collects those with the record's index, checks every produced row with the
same validation `read_rows` applies, and raises `BadDataError` when too many records are bad.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable

from alignment.data import enforce_bad_fraction, row_problem
from envs.answers import THINK_CLOSE, THINK_OPEN


SWITCH_ON = "/think"
SWITCH_OFF = "/no_think"
# Llama-Nemotron writes its toggle as a system prompt; Nano 2 uses the keywords. Both are control text, not content.
_LEGACY_SWITCH = re.compile(r"\s*detailed thinking (on|off)\s*", re.IGNORECASE)

RecordConverter = Callable[[dict[str, Any], int], dict[str, Any]]


class RecordError(ValueError):
    """One record cannot be turned into a row; the message is the reason, reported with the record's index."""


class UnreadableRecord(dict):
    """Stands in for a record that could not be parsed (a bad JSONL line), so it is reported like any bad record."""


@dataclass
class AdapterReport:
    """How many records were read and which were rejected, for logs and stage manifests."""

    source: str
    schema: str
    total: int = 0
    bad: list[tuple[int, str]] = field(default_factory=list)  # (0-based record index, reason)
    exclude_prompts: list[str] = field(default_factory=list)  # held-out files whose prompts were dropped
    excluded: list[str] = field(default_factory=list)  # ids of good rows dropped for a held-out prompt

    @property
    def bad_fraction(self) -> float:
        return len(self.bad) / self.total if self.total else 0.0

    @property
    def path(self) -> str:
        """What the rejection messages name: the source and its schema."""
        return f"{self.source} ({self.schema})"

    def summary(self) -> dict[str, Any]:
        return {"source": self.source, "schema": self.schema, "records": self.total, "bad": len(self.bad),
                "bad_examples": self.bad[:5], "exclude_prompts": self.exclude_prompts,
                "excluded": len(self.excluded), "excluded_examples": self.excluded[:5]}


_SCHEMAS: dict[str, RecordConverter] = {}


def register_schema(name: str) -> Callable[[RecordConverter], RecordConverter]:
    """Register a record converter under `name`, the value a config gives as `schema:`."""

    def decorator(converter: RecordConverter) -> RecordConverter:
        if name in _SCHEMAS:
            raise ValueError(f"schema {name!r} is already registered")
        _SCHEMAS[name] = converter
        return converter

    return decorator


def schema_names() -> list[str]:
    return sorted(_SCHEMAS)


def get_converter(schema: str) -> RecordConverter:
    try:
        return _SCHEMAS[schema]
    except KeyError:
        raise ValueError(f"unknown dataset schema {schema!r}; known: {', '.join(schema_names())}") from None


def adapt(
    records: Iterable[Any],
    schema: str,
    *,
    max_bad_fraction: float = 0.01,
    source: str = "records",
) -> tuple[list[dict[str, Any]], AdapterReport]:
    """Rows from `records` in the named schema, and the report. Raises `BadDataError` above `max_bad_fraction`."""
    converter = get_converter(schema)
    report = AdapterReport(source=source, schema=schema)
    rows: list[dict[str, Any]] = []
    for index, record in enumerate(records):
        report.total += 1
        try:
            if isinstance(record, UnreadableRecord):
                raise RecordError(record["reason"])
            if not isinstance(record, dict):
                raise RecordError(f"record is not a mapping ({type(record).__name__})")
            row = converter(record, index)
            # The same check `read_rows` applies, so a converted file always reads back without rejections.
            use = "train" if row["messages"][-1]["role"] == "assistant" else "prompt"
            problem = row_problem(row, use)
            if problem is not None:
                raise RecordError(f"converted row is invalid: {problem}")
        except RecordError as exc:
            report.bad.append((index, str(exc)))
            continue
        rows.append(row)
    enforce_bad_fraction(report, max_bad_fraction, unit="records", where="record")
    return rows, report


# --- field access -------------------------------------------------------------------------------------------------


def text_field(record: dict[str, Any], key: str, allow_empty: bool = False) -> str:
    """`record[key]` as a string, or a `RecordError` naming the key."""
    value = record.get(key)
    if not isinstance(value, str):
        raise RecordError(f"`{key}` is missing or not a string")
    if not allow_empty and not value.strip():
        raise RecordError(f"`{key}` is empty")
    return value


def record_id(schema: str, record: dict[str, Any], index: int, *keys: str) -> str:
    """The record's own id when it has one (stable across re-exports), else its index."""
    for key in keys:
        value = record.get(key)
        if isinstance(value, (str, int)) and str(value).strip():
            return f"{schema}-{value}"
    return f"{schema}-{index:07d}"


# --- reasoning: think blocks and the on/off switch ----------------------------------------------------------------


def split_think(text: str) -> tuple[str | None, str]:
    """(trace, answer) of an output that may hold an inline `<think>...</think>` block; trace None when it has none.

    A block must open the output (after whitespace): a `<think>` later on is content, not a trace, and rejected
    as ambiguous rather than guessed at.
    """
    stripped = text.lstrip()
    if THINK_CLOSE not in text:
        if THINK_OPEN in text:
            raise RecordError("output has an unclosed <think>")
        return None, text.strip()
    if not stripped.startswith(THINK_OPEN):
        raise RecordError("output has </think> without a <think> block at its start")
    trace, answer = stripped[len(THINK_OPEN):].split(THINK_CLOSE, 1)
    if THINK_OPEN in answer or THINK_CLOSE in answer or THINK_OPEN in trace:
        raise RecordError("output has more than one think block")
    return trace.strip(), answer.strip()


def trace_text(trace: str | None) -> str:
    """A trace as rows store it: trimmed, ending with a newline so `</think>` starts its own line; '' when empty."""
    trace = (trace or "").strip()
    return trace + "\n" if trace else ""


def reasoning_flag(value: Any) -> bool | None:
    """A per-sample reasoning flag ("on"/"off", true/false, "detailed thinking on") as a bool; None when absent."""
    if value is None or value == "":
        return None
    if isinstance(value, bool):
        return value
    if isinstance(value, str):
        normalized = value.strip().lower()
        if normalized in ("on", "true", "yes", "detailed thinking on", SWITCH_ON):
            return True
        if normalized in ("off", "false", "no", "detailed thinking off", SWITCH_OFF):
            return False
    raise RecordError(f"reasoning flag {value!r} is not on/off")


def strip_switches(text: str) -> str:
    """Text without reasoning-switch keywords: the row's flag decides, and the template adds its own keyword."""
    text = _LEGACY_SWITCH.sub(" ", text)
    return text.replace(SWITCH_OFF, "").replace(SWITCH_ON, "").strip()


def with_switch(messages: list[dict[str, Any]], reasoning_on: bool) -> list[dict[str, Any]]:
    """Messages with every switch keyword removed and `/no_think` in the system message when reasoning is off.

    Reasoning on needs no keyword (the template's default); this matches the synthetic rows, so evaluation and
    mining, which drop a system message that is only a switch, treat adapted rows the same way.
    """
    out = []
    for message in messages:
        if message["role"] in ("system", "user"):
            message = dict(message, content=strip_switches(message["content"]))
        out.append(message)
    if out and out[0]["role"] == "system" and not out[0]["content"] and reasoning_on:
        out = out[1:]  # an empty system message says nothing; the template writes the system turn anyway
    if not reasoning_on:
        if out and out[0]["role"] == "system":
            out[0] = dict(out[0], content=(out[0]["content"] + " " + SWITCH_OFF).strip())
        else:
            out.insert(0, {"role": "system", "content": SWITCH_OFF})
    return out


def assistant_turn(answer: str, trace: str) -> dict[str, str]:
    if not answer.strip():
        raise RecordError("the answer (text after the trace) is empty")
    return {"role": "assistant", "content": answer.strip(), "reasoning_content": trace_text(trace)}


def last_boxed(text: str) -> str | None:
    """Content of the last `\\boxed{...}` (nested braces balanced), or None."""
    start = text.rfind("\\boxed{")
    if start < 0:
        return None
    depth = 0
    for j in range(start + len("\\boxed"), len(text)):
        if text[j] == "{":
            depth += 1
        elif text[j] == "}":
            depth -= 1
            if depth == 0:
                return text[start + len("\\boxed{") : j].strip()
    return None
