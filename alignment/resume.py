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
from dataclasses import dataclass, field
from pathlib import Path

import torch

from alignment.checkpoint import CorruptCheckpointError, verify_checkpoint, write_checkpoint
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


def run_fingerprint(config, *input_files: str) -> str:
    """Hash of the resolved config (less where outputs go) and the bytes of the inputs."""
    data = to_dict(config)
    data.pop("output_dir", None)
    digest = hashlib.sha256(json.dumps(data, sort_keys=True, default=str).encode())
    for path in input_files:
        digest.update(Path(path).read_bytes())
    return digest.hexdigest()[:16]


def save_training_state(directory: Path, fingerprint: str, model, optimizer, state: TrainState) -> None:
    def write(tmp: Path) -> None:
        torch.save(
            {"model": model.state_dict(), "optimizer": optimizer.state_dict(), "step": state.step,
             "epoch": state.epoch, "queue": state.queue, "rng": state.rng.getstate(),
             "tokens_seen": state.tokens_seen, "seconds": state.seconds},
            tmp / STATE_FILE,
        )

    write_checkpoint(directory, write, {"kind": "training-state", "fingerprint": fingerprint, "step": state.step})


def resume_training(directory: Path, fingerprint: str, model, optimizer, state: TrainState) -> bool:
    """Load the saved state into `model`, `optimizer` and `state` when it exists, is intact and matches."""
    if not directory.exists():
        return False
    try:
        manifest = verify_checkpoint(directory)
    except CorruptCheckpointError as exc:
        log.warning("ignoring unusable training state: %s", exc)
        return False
    if manifest.get("fingerprint") != fingerprint:
        log.info("training state at %s is for another config or data; starting fresh", directory)
        return False
    saved = torch.load(directory / STATE_FILE, map_location="cpu", weights_only=False)
    model.load_state_dict(saved["model"])
    optimizer.load_state_dict(saved["optimizer"])
    state.step, state.epoch, state.queue = saved["step"], saved["epoch"], saved["queue"]
    state.tokens_seen, state.seconds = saved["tokens_seen"], saved["seconds"]
    state.rng.setstate(saved["rng"])
    return True
