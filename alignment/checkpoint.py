"""Checkpoints written atomically, with a manifest that later stages and reruns can trust.

A checkpoint directory holds the HF-format model and tokenizer plus `manifest.json`: the stage, its resolved config,
a fingerprint of its config and inputs, metrics, and the size and SHA-256 of every file. It is written to a
temporary sibling directory and renamed into place, so a crash never leaves a half-written checkpoint under the
final name; `verify_checkpoint` rejects one whose files do not match their manifest.
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
import shutil
import time
from pathlib import Path
from typing import Callable

MANIFEST = "manifest.json"


class CorruptCheckpointError(RuntimeError):
    """A checkpoint directory that is missing its manifest or whose files do not match it."""


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _file_table(directory: Path, checksums: bool = True) -> dict[str, dict]:
    return {
        str(p.relative_to(directory)): {"bytes": p.stat().st_size, **({"sha256": _sha256(p)} if checksums else {})}
        for p in sorted(directory.rglob("*"))
        if p.is_file() and p.name != MANIFEST
    }


def write_checkpoint(directory: str | Path, write_files: Callable[[Path], None], manifest: dict,
                     tmp: Path | None = None, checksums: bool = True) -> Path:
    """Call `write_files(tmp_dir)`, add the manifest, then atomically put the result at `directory`.

    An existing checkpoint at `directory` is replaced only after the new one is complete. `tmp`: a directory other
    processes have already written part of the checkpoint into (sharded training states); `checksums=False` records
    sizes only, for states too large to hash at every save.
    """
    final = Path(directory)
    final.parent.mkdir(parents=True, exist_ok=True)
    if tmp is None:
        tmp = final.with_name(f".{final.name}.tmp-{os.getpid()}")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
    write_files(tmp)
    manifest = dict(manifest, created=time.strftime("%Y-%m-%dT%H:%M:%S%z"), files=_file_table(tmp, checksums))
    (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2, default=str))
    if final.exists():
        old = final.with_name(f".{final.name}.old-{os.getpid()}")
        final.rename(old)
        tmp.rename(final)
        shutil.rmtree(old)
    else:
        tmp.rename(final)
    return final


def restore_interrupted_replace(directory: str | Path) -> bool:
    """Finish a replacement that a crash cut short between its two renames (no checkpoint under the final name):
    the complete new one if it is there, else the previous one, goes back under the name, and the other leftovers
    are removed. Returns whether it did. One process of a run calls it."""
    final = Path(directory)
    if final.exists():
        return False

    def newest_first(pattern: str) -> list[Path]:
        return sorted(final.parent.glob(pattern), key=lambda p: p.stat().st_mtime, reverse=True)

    leftovers = newest_first(f".{final.name}.*tmp*") + newest_first(f".{final.name}.old-*")  # new ones first
    for candidate in leftovers:
        try:
            verify_checkpoint(candidate, check_hashes=False)
        except CorruptCheckpointError:
            continue
        candidate.rename(final)
        for stale in leftovers:
            if stale != candidate:  # the rest of the cut-short write: superseded now
                shutil.rmtree(stale, ignore_errors=True)
        return True
    return False


def read_manifest(directory: str | Path) -> dict:
    path = Path(directory) / MANIFEST
    if not path.is_file():
        raise CorruptCheckpointError(f"{directory}: no {MANIFEST}; not a complete checkpoint")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise CorruptCheckpointError(f"{path}: unreadable manifest ({exc})") from exc


def verify_checkpoint(directory: str | Path, check_hashes: bool = True) -> dict:
    """The manifest of a complete, intact checkpoint; raises CorruptCheckpointError otherwise."""
    directory = Path(directory)
    manifest = read_manifest(directory)
    for name, expected in manifest.get("files", {}).items():
        path = directory / name
        if not path.is_file():
            raise CorruptCheckpointError(f"{directory}: file {name} listed in the manifest is missing")
        if path.stat().st_size != expected["bytes"]:
            raise CorruptCheckpointError(f"{directory}: file {name} has the wrong size (truncated write?)")
        if check_hashes and "sha256" in expected and _sha256(path) != expected["sha256"]:
            raise CorruptCheckpointError(f"{directory}: file {name} does not match its checksum")
    return manifest


ADAPTER_DIR = "adapter"


def save_model_checkpoint(directory: str | Path, model, tokenizer, manifest: dict) -> Path:
    """Save an HF model (merged when it carries LoRA adapters) and its tokenizer as a checkpoint; a LoRA model's
    adapter alone goes to `adapter/` as well (PEFT's layout, for `align export --adapter`)."""

    def write(tmp: Path) -> None:
        # Merging LoRA into a copy keeps the live model trainable; later stages get a plain full model.
        to_save = copy.deepcopy(model).merge_and_unload() if hasattr(model, "merge_and_unload") else model
        to_save.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        if hasattr(model, "peft_config"):
            model.save_pretrained(tmp / ADAPTER_DIR)

    return write_checkpoint(directory, write, manifest)
