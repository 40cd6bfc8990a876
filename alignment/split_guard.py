"""Split guard: no prompt of one split may appear in another, whatever the files are called.

Different paths do not make disjoint splits: public math sets repeat public test questions, and one question written
once with `/no_think` and once without is two lines with a single prompt. So every row is keyed by the prompt the
model sees (the conversation before its reference assistant turn; for a row without `messages`, what its task's
environment writes), normalised so that formatting and the reasoning switch cannot hide a match:

- Unicode NFKC, casefolding, and every run of whitespace as one space;
- the switch keywords `/think` and `/no_think` and the `detailed thinking on` / `off` system prompt removed, and a
  system message that held only a switch dropped.

The key is a shortened sha256 of that text. `check_disjoint` compares every pair of splits and raises
`SplitOverlapError` naming the splits, files, first rows and count; the stages call it in one line:

    guard_splits("grpo", rl=config.data.train_path, test=config.eval.test_path)

A prompt repeated within one split is that split's own business and passes.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
import unicodedata
from dataclasses import dataclass, field
from itertools import combinations
from pathlib import Path
from typing import Any, Iterable, Iterator, Mapping, Sequence

from alignment.data import BadDataError
from envs import task_environments

log = logging.getLogger(__name__)

Source = str | Path | Sequence[dict]  # a JSONL file, or rows already in memory
KEY_HEX = 16  # 64 bits: an accidental collision among millions of prompts is out of reach
MAX_EXAMPLES = 3  # overlapping rows named per pair of splits

# Matched after casefolding. The keywords as words (`/think` inside `</think>` is not one), as alignment.chat_format
# and data_recipes.adapters.base read them.
_SWITCH = re.compile(r"(?<![<\w])/(?:no_)?think(?![\w>])|\bdetailed\s+thinking\s+(?:on|off)\b")
_WHITESPACE = re.compile(r"\s+")


class SplitOverlapError(ValueError):
    """Two splits are one file or share a normalised prompt; the message names the splits, files and rows."""

    def __init__(self, message: str, overlaps: list[tuple[str, str, int]]):
        super().__init__(message)
        self.overlaps = overlaps  # (split, split, shared prompts); 0 for the same file


# ---------------------------------------------------------------------------------------------------------------
# Keys


def normalise_text(text: str) -> str:
    text = unicodedata.normalize("NFKC", text).casefold()
    return _WHITESPACE.sub(" ", _SWITCH.sub(" ", text)).strip()


def prompt_turns(row: Any) -> list[dict] | None:
    """The messages a row prompts the model with; None when it has none the guard can read."""
    if not isinstance(row, dict):
        return None
    messages = row.get("messages")
    if isinstance(messages, list) and messages:
        last = messages[-1]
        return messages[:-1] if isinstance(last, dict) and last.get("role") == "assistant" else messages
    if isinstance(row.get("prompt"), list):  # preference pairs (data_recipes/preference.py)
        return row["prompt"]
    env = task_environments().get(row.get("task", "math"))
    if env is None:
        return None
    try:  # the environment adds the row's `reasoning` switch, which the key ignores anyway
        return env.prompt_messages({k: v for k, v in row.items() if k != "reasoning"})
    except (KeyError, TypeError, ValueError):
        return None


def prompt_text(messages: list[dict]) -> str | None:
    """The normalised prompt, one `role: text` line per turn; None when a turn is malformed."""
    lines = []
    for message in messages:
        if not isinstance(message, dict) or not isinstance(message.get("content"), str):
            return None
        text = normalise_text(message["content"])
        if message.get("role") == "system" and not text:
            continue
        lines.append(f"{message.get('role')}: {text}")
    return "\n".join(lines) if lines else None


def prompt_key(row: Any) -> str | None:
    """sha256 (shortened) of the row's normalised prompt; None for a row without a readable prompt."""
    turns = prompt_turns(row)
    text = prompt_text(turns) if turns is not None else None
    return None if text is None else hashlib.sha256(text.encode("utf-8")).hexdigest()[:KEY_HEX]


# ---------------------------------------------------------------------------------------------------------------
# Splits


@dataclass
class SplitPrompts:
    """One split's prompt keys, each with where its first row is (`line 12 (id math-test-000011)`)."""

    name: str
    source: str  # the file, or "rows in memory"
    rows: int = 0
    unkeyed: int = 0  # not JSON, or no prompt: the stage's own reader rejects these rows
    first: dict[str, str] = field(default_factory=dict)

    def summary(self) -> dict[str, Any]:
        return {"source": self.source, "rows": self.rows, "prompts": len(self.first), "unkeyed": self.unkeyed}


