"""DeepSpeed ZeRO for SFT and GRPO: the one module that calls DeepSpeed, so an upstream API change touches only this file.

ZeRO-3 shards weights, gradients and AdamW states over the data-parallel workers: that is what makes full
fine-tuning of a 9B model fit 80 GB GPUs. The stage keeps its own loop and loss: each micro-batch goes through the
engine's forward/backward, the optimizer is the stage's AdamW (its learning rate set every step from the stage's
schedule), and the engine clips and steps at the end of each step's micro-batches. The loss is normalised exactly
as in the plain data-parallel path, so a ZeRO run follows the same trajectory as one process with the same global
batch (tests/test_zero.py checks this on 2 CPU processes).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import socket
from collections.abc import Iterator
from pathlib import Path

import torch

from alignment.config import ConfigError

log = logging.getLogger(__name__)

# The stage owns these; a DeepSpeed config that sets them would silently fight the stage's own settings.
OWNED_SECTIONS = ("optimizer", "scheduler")


def deepspeed_config(path: str, *, max_grad_norm: float, grad_accum: int, world: int, bf16: bool) -> dict:
    """Read a DeepSpeed JSON config and fill the values the stage decides ("auto", or absent)."""
    try:
        config = json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise ConfigError(f"train.deepspeed: cannot read DeepSpeed config {path}: {exc}") from exc
    if owned := [k for k in OWNED_SECTIONS if k in config]:
        raise ConfigError(f"{path}: remove {owned}: SFT uses its own AdamW and learning-rate schedule "
                         "(train.lr, train.schedule, train.weight_decay)")
    stage = config.get("zero_optimization", {}).get("stage", 0)
    if stage not in (1, 2, 3):
        raise ConfigError(f"{path}: zero_optimization.stage must be 1, 2 or 3 (got {stage!r})")

    def fill(key: str, value):
        if config.get(key, "auto") == "auto":
            config[key] = value
        elif config[key] != value:
            raise ConfigError(f"{path}: {key}={config[key]!r} disagrees with the stage's {value!r}; set it to \"auto\"")

    # A "micro-batch" is one packed batch of the stage; DeepSpeed only uses these numbers for bookkeeping.
    fill("train_micro_batch_size_per_gpu", 1)
    fill("gradient_accumulation_steps", grad_accum)
    fill("train_batch_size", grad_accum * world)
    fill("gradient_clipping", max_grad_norm)
    if config.get("bf16", {}).get("enabled") == "auto":
        config["bf16"]["enabled"] = bf16
    if config.get("bf16", {}).get("enabled", False) != bf16:
        raise ConfigError(f"{path}: bf16.enabled={config['bf16'].get('enabled')} but model.dtype is "
                          f"{'bfloat16' if bf16 else 'not bfloat16'}; set it to \"auto\"")
    if config.get("fp16", {}).get("enabled"):
        raise ConfigError(f"{path}: fp16 is not supported (no loss scaling in the stage); use bf16")
    config.setdefault("zero_allow_untested_optimizer", True)  # torch AdamW is the client optimizer
    return config


def chunked_loss_unusable(zero_settings: dict | None) -> str | None:
    """Why the chunked loss cannot run under these DeepSpeed settings, or None when it can."""
    if zero_settings and zero_settings.get("zero_optimization", {}).get("stage") == 3:
        # Each call of the sharded head is a collective gather, and the chunk count follows each worker's tokens.
        return "ZeRO-3 needs every worker to call the sharded LM head equally often"
    return None


def full_weight_settings(train, world: int, bf16: bool) -> dict | None:
    """The DeepSpeed settings of a DPO or GRPO `train` section, None without `train.deepspeed`.

    Read before the model loads, so a bad file fails in seconds; these stages mark each update's last micro-batch
    themselves (no fixed accumulation count), and refuse a chunked loss that ZeRO-3 cannot run.
    """
    if not train.deepspeed:
        return None
    settings = deepspeed_config(train.deepspeed, max_grad_norm=train.max_grad_norm, grad_accum=1, world=world,
                                bf16=bf16)
    if train.loss_chunk_tokens and (why_not := chunked_loss_unusable(settings)):
        raise ConfigError(f"train.loss_chunk_tokens must be 0 here: {why_not}")
    return settings


def free_local_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on now (for a process group's rendezvous)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _ensure_process_group() -> None:
    """A single process started without a launcher (`align sft` alone) becomes a world of one."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return
    for key, value in (("RANK", "0"), ("LOCAL_RANK", "0"), ("WORLD_SIZE", "1"), ("MASTER_ADDR", "127.0.0.1")):
        os.environ.setdefault(key, value)
    if "MASTER_PORT" not in os.environ:
        os.environ["MASTER_PORT"] = str(free_local_port())


