"""Varlen attention for packed rows: one flash-attention call over all samples of a batch, no mask tensor.

`alignment.packed_model.segment_sdpa_attention` is correct everywhere but loops over the samples of every row in
Python (one SDPA launch per sample per attention layer, and a host sync to find the boundaries). On CUDA,
PyTorch's `torch.nn.attention.varlen.varlen_attn` runs the flash kernel on the flattened tokens of the whole
batch with the cumulative sample lengths (`cu_seq_lens_q` from `SampleCollator(mode="packed")`), causal inside
each sample, so it costs one launch per layer and O(total tokens) memory.

`varlen_attention_forward` is an attention interface of transformers: it takes the varlen kernel when it
applies (CUDA, fp16/bf16, packed rows, no dropout, no cache) and hands everything else to `segment_sdpa`, which in
turn hands unpacked inputs to transformers' sdpa. `use_varlen_attention(model)` registers it and switches the
model to it where the kernel exists.

The signature of `varlen_attn` changed between PyTorch releases (`is_causal` positional, no GQA or scale; later
`window_size=(-1, 0)` for causal, `enable_gqa`, `scale`); `_call_varlen` adapts to the installed one.
"""

from __future__ import annotations

import functools
import inspect
import logging
from typing import Any, Callable

import torch
from torch import nn
from transformers.masking_utils import AttentionMaskInterface, find_packed_sequence_indices, sdpa_mask
from transformers.modeling_utils import AttentionInterface

from alignment.packed_model import segment_sdpa_attention

logger = logging.getLogger(__name__)

VARLEN_ATTENTION = "packed_varlen"
# Where the flash kernel runs; anything else goes to segment_sdpa.
KERNEL_DEVICE_TYPES = ("cuda",)
KERNEL_DTYPES = (torch.float16, torch.bfloat16)


@functools.lru_cache(maxsize=1)
def varlen_kernel() -> Callable | None:
    """PyTorch's `varlen_attn` if this PyTorch has it and CUDA is available, else None."""
    if not torch.cuda.is_available():
        return None
    try:
        from torch.nn.attention.varlen import varlen_attn
    except ImportError:
        return None
    return varlen_attn


def cu_seqlens_from_segments(seg: torch.Tensor) -> tuple[torch.Tensor, int]:
    """[B, T] segment ids (constant within a sample, changing at each boundary) -> (cu_seqlens [S + 1] int32, max len).

    Segments are numbered over the flattened B * T tokens; a new row always starts a new segment.
    """
    B, T = seg.shape
    starts = torch.ones_like(seg, dtype=torch.bool)
    starts[:, 1:] = seg[:, 1:] != seg[:, :-1]
    begin = starts.flatten().nonzero().flatten()  # [S], first token of each segment
    cu = torch.cat([begin, begin.new_tensor([B * T])]).to(torch.int32)
    return cu, int((cu[1:] - cu[:-1]).max())


def _packed_boundaries(kwargs: dict, B: int, T: int) -> tuple[torch.Tensor, int] | None:
    """Cumulative sample lengths over the flattened batch: the collator's, else derived from seq_idx/position_ids.

    The collator's `cu_seq_lens_q` covers every token of the batch (row tails included). It is trusted without
    reading it back when it lives on the GPU (a read would stall the host once per layer), checked when on the CPU.
    """
    cu, max_len = kwargs.get("cu_seq_lens_q"), kwargs.get("max_length_q")
    if isinstance(cu, torch.Tensor) and cu.ndim == 1 and max_len is not None:
        if cu.is_cuda or int(cu[-1]) == B * T:
            return cu.to(torch.int32), int(max_len)  # the kernel takes int32 boundaries
    seq_idx, position_ids = kwargs.get("seq_idx"), kwargs.get("position_ids")
    if seq_idx is not None and seq_idx.shape[-1] == T:
        seg = seq_idx
    elif position_ids is not None and position_ids.ndim == 2 and position_ids.shape[-1] == T:
        seg = find_packed_sequence_indices(position_ids)
    else:
        seg = None
    return None if seg is None else cu_seqlens_from_segments(seg.expand(B, T))


