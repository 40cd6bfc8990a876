"""Data-parallel SFT through Ray Train: the same `run_sft` loop on N workers (gloo on CPU, NCCL on GPU).

Ray Train starts the workers and sets up `torch.distributed`; `run_sft` sees the process group, wraps the model in
DDP, gives each worker its share of every step's micro-batches and normalises the loss over the global batch, so
the loss trajectory matches a single worker with the same global batch (see tests/test_pipeline.py).
"""

from __future__ import annotations

import logging
from pathlib import Path

log = logging.getLogger(__name__)


def _sft_worker(payload: dict) -> None:
    from alignment.sft import run_sft

    run_sft(payload["config"])


def run_sft_data_parallel(config, num_workers: int, use_gpu: bool = False, cpus_per_worker: float = 1.0) -> dict:
    """Run SFT on `num_workers` Ray Train workers; returns rank 0's evaluation summary from the checkpoint."""
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    from alignment.checkpoint import read_manifest

    out = Path(config.output_dir).resolve()
    trainer = TorchTrainer(
        _sft_worker,
        train_loop_config={"config": config},
        torch_config=TorchConfig(backend="nccl" if use_gpu else "gloo"),
        scaling_config=ScalingConfig(
            num_workers=num_workers, use_gpu=use_gpu, resources_per_worker={"CPU": cpus_per_worker}
        ),
        run_config=RunConfig(name="sft", storage_path=str(out / "ray_train")),
    )
    log.info("SFT on %d Ray Train worker(s) (%s)", num_workers, "NCCL" if use_gpu else "gloo")
    trainer.fit()
    return read_manifest(out / "checkpoint")["metrics"]
