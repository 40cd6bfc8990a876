"""Activation checkpointing of the decoder blocks, shared by the SFT, DPO and GRPO learners.

Without it the 9B hybrid keeps ~5 MB of activations per token for backward; with it each decoder block keeps only
its input and runs its forward again in backward, which costs about one more forward per step. transformers does the
work (`GradientCheckpointingLayer`, which NemotronH's blocks are); this module switches it on the same way for a
plain or a peft model, non-reentrant: it needs no input that requires grad, so frozen embeddings under LoRA are fine,
and it passes the packed-row kwargs (`seq_idx`, `position_ids`, the varlen boundaries) through to the recompute.
Blocks checkpoint only in training mode with gradients on: generation and no-grad reference passes are unchanged.
"""

from __future__ import annotations

from transformers.modeling_layers import GradientCheckpointingLayer


def enable_activation_checkpointing(model) -> int:
    """Checkpoint every decoder block of `model` (a transformers model or a peft wrapper); returns their number."""
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    if not getattr(inner, "supports_gradient_checkpointing", False):
        raise ValueError(f"{type(inner).__name__} does not support activation checkpointing "
                         "(set train.activation_checkpointing=false)")
    kwargs = {"use_reentrant": False}
    if hasattr(inner, "activation_checkpointing_enable"):  # newer transformers; the old name is a deprecated alias
        inner.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        inner.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    blocks = checkpointed_blocks(inner)
    if not blocks:
        raise ValueError(f"{type(inner).__name__}: no decoder block was set to checkpoint")
    return blocks


def checkpointed_blocks(model) -> int:
    """How many decoder blocks of `model` recompute their forward in backward."""
    return sum(isinstance(m, GradientCheckpointingLayer) and m.gradient_checkpointing for m in model.modules())


def activation_checkpointing_status(model) -> str:
    """What the logs say: `on (N decoder blocks)` or `off`."""
    blocks = checkpointed_blocks(model)
    return f"on ({blocks} decoder blocks)" if blocks else "off"
