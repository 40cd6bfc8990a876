"""Reading JSONL rows with validation: a bad row is rejected with its line number and reason, counted, and the run
goes on unless more than `max_bad_fraction` of the file is bad."""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

log = logging.getLogger(__name__)

RowUse = Literal["train", "prompt"]


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
    if use == "train":
        if messages[-1]["role"] != "assistant":
            return "last message is not an assistant turn"
        if not messages[-1]["content"].strip():
            return "assistant turn has an empty answer"
    needs_answer = use == "prompt" and row.get("task", "math") == "math"
    if needs_answer or "answer" in row:
        answer = row.get("answer")
        if not isinstance(answer, (str, int, float)) or str(answer).strip() == "":
            return "missing `answer`"
    return None


def read_rows(path: str | Path, use: RowUse = "train", max_bad_fraction: float = 0.01) -> tuple[list[dict], RowReport]:
    """Good rows of a JSONL file and a report of the bad ones. Raises BadDataError above `max_bad_fraction`."""
    path = Path(path)
    if not path.is_file():
        raise BadDataError(f"data file not found: {path}")
    report = RowReport(path=str(path))
    rows = []
    with path.open("rb") as handle:
        for number, raw in enumerate(handle, start=1):
            if not raw.strip():
                continue
            report.total += 1
            try:
                row = json.loads(raw.decode("utf-8"))
                problem = row_problem(row, use)
            except UnicodeDecodeError as exc:
                problem = f"not valid UTF-8 ({exc.reason} at byte {exc.start})"
            except json.JSONDecodeError as exc:
                problem = f"not valid JSON ({exc.msg})"
            if problem is None:
                rows.append(row)
            else:
                report.bad.append((number, problem))
    for number, reason in report.bad[:10]:
        log.warning("%s line %d rejected: %s", path, number, reason)
    if report.bad:
        log.warning("%s: %d of %d rows rejected", path, len(report.bad), report.total)
    if report.total == 0:
        raise BadDataError(f"{path}: no rows")
    if report.bad_fraction > max_bad_fraction:
        first = "; ".join(f"line {n}: {r}" for n, r in report.bad[:3])
        raise BadDataError(
            f"{path}: {len(report.bad)} of {report.total} rows are bad ({report.bad_fraction:.1%} > "
            f"max_bad_fraction {max_bad_fraction:.1%}); first: {first}"
        )
    return rows, report


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
