"""Process set-up shared by every stage: logging, device choice, seeds, CPU threads."""

from __future__ import annotations

import logging
import os
import random

import torch

log = logging.getLogger(__name__)


def setup_logging(level: int = logging.INFO) -> None:
    if not logging.getLogger().handlers:
        logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    # transformers warns once per kernel that it falls back to PyTorch; we log the path ourselves.
    logging.getLogger("transformers").setLevel(logging.ERROR)


def pick_device(name: str = "auto") -> torch.device:
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError(f"device {name!r} requested but CUDA is not available")
    if device.type == "cuda" and device.index is None:  # the current device (a Ray Train worker's own GPU)
        device = torch.device("cuda", torch.cuda.current_device())
    if device.type == "cpu" and "OMP_NUM_THREADS" not in os.environ:  # an explicit thread count wins
        torch.set_num_threads(max(1, len(os.sched_getaffinity(0))))
    if not torch.cuda.is_available():
        # Saving a checkpoint asks DeepSpeed (installed with the project) for its accelerator; found by detection,
        # the CPU comes with a warning that a GPU may have been missed. There is none: say so.
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    log.info("device: %s%s", device, f" ({torch.cuda.get_device_name(device)})" if device.type == "cuda" else
             f" ({torch.get_num_threads()} threads)")
    return device


def seed_everything(seed: int) -> None:
    random.seed(seed)
    torch.manual_seed(seed)


def distributed_rank_world() -> tuple[int, int]:
    """(rank, world size) of this worker; (0, 1) outside a distributed run."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


def to_device(batch: dict, device: torch.device) -> dict:
    """Tensors to `device`; on CUDA from pinned memory without blocking, so the host collates the next
    micro-batch while the GPU still runs this one (a pageable copy waits for the GPU to drain)."""
    if device.type == "cuda":
        return {k: v.pin_memory().to(device, non_blocking=True) if torch.is_tensor(v) else v for k, v in batch.items()}
    return {k: v.to(device) if torch.is_tensor(v) else v for k, v in batch.items()}