class ZeroEngine:
    """A model and its AdamW under a DeepSpeed engine; `forward`, `backward` and `step` are the engine's."""

    def __init__(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer, config: dict, device: torch.device):
        import deepspeed
        from deepspeed.utils import set_z3_leaf_modules

        if config["zero_optimization"]["stage"] == 3:
            # Mamba mixers read their children's weights directly (conv1d.weight into the conv kernel), so ZeRO-3
            # must gather a mixer's parameters as one unit instead of per child module.
            mixers = sorted({type(m) for m in model.modules() if hasattr(m, "conv1d") and hasattr(m, "in_proj")},
                            key=lambda c: c.__name__)
            if mixers:
                set_z3_leaf_modules(model, mixers)
        _ensure_process_group()
        deepspeed.init_distributed(auto_mpi_discovery=False)
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        if device.type == "cuda" and device.index != local_rank:  # DeepSpeed would move the model to cuda:LOCAL_RANK
            raise RuntimeError(f"this worker trains on {device} but DeepSpeed would use cuda:{local_rank} "
                               "(LOCAL_RANK): give each worker the GPU of its local rank")
        self.engine, self.optimizer, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, config=config)
        self.stage = config["zero_optimization"]["stage"]
        log.info("DeepSpeed ZeRO-%d over %d worker(s), bf16 %s", self.stage, torch.distributed.get_world_size(),
                 config.get("bf16", {}).get("enabled", False))

    def __call__(self, **inputs):
        return self.engine(**inputs)

    @property
    def module(self) -> torch.nn.Module:
        """The model under the engine (as DDP and DeepSpeed name it), e.g. to reach its LM head."""
        return self.engine.module

    def backward(self, loss: torch.Tensor, last: bool | None = None) -> None:
        """Backward of one micro-batch; the optimizer steps (clipping first) after the update's last one.

        `last` None: the engine counts `gradient_accumulation_steps` micro-batches per update (SFT). A stage whose
        updates have varying micro-batch counts (GRPO) says which micro-batch is the last.
        """
        if last is not None:
            self.engine.set_gradient_accumulation_boundary(last)
        # The stage already normalised the loss over every micro-batch of the step: no division by grad_accum.
        self.engine.backward(loss, scale_wrt_gas=False)
        self.engine.step()

    @contextlib.contextmanager
    def gathered_for_generation(self) -> Iterator[torch.nn.Module]:
        """The whole model on every worker, without ZeRO-3's hooks, for the length of the block.

        Generation runs a different number of forwards on each worker (their samples end at different lengths). The
        hooks would gather layers in each of them, and the start-of-forward hook compares the ranks' module orders,
        all collectives; gathered once, the weights serve every decode step with no collective at all.
        """
        module = self.engine.module
        if self.stage != 3:
            yield module
            return
        import deepspeed

        offload = self.engine.optimizer.parameter_offload
        with deepspeed.zero.GatheredParameters(list(module.parameters())):
            start_of_forward = module._forward_pre_hooks[offload.fwd_pre_hook.id]
            offload._remove_module_hooks()  # per-module gathers and releases, and the start-of-forward check
            offload.forward_hooks, offload.backward_hooks = [], []
            try:
                yield module
            finally:  # in the order DeepSpeed first set them up
                offload.fwd_pre_hook = module.register_forward_pre_hook(start_of_forward)
                offload._register_deepspeed_module(module)

    def reset_optimizer_state(self) -> None:
        """Forget AdamW's moments and step counts, as a fresh optimizer would start (DPO: each round)."""
        inner = self.optimizer.optimizer  # the torch AdamW over this worker's fp32 partitions
        inner.state.clear()  # AdamW creates a parameter's state again at its next step

    def grad_norm(self) -> float:
        norm = self.engine.get_global_grad_norm()
        return float(norm) if norm is not None else float("nan")

    def save_state(self, directory: Path) -> None:
        """This worker's shard of weights and optimizer states (every worker calls it, into one shared directory)."""
        self.engine.save_checkpoint(str(directory), tag="state")

    def load_state(self, directory: Path) -> None:
        _, client = self.engine.load_checkpoint(str(directory), tag="state")
        if client is None:
            raise RuntimeError(f"{directory}: DeepSpeed could not load the sharded training state")

    def full_state_dict(self, rank: int) -> dict[str, torch.Tensor] | None:
        """Every weight, unsharded, on rank 0's CPU (None elsewhere). All ranks must call it, in step."""
        import deepspeed

        module = self.engine.module
        keys = set(module.state_dict())  # persistent buffers only; sharded weights show as empty tensors here
        state = {}
        for name, param in module.named_parameters(remove_duplicate=False):  # tied weights under each name
            with deepspeed.zero.GatheredParameters([param], enabled=self.stage == 3):
                if rank == 0:
                    state[name] = param.detach().to("cpu", copy=True)
        if rank == 0:
            state.update({n: b.detach().to("cpu", copy=True) for n, b in module.named_buffers() if n in keys})
        return state if rank == 0 else None

    def close(self) -> None:
        self.engine.destroy()
