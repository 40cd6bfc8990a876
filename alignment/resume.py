"""Resumable training state: a stage interrupted mid-way picks up from its last saved step.

The state (weights, optimizer, step, data order) is written as a checkpoint directory, atomically, with the
fingerprint of the run's config and data. A state whose fingerprint differs (the config or data changed) or whose
files do not match their manifest is ignored, so a rerun never continues from something it should not.
"""

from __future__ import annotations

import hashlib
import json
import logging
import random
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import torch

from alignment.checkpoint import (CorruptCheckpointError, restore_interrupted_replace, verify_checkpoint,
                                  write_checkpoint)
from alignment.config import to_dict

log = logging.getLogger(__name__)

STATE_FILE = "trainer_state.pt"


@dataclass
class TrainState:
    """Everything besides weights and optimizer that a resumed run needs to continue identically."""

    rng: random.Random
    step: int = 0
    epoch: int = 0
    queue: list = field(default_factory=list)  # micro-batches left in the current pass over the data
    tokens_seen: int = 0
    seconds: float = 0.0
    extra: dict = field(default_factory=dict)  # a stage's own progress (GRPO: prompt pool, rollout count, history)


def run_fingerprint(config, *input_files: str, salt: str = "") -> str:
    """Hash of the resolved config (less where outputs go), the bytes of the inputs and `salt`."""
    data = to_dict(config)
    data.pop("output_dir", None)
    data.pop("tracking", None)  # where the logs go changes nothing a resumed run computes
    digest = hashlib.sha256((json.dumps(data, sort_keys=True, default=str) + salt).encode())
    for path in input_files:
        digest.update(Path(path).read_bytes())
    return digest.hexdigest()[:16]


def _progress(state: TrainState) -> dict:
    return {"step": state.step, "epoch": state.epoch, "queue": state.queue, "rng": state.rng.getstate(),
            "tokens_seen": state.tokens_seen, "seconds": state.seconds, "extra": state.extra,
            "torch_rng": torch.get_rng_state()}


def _restore_progress(state: TrainState, saved: dict) -> None:
    state.step, state.epoch, state.queue = saved["step"], saved["epoch"], saved["queue"]
    state.tokens_seen, state.seconds = saved["tokens_seen"], saved["seconds"]
    state.rng.setstate(saved["rng"])
    state.extra = saved.get("extra", {})
    if "torch_rng" in saved:
        torch.set_rng_state(saved["torch_rng"])


def save_training_state(directory: Path, fingerprint: str, model, optimizer, state: TrainState,
                        trainable_only: bool = False) -> None:
    """`trainable_only`: save the parameters that train (LoRA: the adapters), not the frozen base. `optimizer` may
    be None (a stage that starts a fresh optimizer where it resumes, as DPO does each round)."""
    weights = {name: p.detach() for name, p in model.named_parameters() if p.requires_grad} if trainable_only \
        else model.state_dict()

    def write(tmp: Path) -> None:
        torch.save({"model": weights, "trainable_only": trainable_only,
                    "optimizer": None if optimizer is None else optimizer.state_dict(), **_progress(state)},
                   tmp / STATE_FILE)

    write_checkpoint(directory, write, {"kind": "training-state", "fingerprint": fingerprint, "step": state.step})


def _restore(directory: Path) -> None:
    """Rank 0 finishes a save a crash cut short; the other workers wait for it."""
    distributed = torch.distributed.is_available() and torch.distributed.is_initialized()
    if (not distributed or torch.distributed.get_rank() == 0) and restore_interrupted_replace(directory):
        log.warning("%s: restored the training state a crash left under a temporary name", directory)
    if distributed:
        torch.distributed.barrier()


def _usable_state(directory: Path, fingerprint: str, check_hashes: bool = True) -> bool:
    """Whether `directory` holds an intact training state of this config and data."""
    if not directory.exists():
        return False
    try:
        manifest = verify_checkpoint(directory, check_hashes=check_hashes)
    except CorruptCheckpointError as exc:
        log.warning("ignoring unusable training state: %s", exc)
        return False
    if manifest.get("fingerprint") != fingerprint:
        log.info("training state at %s is for another config or data; starting fresh", directory)
        return False
    return True


def resume_training(directory: Path, fingerprint: str, model, optimizer, state: TrainState) -> bool:
    """Load the saved state into `model`, `optimizer` and `state` when it exists, is intact and matches."""
    _restore(directory)
    if not _usable_state(directory, fingerprint):
        return False
    saved = torch.load(directory / STATE_FILE, map_location="cpu", weights_only=False)
    if saved.get("trainable_only"):
        trainable = {name for name, p in model.named_parameters() if p.requires_grad}
        if set(saved["model"]) != trainable:
            log.warning("training state at %s saves other parameters than this model trains; starting fresh", directory)
            return False
        model.load_state_dict(saved["model"], strict=False)
    else:
        model.load_state_dict(saved["model"])
    if optimizer is not None:
        optimizer.load_state_dict(saved["optimizer"])
    _restore_progress(state, saved)
    return True


# Sharded (DeepSpeed ZeRO) states: every worker writes its own shard of weights and optimizer states into one shared
# directory, rank 0 adds the progress and the manifest and renames it into place. All workers call these in step.
SHARDS = "shards"


def save_sharded_training_state(directory: Path, fingerprint: str, zero, state: TrainState, rank: int) -> None:
    tmp = directory.with_name(f".{directory.name}.sharded-tmp")  # the same path on every worker
    if rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    torch.distributed.barrier()
    zero.save_state(tmp / SHARDS)
    torch.distributed.barrier()
    if rank == 0:
        write_checkpoint(directory, lambda t: torch.save(_progress(state), t / STATE_FILE),
                         {"kind": "sharded-training-state", "fingerprint": fingerprint, "step": state.step},
                         tmp=tmp, checksums=False)  # sizes only: hashing a 9B model's states would take minutes
    torch.distributed.barrier()


def resume_sharded_training(directory: Path, fingerprint: str, zero, state: TrainState) -> bool:
    _restore(directory)
    if not _usable_state(directory, fingerprint, check_hashes=False):
        return False
    zero.load_state(directory / SHARDS)
    _restore_progress(state, torch.load(directory / STATE_FILE, map_location="cpu", weights_only=False))
    return True
