"""Reading records from a local file or directory (JSONL, JSON, Parquet) or the hub, and converting them to rows.

    rows = load_dataset_rows("data/gsm8k/train.jsonl", "gsm8k")
    rows = load_dataset_rows("openai/gsm8k", "gsm8k", split="train", name="main")   # through `datasets`

    python -m data_recipes.adapters openai/gsm8k --schema gsm8k --name main --split train \\
        --out runs/data/gsm8k/train.jsonl --exclude-prompts runs/data/gsm8k/test.jsonl

The written JSONL is what stages read (`data.train_path`, `eval.test_path`); `<name>.manifest.json` next to it
records the source, schema, rejected records and the rows dropped because their prompt (normalised as
`alignment.split_guard` does) is in one of the `--exclude-prompts` files: public training sets repeat questions of
public test sets, and the split guard refuses splits that share a prompt.
"""

from __future__ import annotations

import argparse
import csv
import json
import logging
import sys
from pathlib import Path
from typing import Any, Iterator, Sequence

from alignment.data import BadDataError
from alignment.split_guard import prompt_key, prompt_keys
from data_recipes.adapters.base import (
    AdapterReport, RecordError, UnreadableRecord, adapt, register_schema, schema_names,
)  # fmt: skip

log = logging.getLogger(__name__)

LOCAL_SUFFIXES = (".jsonl", ".json", ".parquet", ".csv")


@register_schema("rows")
def project_row(record: dict[str, Any], index: int) -> dict[str, Any]:
    """Records already in the project's row schema: only validated."""
    return record


def _jsonl_records(path: Path) -> Iterator[dict[str, Any]]:
    with path.open("rb") as handle:
        for raw in handle:
            if not raw.strip():
                continue
            try:
                yield json.loads(raw.decode("utf-8"))
            except UnicodeDecodeError as exc:
                yield UnreadableRecord(reason=f"not valid UTF-8 ({exc.reason} at byte {exc.start})")
            except json.JSONDecodeError as exc:
                yield UnreadableRecord(reason=f"not valid JSON ({exc.msg})")


def _file_records(path: Path) -> list[dict[str, Any]]:
    if path.suffix == ".jsonl":
        return list(_jsonl_records(path))
    if path.suffix == ".json":
        data = json.loads(path.read_text(encoding="utf-8"))
        if not isinstance(data, list):
            raise ValueError(f"{path}: a .json dataset must hold a list of records")
        return data
    if path.suffix == ".csv":  # GPQA's release: one record per row, the header names the fields
        with path.open(newline="", encoding="utf-8") as handle:
            return [dict(record) for record in csv.DictReader(handle)]
    # Parquet through `datasets` (already a dependency) rather than pyarrow directly, whose version it pins.
    import datasets

    return list(datasets.load_dataset("parquet", data_files=str(path), split="train"))


def _split_files(directory: Path, split: str) -> list[Path]:
    """Files of `split` in a local copy of a hub dataset: `train.jsonl`, `data/train-00000-of-00002.parquet`, ..."""
    files = sorted(p for p in directory.rglob("*") if p.suffix in LOCAL_SUFFIXES and p.name.startswith(split))
    if not files:
        raise FileNotFoundError(f"{directory}: no {'/'.join(LOCAL_SUFFIXES)} file whose name starts with {split!r}")
    return files


def load_records(source: str | Path, split: str = "train", name: str | None = None) -> list[dict[str, Any]]:
    """Raw records from a local file, a local directory (files of `split`), or a hub dataset id.

    A local file is read whole whatever `split` says. For the hub, `split` accepts slices (`"train[:1000]"`), which
    is how to take a sample of a large set without downloading all of it into rows.
    """
    path = Path(source)
    if path.is_file():
        return _file_records(path)
    if path.is_dir():
        return [record for file in _split_files(path, split) for record in _file_records(file)]
    if str(source).endswith(LOCAL_SUFFIXES) or str(source).startswith((".", "/")):
        raise FileNotFoundError(f"dataset file not found: {source}")
    import datasets

    return list(datasets.load_dataset(str(source), name, split=split))