def _file_rows(path: Path) -> Iterator[tuple[str, Any]]:
    with path.open("rb") as handle:
        for number, raw in enumerate(handle, start=1):
            if not raw.strip():
                continue
            try:
                yield f"line {number}", json.loads(raw.decode("utf-8"))
            except ValueError:  # bad UTF-8 or JSON: unkeyed, and rejected by the stage's reader with its reason
                yield f"line {number}", None


def split_prompts(name: str, source: Source) -> SplitPrompts:
    """Read a split (a JSONL path or a list of rows) into its prompt keys."""
    if isinstance(source, (str, Path)):
        path = Path(source)
        if not path.is_file():
            raise BadDataError(f"data file not found: {path} (split {name!r})")
        split, rows = SplitPrompts(name, str(path)), _file_rows(path)
    else:
        split, rows = SplitPrompts(name, "rows in memory"), ((f"row {i}", row) for i, row in enumerate(source))
    for where, row in rows:
        split.rows += 1
        key = prompt_key(row)
        if key is None:
            split.unkeyed += 1
        elif key not in split.first:
            row_id = row.get("id") if isinstance(row, dict) else None
            split.first[key] = f"{where} (id {row_id})" if row_id is not None else where
    return split


def prompt_keys(sources: Iterable[Source]) -> set[str]:
    """Every prompt key of the given files or row lists (what `--exclude-prompts` drops)."""
    keys: set[str] = set()
    for source in sources:
        keys.update(split_prompts("excluded", source).first)
    return keys


def _same_files(splits: Mapping[str, Source]) -> list[tuple[str, str, Path]]:
    seen: dict[Path, str] = {}
    same = []
    for name, source in splits.items():
        if isinstance(source, (str, Path)):
            path = Path(source).resolve()
            if path in seen:
                same.append((seen[path], name, path))
            else:
                seen[path] = name
    return same


def check_disjoint(splits: Mapping[str, Source], stage: str = "") -> dict[str, dict[str, Any]]:
    """Raise `SplitOverlapError` when two splits are one file or share a normalised prompt.

    `splits` maps a split's name to a JSONL path or a list of rows, e.g. `{"train": ..., "test": ...}`; every pair
    is compared. Returns each split's summary (rows, distinct prompts, rows without a prompt) for a manifest.
    """
    prefix = f"{stage}: " if stage else ""
    if same := _same_files(splits):
        lines = [f"splits {a!r} and {b!r} are the same file {path}" for a, b, path in same]
        raise SplitOverlapError(prefix + "; ".join(lines) + "; give every split its own rows",
                                [(a, b, 0) for a, b, _ in same])
    read = [split_prompts(name, source) for name, source in splits.items()]
    overlaps, lines = [], []
    for a, b in combinations(read, 2):
        small, large = (a, b) if len(a.first) <= len(b.first) else (b, a)
        shared = [key for key in small.first if key in large.first]
        if not shared:
            continue
        overlaps.append((a.name, b.name, len(shared)))
        examples = "; ".join(f"{a.name} {a.first[k]} = {b.name} {b.first[k]}" for k in shared[:MAX_EXAMPLES])
        lines.append(f"  {a.name!r} ({a.source}) and {b.name!r} ({b.source}) share {len(shared)} prompt(s); "
                     f"first: {examples}")
    if overlaps:
        raise SplitOverlapError(
            f"{prefix}splits share prompts (compared after Unicode NFKC, casefolding, whitespace and the reasoning "
            "switch are normalised); drop those rows from one side, e.g. `python -m data_recipes.adapters ... "
            "--exclude-prompts HELD_OUT.jsonl`:\n" + "\n".join(lines),
            overlaps,
        )
    return {split.name: split.summary() for split in read}


def guard_splits(stage: str, **splits: Source | None) -> dict[str, dict[str, Any]]:
    """`check_disjoint` over a stage's splits given by keyword; empty ones (unset config paths) are skipped.

        guard_splits("dpo", rl=config.mining.prompts_path, validation=config.selection.validation_path,
                     test=config.eval.test_path)
    """
    given = {name: source for name, source in splits.items() if source is not None and source != ""}
    summary = check_disjoint(given, stage)
    for name, split in summary.items():
        if split["unkeyed"]:
            log.warning("%s: %d of %d rows of split %r (%s) have no readable prompt and were not compared",
                        stage, split["unkeyed"], split["rows"], name, split["source"])
    if len(given) > 1:
        log.info("%s: splits %s share no prompt", stage, ", ".join(summary))
    return summary
