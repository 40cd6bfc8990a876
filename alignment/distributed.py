"""Data parallelism through Ray Train: a stage's own loop on N workers (gloo on CPU, NCCL on GPU).

Ray Train starts the workers and sets up `torch.distributed`; the stage sees the process group and splits its work:
- SFT wraps the model in DDP, gives each worker its share of every step's micro-batches and normalises the loss over
  the global batch, so the loss trajectory matches a single worker with the same global batch (tests/test_pipeline.py);
- GRPO and DPO split each step's prompt groups (DPO: each round's mining prompts, the reference log-probs and each
  step's pairs) across the workers, exchange what the others need, and sum the gradients (`sum_gradients`) before
  the identical updates (tests/test_grpo_workers.py, tests/test_dpo_workers.py).
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any, Callable

import torch

log = logging.getLogger(__name__)


def all_reduce_sum(values: torch.Tensor) -> torch.Tensor:
    """The element-wise sum of `values` over all workers (a CPU tensor in, a CPU tensor out, on gloo and NCCL)."""
    on_device = values.cuda() if torch.distributed.get_backend() == "nccl" else values.clone()
    torch.distributed.all_reduce(on_device)
    return on_device.cpu()


def all_reduce_max(value: int) -> int:
    """The largest of every worker's `value`."""
    t = torch.tensor([value], dtype=torch.int64)
    t = t.cuda() if torch.distributed.get_backend() == "nccl" else t
    torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MAX)
    return int(t.item())


def gather_objects(obj: Any) -> list:
    """Every worker's `obj` (picklable), in rank order; `[obj]` outside a distributed run."""
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return [obj]
    everyone: list = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(everyone, obj)
    return everyone


def sum_gradients(params: list[torch.nn.Parameter]) -> None:
    """Sum each parameter's gradient over the workers, in place; a worker that had no tokens adds zeros."""
    for p in params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
        torch.distributed.all_reduce(p.grad)


def broadcast_parameters(params: list[torch.nn.Parameter]) -> None:
    """Give every worker rank 0's values of `params` (freshly initialised adapters, for one)."""
    for p in params:
        torch.distributed.broadcast(p.data, src=0)


def connect_ray(address: str = ""):
    """Join the Ray cluster at `address` (or RAY_ADDRESS), or start a private local instance; returns `ray`."""
    import ray

    if ray.is_initialized():
        return ray
    address = address or os.environ.get("RAY_ADDRESS", "")
    if address:
        ray.init(address=address, log_to_driver=True)
        log.info("joined Ray cluster at %s", address)
    else:
        # A private local instance: loopback only, no dashboard (nothing listens beyond this machine). "local" also
        # ignores the address a `ray start` left in /tmp/ray/ray_current_cluster, which may be a dead head.
        ray.init(address="local", include_dashboard=False, log_to_driver=True, _node_ip_address="127.0.0.1",
                 runtime_env={"env_vars": {"PYTHONPATH": os.pathsep.join(
                     p for p in (os.getcwd(), os.environ.get("PYTHONPATH", "")) if p)}})
        log.info("started a local Ray instance")
    return ray


def _worker(payload: dict) -> None:
    payload["run"](payload["config"])


def run_data_parallel(run: Callable, config, num_workers: int, use_gpu: bool = False, cpus_per_worker: float = 1.0,
                      name: str = "stage") -> dict:
    """Run a stage's `run(config)` on `num_workers` Ray Train workers; returns rank 0's summary from the checkpoint."""
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    from alignment.checkpoint import read_manifest

    out = Path(config.output_dir).resolve()
    trainer = TorchTrainer(
        _worker,
        train_loop_config={"run": run, "config": config},
        torch_config=TorchConfig(backend="nccl" if use_gpu else "gloo"),
        scaling_config=ScalingConfig(
            num_workers=num_workers, use_gpu=use_gpu, resources_per_worker={"CPU": cpus_per_worker}
        ),
        run_config=RunConfig(name=name, storage_path=str(out / "ray_train")),
    )
    log.info("%s on %d Ray Train worker(s) (%s)", name, num_workers, "NCCL" if use_gpu else "gloo")
    trainer.fit()
    return read_manifest(out / "checkpoint")["metrics"]

