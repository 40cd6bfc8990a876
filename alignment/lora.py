"""LoRA through peft, with default targets that reach every kind of block of a hybrid (shared by SFT, DPO, GRPO)."""

from __future__ import annotations

import logging
from dataclasses import dataclass

from alignment.config import option

log = logging.getLogger(__name__)


@dataclass
class LoraConfig:
    """LoRA through peft. The default targets reach every kind of block of a hybrid."""

    enabled: bool = option(False, "Train LoRA adapters instead of all weights.")
    r: int = option(16, "Adapter rank.")
    alpha: int = option(32, "Adapter scaling numerator (scale = alpha / r).")
    dropout: float = option(0.0, "Dropout on the adapter input.")
    adapter_dtype: str = option(
        "float32", "float32 (peft's default: adapter weights, their matmuls and AdamW updates in float32) or model "
        "(the model's dtype: no casts around every adapter, but bf16 weights round small updates away).",
    )
    # Mamba `out_proj` is left out: the fused Mamba kernel reads its weight directly and bypasses adapters.
    target_modules: list = option(
        ["in_proj", "q_proj", "k_proj", "v_proj", "o_proj", "up_proj", "down_proj"],
        "Module names to adapt: Mamba in_proj, attention q/k/v/o, MLP up/down.",
    )

    def validate(self) -> None:
        if self.adapter_dtype not in ("float32", "model"):
            raise ValueError(f"adapter_dtype must be float32 or model, got {self.adapter_dtype!r}")


def apply_lora(model, config: LoraConfig):
    from peft import LoraConfig as PeftLoraConfig, get_peft_model

    present = {name.split(".")[-1] for name, _ in model.named_modules()}
    targets = [t for t in config.target_modules if t in present]
    if not targets:
        raise ValueError(f"lora.target_modules {config.target_modules} match no module of this model")
    peft_config = PeftLoraConfig(
        r=config.r, lora_alpha=config.alpha, lora_dropout=config.dropout, target_modules=targets, task_type="CAUSAL_LM"
    )
    model = get_peft_model(model, peft_config, autocast_adapter_dtype=config.adapter_dtype == "float32")
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    log.info("LoRA on %s: %.2fM trainable parameters in %s", targets, trainable / 1e6,
             next(p.dtype for p in model.parameters() if p.requires_grad))
    return model