def drop_excluded_prompts(rows: list[dict[str, Any]], report: AdapterReport,
                           exclude_prompts: Sequence[str | Path]) -> list[dict[str, Any]]:
    """The rows whose normalised prompt is in none of the `exclude_prompts` files; the dropped ids go to `report`."""
    report.exclude_prompts = [str(p) for p in exclude_prompts]
    if not exclude_prompts:
        return rows
    held_out = prompt_keys(exclude_prompts)
    kept = []
    for row in rows:
        if prompt_key(row) in held_out:
            report.excluded.append(str(row.get("id")))
        else:
            kept.append(row)
    log.info("%s: %d of %d rows dropped, their prompt is in %s", report.path, len(report.excluded), len(rows),
             ", ".join(report.exclude_prompts))
    return kept


def load_dataset_rows_with_report(
    source: str | Path, schema: str, split: str = "train", *, name: str | None = None,
    max_bad_fraction: float = 0.01, limit: int | None = None, exclude_prompts: Sequence[str | Path] = (),
) -> tuple[list[dict[str, Any]], AdapterReport]:
    """`load_dataset_rows`, and the report of rejected records (and excluded rows) for a manifest."""
    records = load_records(source, split, name)
    if limit is not None:
        records = records[:limit]
    label = f"{source}" if Path(source).exists() else f"{source}:{split}"
    rows, report = adapt(records, schema, max_bad_fraction=max_bad_fraction, source=label)
    return drop_excluded_prompts(rows, report, exclude_prompts), report


def load_dataset_rows(
    source: str | Path, schema: str, split: str = "train", *, name: str | None = None,
    max_bad_fraction: float = 0.01, limit: int | None = None, exclude_prompts: Sequence[str | Path] = (),
) -> list[dict[str, Any]]:
    """Rows in the project's schema from `source` (local path or hub id) read as `schema` (see `schema_names()`).

    Bad records are logged with their index and reason; `BadDataError` is raised when more than
    `max_bad_fraction` of them are bad. `limit` keeps the first records only; `name` is the hub config name.
    Rows whose normalised prompt is in one of the `exclude_prompts` JSONL files (held-out splits) are dropped.
    """
    return load_dataset_rows_with_report(
        source, schema, split, name=name, max_bad_fraction=max_bad_fraction, limit=limit,
        exclude_prompts=exclude_prompts,
    )[0]


def main(argv: list[str] | None = None) -> None:
    from alignment.data import write_rows

    parser = argparse.ArgumentParser(description="Convert a dataset to the project's JSONL row schema.")
    parser.add_argument("source", help="Local .jsonl/.json/.parquet file or directory, or a hub dataset id.")
    parser.add_argument("--schema", required=True, choices=schema_names(), help="Layout of the source records.")
    parser.add_argument("--split", default="train", help="Split (hub slices like train[:1000] work).")
    parser.add_argument("--name", default=None, help="Hub config name (e.g. `main` for openai/gsm8k).")
    parser.add_argument("--limit", type=int, default=None, help="Keep only the first N records.")
    parser.add_argument("--max-bad-fraction", type=float, default=0.01, help="Fail above this fraction of bad records.")
    parser.add_argument("--out", required=True, help="Output JSONL path; <name>.manifest.json goes next to it.")
    parser.add_argument("--exclude-prompts", nargs="+", action="extend", default=[], metavar="FILE",
                        help="Held-out JSONL split(s): drop rows whose normalised prompt is in them (counted).")
    parser.add_argument("--debug", action="store_true", help="Show the traceback when the source cannot be used.")
    args = parser.parse_args(argv)
    try:
        rows, report = load_dataset_rows_with_report(
            args.source, args.schema, args.split, name=args.name, max_bad_fraction=args.max_bad_fraction,
            limit=args.limit, exclude_prompts=args.exclude_prompts,
        )
    except (BadDataError, RecordError, FileNotFoundError) as exc:  # bad input: its message says it all
        if args.debug:
            raise
        sys.exit(f"error: {exc}\n(--debug shows the traceback)")
    out = Path(args.out)
    write_rows(out, rows)
    manifest = {"recipe": "adapters", "split": args.split, "rows": len(rows), **report.summary()}
    (out.parent / f"{out.stem}.manifest.json").write_text(json.dumps(manifest, indent=2))
    excluded = f", {len(report.excluded)} rows with a held-out prompt dropped" if args.exclude_prompts else ""
    print(f"wrote {len(rows)} rows to {out} ({len(report.bad)} of {report.total} records rejected{excluded})")