def _call_varlen(
    kernel: Callable, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu: torch.Tensor, max_len: int, scale: float
) -> torch.Tensor:
    """Causal varlen attention on [N, H, D] q and [N, Hkv, D] k, v with whichever `varlen_attn` signature exists."""
    params = inspect.signature(kernel).parameters
    if "enable_gqa" not in params and k.shape[1] != q.shape[1]:
        k = k.repeat_interleave(q.shape[1] // k.shape[1], dim=1)
        v = v.repeat_interleave(q.shape[1] // v.shape[1], dim=1)
    kwargs: dict[str, Any] = {}
    if "enable_gqa" in params:
        kwargs["enable_gqa"] = k.shape[1] != q.shape[1]
    if "scale" in params:
        kwargs["scale"] = scale
    elif abs(scale - q.shape[-1] ** -0.5) > 1e-12:
        q = q * (scale * q.shape[-1] ** 0.5)  # the kernel applies 1/sqrt(D)
    if "window_size" in params:
        kwargs["window_size"] = (-1, 0)  # causal
    else:
        kwargs["is_causal"] = True
    return kernel(q, k, v, cu, cu, max_len, max_len, **kwargs)


def varlen_attention_forward(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float | None = None,
    dropout: float = 0.0,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """Attention interface for packed rows: one causal varlen flash call over the whole batch.

    Args:
        query: [B, H, T, D]; key, value: [B, Hkv, T, D].

    Returns:
        ([B, T, H, D], None), the layout transformers' attention interfaces return.
    """
    kernel = varlen_kernel()
    B, H, T, D = query.shape
    applies = (
        kernel is not None
        and query.device.type in KERNEL_DEVICE_TYPES
        and query.dtype in KERNEL_DTYPES
        and attention_mask is None
        and key.shape[2] == T
        and getattr(module, "is_causal", True)
        and not (module.training and dropout > 0)
    )
    bounds = _packed_boundaries(kwargs, B, T) if applies else None
    if bounds is None:
        return segment_sdpa_attention(module, query, key, value, attention_mask, scaling, dropout, **kwargs)
    cu, max_len = bounds[0].to(query.device), bounds[1]
    q = query.transpose(1, 2).reshape(B * T, H, D)  # [N, H, D]
    k = key.transpose(1, 2).reshape(B * T, key.shape[1], D)  # [N, Hkv, D]
    v = value.transpose(1, 2).reshape(B * T, value.shape[1], D)
    out = _call_varlen(kernel, q, k, v, cu, max_len, D**-0.5 if scaling is None else scaling)  # [N, H, D]
    return out.view(B, T, H, D), None


def _varlen_mask(**kwargs: Any) -> torch.Tensor | None:
    """Mask builder: no mask when the attention function works from the sample boundaries alone."""
    plain = (
        kwargs.get("attention_mask") is None
        and not kwargs.get("use_vmap", False)
        and kwargs.get("q_length") == kwargs.get("kv_length")
        and not kwargs.get("kv_offset")
    )
    return None if plain else sdpa_mask(**kwargs)


def register_varlen_attention() -> None:
    """Make `attn_implementation="packed_varlen"` known to transformers (idempotent)."""
    AttentionInterface.register(VARLEN_ATTENTION, varlen_attention_forward)
    AttentionMaskInterface.register(VARLEN_ATTENTION, _varlen_mask)


def use_varlen_attention(model: nn.Module) -> bool:
    """Switch `model` to varlen attention for packed rows if the kernel exists here; return whether it did.

    Call after `alignment.packed_model.enable_packed_sequences(model)` (which keeps the Mamba layers apart); inputs
    the kernel cannot take still run correctly through `segment_sdpa` / sdpa.
    """
    if varlen_kernel() is None:
        return False
    register_varlen_attention()
    model.set_attn_implementation(VARLEN_ATTENTION)
    logger.info("packed attention: %s (torch.nn.attention.varlen)", VARLEN_ATTENTION)
    return True
