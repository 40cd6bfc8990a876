"""A packed training step captured once as a CUDA graph and then replayed: the host issues one call per step.

Why: a packed SFT step of a ~250M-parameter hybrid (8k tokens) keeps the GPU busy ~50 ms, but the host needs ~90 ms
to issue it, most of it the Python and Triton launch overhead of the Mamba kernels' backward
(`bench/bench_sft.py --profile`), so the GPU waits on Python. A replayed graph takes the host out of the step.

The whole step is captured: forward, token-summed loss, backward, gradient clipping and a capturable fused AdamW
update (its learning rate lives in a tensor, see `set_learning_rate`). Shapes must not change between replays, so
each batch is grown to [rows, tokens_per_row] with `pad_packed_batch` (padding segments, no targets: the same loss
and gradients). A batch that does not fit runs eagerly with the same math and is counted in `eager_steps`.

Limits: CUDA only, one process (no DDP) and one micro-batch per optimizer step; the caller checks them.
"""

from __future__ import annotations

import logging
from typing import Callable

import torch

from alignment.packing import pad_packed_batch
from alignment.runtime import to_device
from alignment.varlen_attention import VARLEN_ATTENTION

log = logging.getLogger(__name__)

LossFn = Callable[[torch.nn.Module, dict], torch.Tensor]  # (model, batch on device) -> summed target-token loss


def capturable_adamw(params, lr: float, device: torch.device, **kwargs) -> torch.optim.AdamW:
    """AdamW whose step can be captured: fused kernel, state and learning rate on the device."""
    return torch.optim.AdamW(params, lr=torch.tensor(lr, device=device), fused=True, capturable=True, **kwargs)


def set_learning_rate(optimizer: torch.optim.Optimizer, lr: float) -> None:
    """Set every group's lr, in place when it is a tensor (a captured step reads that tensor on each replay)."""
    for group in optimizer.param_groups:
        if torch.is_tensor(group["lr"]):
            group["lr"].fill_(lr)
        else:
            group["lr"] = lr


class GraphedTrainStep:
    """`step(batch) -> (loss_sum, n_targets, grad_norm)` as device tensors; the optimizer update is included.

    The first `warmup_steps` fitting batches run eagerly on a side stream (Triton autotunes, cuBLAS sets up its
    workspaces), the next one is captured, and every later one is copied into the static inputs and replayed.
    """

    def __init__(
        self,
        model: torch.nn.Module,
        optimizer: torch.optim.Optimizer,
        loss_fn: LossFn,
        *,
        rows: int,
        tokens_per_row: int,
        max_segments: int,
        max_grad_norm: float,
        warmup_steps: int = 3,
    ):
        device = next(model.parameters()).device
        if device.type != "cuda":
            raise ValueError("CUDA graphs need the model on a CUDA device")
        attention = getattr(model.config, "_attn_implementation", None)
        if attention != VARLEN_ATTENTION:
            # The other packed attention paths read segment boundaries back to the host: not capturable.
            raise ValueError(f"CUDA graphs need {VARLEN_ATTENTION!r} attention (bf16/fp16 on CUDA), not {attention!r}")
        if not all(g.get("capturable") and torch.is_tensor(g["lr"]) for g in optimizer.param_groups):
            raise ValueError("CUDA graphs need a capturable optimizer with a tensor lr (see capturable_adamw)")
        self.model, self.optimizer, self.loss_fn = model, optimizer, loss_fn
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.shape = (rows, tokens_per_row, max_segments)
        self.max_grad_norm = max_grad_norm
        self.warmup_steps = warmup_steps
        self.device = device
        self.static: dict | None = None
        self.outputs: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None
        self.graph: torch.cuda.CUDAGraph | None = None
        self.warmed = 0
        self.eager_steps = 0
        self.replayed_steps = 0

    def _step(self, batch: dict, zero_grad: bool = True) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        loss_sum = self.loss_fn(self.model, batch)
        n_targets = batch["loss_mask"][:, 1:].sum()
        (loss_sum / n_targets.clamp(min=1)).backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(self.params, self.max_grad_norm)
        self.optimizer.step()
        if zero_grad:
            self.optimizer.zero_grad(set_to_none=True)
        return loss_sum.detach(), n_targets, grad_norm

    def __call__(self, batch: dict) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        fixed = pad_packed_batch(batch, *self.shape)
        if fixed is None:
            self.eager_steps += 1
            if self.eager_steps == 1:
                log.warning("a batch larger than the captured shape %s runs eagerly (counted in eager_steps)",
                            self.shape)
            # After a capture the parameters' .grad are the graph's output buffers: drop them so that this eager
            # backward starts from zero instead of adding to the last replay's gradients.
            self.optimizer.zero_grad(set_to_none=True)
            return self._step(to_device(batch, self.device))
        if self.static is None:
            self.static = to_device(fixed, self.device)
        else:
            for key, value in fixed.items():
                if torch.is_tensor(value):
                    self.static[key].copy_(value.pin_memory(), non_blocking=True)
        if self.graph is None and self.warmed < self.warmup_steps:
            self.warmed += 1
            return self._warm_up_step()
        if self.graph is None:
            self._capture()
        self.graph.replay()
        self.replayed_steps += 1
        return self.outputs

    def _warm_up_step(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """An eager step on the static inputs, on a side stream as capture requires of the calls before it."""
        side = torch.cuda.Stream(self.device)
        side.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(side):
            result = self._step(self.static)
        torch.cuda.current_stream(self.device).wait_stream(side)
        return result

    def _capture(self) -> None:
        # Gradients are None here, so the captured backward writes (not accumulates) them on each replay.
        self.optimizer.zero_grad(set_to_none=True)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            self.outputs = self._step(self.static, zero_grad=False)
        self.graph = graph
        log.info("training step captured as a CUDA graph: %d rows x %d tokens, up to %d segments", *self.shape)
