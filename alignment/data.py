"""Reading JSONL rows with validation: a bad row is rejected with its line number and reason, counted, and the run
goes on unless more than `max_bad_fraction` of the file is bad."""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Literal, TypeVar

log = logging.getLogger(__name__)

RowUse = Literal["train", "prompt"]
T = TypeVar("T")


class BadDataError(ValueError):
    """Too many bad rows, or a file that cannot be read at all."""


@dataclass
class RowReport:
    path: str
    total: int = 0
    bad: list[tuple[int, str]] = field(default_factory=list)  # (1-based line number, reason)

    @property
    def bad_fraction(self) -> float:
        return len(self.bad) / self.total if self.total else 0.0

    def summary(self) -> dict:
        return {"path": self.path, "rows": self.total, "bad": len(self.bad), "bad_examples": self.bad[:5]}


def row_problem(row: object, use: RowUse) -> str | None:
    """The reason a row is unusable, or None when it is fine.

    `train` rows need a final assistant turn; `prompt` rows (evaluation, mining, RL) need a reference answer.
    """
    if not isinstance(row, dict):
        return "row is not a JSON object"
    messages = row.get("messages")
    if not isinstance(messages, list) or not messages:
        return "empty or missing `messages`"
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
            return f"message {i} needs string `role` and `content`"
        if m["role"] not in ("system", "user", "assistant", "tool"):
            return f"message {i} has unknown role {m['role']!r}"
        text = m["content"] + (m.get("reasoning_content") or "")
        if text.count("<think>") > text.count("</think>"):
            return f"message {i} has an unclosed <think>"
        if m.get("reasoning_content") and ("<think>" in m["reasoning_content"] or "</think>" in m["reasoning_content"]):
            return f"message {i}: `reasoning_content` must not contain think tags"
    tool_problem = _tool_problem(row)
    if tool_problem:
        return tool_problem
    if use == "train":
        if messages[-1]["role"] != "assistant":
            return "last message is not an assistant turn"
        if not messages[-1]["content"].strip() and not messages[-1].get("tool_calls"):
            return "assistant turn has an empty answer"
    needs_answer = use == "prompt" and row.get("task", "math") == "math"
    if needs_answer or "answer" in row:
        answer = row.get("answer")
        if not isinstance(answer, (str, int, float)) or str(answer).strip() == "":
            return "missing `answer`"
    return None


def _tool_problem(row: dict) -> str | None:
    """What is wrong with a row's `tools` and `tool_calls` (the OpenAI layout, alignment/tool_calls.py)."""
    from alignment.tool_calls import ToolSchemaError, calls_of_message, check_tools

    try:
        if "tools" in row:
            check_tools(row["tools"])
        for i, m in enumerate(row["messages"]):
            if m.get("tool_calls"):
                if m["role"] != "assistant":
                    return f"message {i}: only assistant messages carry `tool_calls`"
                calls_of_message(m)
    except ToolSchemaError as exc:
        return str(exc)
    return None


def enforce_bad_fraction(report: RowReport, max_bad_fraction: float, unit: str = "rows", where: str = "line") -> None:
    """Log the rejected rows; raise BadDataError when there are no rows or too many bad ones.

    Any report with `path`, `total`, `bad` and `bad_fraction` works (the dataset adapters pass theirs).
    """
    for number, reason in report.bad[:10]:
        log.warning("%s %s %d rejected: %s", report.path, where, number, reason)
    if report.bad:
        log.warning("%s: %d of %d %s rejected", report.path, len(report.bad), report.total, unit)
    if report.total == 0:
        raise BadDataError(f"{report.path}: no {unit}")
    if report.bad_fraction > max_bad_fraction:
        first = "; ".join(f"{where} {n}: {r}" for n, r in report.bad[:3])
        raise BadDataError(
            f"{report.path}: {len(report.bad)} of {report.total} {unit} are bad ({report.bad_fraction:.1%} > "
            f"max_bad_fraction {max_bad_fraction:.1%}); first: {first}. Fix the rows, or raise the limit with the "
            "`max_bad_fraction` key of the config section that names this file (data, eval)"
        )


def read_jsonl(
    path: str | Path, parse: Callable[[object, int], T], max_bad_fraction: float = 0.01, unit: str = "rows"
) -> tuple[list[T], RowReport]:
    """Parse every line of a JSONL file with `parse(record, line_number)`; a ValueError it raises rejects the line.

    Undecodable bytes and invalid JSON are rejected the same way, with the line number and reason.
    """
    path = Path(path)
    if not path.is_file():
        raise BadDataError(f"data file not found: {path}")
    report = RowReport(path=str(path))
    items: list[T] = []
    with path.open("rb") as handle:
        for number, raw in enumerate(handle, start=1):
            if not raw.strip():
                continue
            report.total += 1
            try:
                items.append(parse(json.loads(raw.decode("utf-8")), number))
            except UnicodeDecodeError as exc:
                report.bad.append((number, f"not valid UTF-8 ({exc.reason} at byte {exc.start})"))
            except ValueError as exc:  # json.JSONDecodeError is a ValueError too
                reason = f"not valid JSON ({exc.msg})" if isinstance(exc, json.JSONDecodeError) else str(exc)
                report.bad.append((number, reason))
    enforce_bad_fraction(report, max_bad_fraction, unit)
    return items, report


def read_rows(path: str | Path, use: RowUse = "train", max_bad_fraction: float = 0.01) -> tuple[list[dict], RowReport]:
    """Good rows of a JSONL file and a report of the bad ones. Raises BadDataError above `max_bad_fraction`."""

    def parse(row: object, number: int) -> dict:
        problem = row_problem(row, use)
        if problem is not None:
            raise ValueError(problem)
        return row  # type: ignore[return-value]

    return read_jsonl(path, parse, max_bad_fraction)


def write_rows(path: str | Path, rows: list[dict]) -> None:
    """Write JSONL atomically (temporary file, then rename) so a crash never leaves half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with tmp.open("w", encoding="utf-8") as handle:
        for row in rows:
            handle.write(json.dumps(row, ensure_ascii=False) + "\n")
    tmp.replace(path)


def fingerprint_files(*paths: str | Path) -> str:
    digest = hashlib.sha256()
    for p in paths:
        digest.update(str(p).encode())
        digest.update(Path(p).read_bytes())
    return digest.hexdigest()[:16]
