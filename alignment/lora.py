"""LoRA through peft, with default targets that reach every kind of block of a hybrid (shared by SFT, DPO, GRPO)."""

from __future__ import annotations

import logging
import sys
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from alignment.config import option
from alignment.mamba_kernels import FUSED_TRAINING_KERNEL

log = logging.getLogger(__name__)

COMPUTE_DTYPES = {
    "model": "adapter matmuls in the model's dtype (the small adapter weights are cast, not the activations)",
    "float32": "peft's way: every adapter's input cast to float32 and its matmuls run in float32",
}


@dataclass
class LoraConfig:
    """LoRA through peft. The default targets reach every kind of block of a hybrid."""

    enabled: bool = option(False, "Train LoRA adapters instead of all weights.")
    r: int = option(16, "Adapter rank.")
    alpha: int = option(32, "Adapter scaling numerator (scale = alpha / r).")
    dropout: float = option(0.0, "Dropout on the adapter input.")
    compute_dtype: str = option(
        "model", "Adapter weights and AdamW states stay float32 either way. model: the adapter matmuls run in the "
        "model's dtype, casting the small weights; float32: peft's default, casting every activation to float32.",
    )
    # Mamba `out_proj` is left out: the fused Mamba kernel reads its weight directly and bypasses adapters.
    target_modules: list = option(
        ["in_proj", "q_proj", "k_proj", "v_proj", "o_proj", "up_proj", "down_proj"],
        "Module names to adapt: Mamba in_proj, attention q/k/v/o, MLP up/down.",
    )

    def validate(self) -> None:
        if self.compute_dtype not in COMPUTE_DTYPES:
            raise ValueError(f"compute_dtype must be one of {list(COMPUTE_DTYPES)}, got {self.compute_dtype!r}")


class InputDtypeLinear(nn.Linear):
    """A Linear whose float32 weights are cast to the input's dtype for the product.

    peft casts each adapter's input to the adapter's float32 weights instead: at 9B that is a [tokens, hidden] copy
    in and out of every adapted projection, forward and backward (16% of a step's GPU time in the profile in the
    README). Casting the [r, hidden] weights costs nothing, and their gradients still arrive in float32.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bias = None if self.bias is None else self.bias.to(x.dtype)
        return F.linear(x, self.weight.to(x.dtype), bias)


def compute_adapters_in_input_dtype(model: nn.Module) -> int:
    """Make every LoRA layer of a peft model run its adapters in its input's dtype; returns the layers changed."""
    from peft.tuners.lora import LoraLayer

    changed = 0
    for module in model.modules():
        if isinstance(module, LoraLayer):
            module.cast_input_dtype_enabled = False
            for linear in [*module.lora_A.values(), *module.lora_B.values()]:
                if type(linear) is nn.Linear:
                    linear.__class__ = InputDtypeLinear
            changed += 1
    return changed


def fused_kernel_projections(model: nn.Module, targets: list[str]) -> list[str]:
    """Targets that are the out_proj of a Mamba-2 mixer, whose fused training kernel reads the weight directly."""
    if "out_proj" not in targets:
        return []
    return [f"{name}.out_proj" for name, module in model.named_modules()
            if isinstance(getattr(module, "out_proj", None), nn.Linear)
            and hasattr(sys.modules.get(type(module).__module__), FUSED_TRAINING_KERNEL)]


def apply_lora(model, config: LoraConfig):
    from peft import LoraConfig as PeftLoraConfig, get_peft_model

    present = {name.split(".")[-1] for name, _ in model.named_modules()}
    targets = [t for t in config.target_modules if t in present]
    if not targets:
        raise ValueError(f"lora.target_modules {config.target_modules} match no module of this model")
    if bypassed := fused_kernel_projections(model, targets):
        raise ValueError(
            f"lora.target_modules has out_proj, the Mamba-2 mixers' output projection ({bypassed[0]} and "
            f"{len(bypassed) - 1} more): the fused training kernel reads its base weight directly, so an adapter there "
            "would train on the CPU and be skipped on the GPU. Leave out_proj out (in_proj adapts every Mamba block)."
        )
    peft_config = PeftLoraConfig(
        r=config.r, lora_alpha=config.alpha, lora_dropout=config.dropout, target_modules=targets, task_type="CAUSAL_LM"
    )
    model = get_peft_model(model, peft_config)
    if config.compute_dtype == "model":
        compute_adapters_in_input_dtype(model)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    log.info("LoRA on %s: %.2fM trainable parameters; %s", targets, trainable / 1e6, COMPUTE_DTYPES[config.compute_dtype])
    return model
