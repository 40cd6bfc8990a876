"""Make a hybrid Mamba-Transformer model correct (and memory-light) on packed rows.

A packed row keeps its samples apart only if every layer type is told where they start:

- Mamba-2 layers: the causal conv1d and the SSD scan carry state along the row, so they need a per-token
  `seq_idx`. With the CUDA kernels (mamba-ssm + causal-conv1d) transformers hands `seq_idx` (a forward kwarg) to
  them and packing is exact. Without them (CPU), transformers' PyTorch fallback refuses `seq_idx`.
  `enable_packed_sequences` then installs a `seq_idx`-aware reference conv and chunked scan (below) in place of
  the fallback functions, so the same kwarg takes the same route on every device.
- Attention layers: transformers derives a block-diagonal mask from restarting `position_ids`, but only without
  a cache, and as a dense [T, T] mask for sdpa/eager. We register `segment_sdpa`, which runs SDPA per sample
  (causal, no mask tensor), memory O(sum L_i^2) instead of O(T^2).

Why swap module-level functions: the Mamba-2 mixer calls `causal_conv1d_fn`, `mamba2_chunk_scan` and
`mamba2_split_conv1d_scan_combined` by their names in its modeling module. Those names are where transformers
itself plugs in a kernel (`use_kernel_func_from_hub_with_fallback` picks mamba-ssm / causal-conv1d or the
PyTorch function at import; `use_kernelized_func` only tags them for the Hub `kernelize` flow, a no-op without
the `kernels` package). Wrapping those three names is therefore the one hook every code path goes through, and
the wrappers defer to the original function whenever `seq_idx` is absent, so nothing changes for unpacked
forwards. Beneath them `alignment.mamba_kernels` routes each call by device, so that on the CPU the original is
the PyTorch function even where the CUDA kernels are installed. If an upstream change routes around them, the
probe run by `enable_packed_sequences` notices (packed vs. one-by-one outputs disagree) and packing is refused,
never silently wrong.
"""

from __future__ import annotations

import importlib.util
import inspect
import logging
import re
import sys
import weakref
from dataclasses import dataclass
from types import ModuleType
from typing import Any, Callable, Literal

import torch
import torch.nn.functional as F
from torch import nn
from transformers.activations import ACT2FN
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, find_packed_sequence_indices, sdpa_mask
from transformers.modeling_utils import AttentionInterface

from alignment.mamba_kernels import causal_conv1d_takes_stride, route_kernels_by_device

logger = logging.getLogger(__name__)


class PackingNotSupportedError(RuntimeError):
    """Packing this model would mix samples inside a row (recurrent layers without a correct packed path)."""


@dataclass(frozen=True)
class PackedPath:
    """How a model keeps packed samples apart.

    mamba: "none" (no recurrent layers), "cuda-kernels" (seq_idx reaches mamba-ssm / causal-conv1d) or
        "reference-seq_idx" (the PyTorch reference conv and scan of this module).
    attention: "varlen" (torch varlen_attn, CUDA half precision), "segment-sdpa" (per-sample SDPA, no mask tensor), "flash-varlen" (transformers' flash-attention
        varlen path), or "<impl>-dense-mask" (transformers' block-diagonal [T, T] mask, kept on request).
    """

    mamba: str
    attention: str

    def __str__(self) -> str:
        return f"mamba={self.mamba} attention={self.attention}"


# ---------------------------------------------------------------------------------------------------------------
# Which layers are recurrent
# ---------------------------------------------------------------------------------------------------------------

# Layer-type names in transformers configs (`layer_types`, `layers_block_type`) that carry state along a row.
_RECURRENT_LAYER_TYPES = {"linear_attention", "mamba", "mamba2", "conv", "ssm", "recurrent", "rwkv"}
# Class names of recurrent mixers across transformers' hybrid and linear-attention models.
_RECURRENT_CLASS = re.compile(
    r"mamba|ssm|deltanet|gateddelta|linearattention|lightningattention|rwkv|retention|shortconv|hyena|recurrent",
    re.IGNORECASE,
)


def recurrent_modules(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """The outermost submodules that carry state along the sequence (Mamba, SSM, linear attention, short conv).

    A module counts if its class name says so or it owns an `A_log` parameter (every Mamba-style SSM does).
    """
    found: list[tuple[str, nn.Module]] = []
    for name, module in model.named_modules():
        if any(name.startswith(prefix + ".") for prefix, _ in found):
            continue
        if _RECURRENT_CLASS.search(type(module).__name__) or isinstance(getattr(module, "A_log", None), nn.Parameter):
            found.append((name, module))
    return found


def has_recurrent_layers(model: nn.Module) -> bool:
    """True if the model has any layer that carries state along the sequence (by modules or by config)."""
    config = getattr(model, "config", None)
    types = set(getattr(config, "layer_types", None) or []) | set(getattr(config, "layers_block_type", None) or [])
    return bool(types & _RECURRENT_LAYER_TYPES) or bool(recurrent_modules(model))


# ---------------------------------------------------------------------------------------------------------------
# seq_idx-aware reference numerics (the CPU path). fp32 inside, like transformers' reference functions.
# ---------------------------------------------------------------------------------------------------------------


def causal_conv1d_seq_idx(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    seq_idx: torch.Tensor,
    activation: str | None = None,
) -> torch.Tensor:
    """Depthwise causal conv1d that never looks across a `seq_idx` change.

    out[t] = act(bias + sum_k weight[:, k] * x[t - (K-1) + k]), with the tap dropped when token t - (K-1) + k
    belongs to another sample than token t. Equals running each sample alone (zero left padding).

    Args:
        x: [B, C, T] input.
        weight: [C, K] depthwise taps.
        bias: [C] or None.
        seq_idx: [B, T] (or [1, T]) int, sample index of each token.
        activation: name in transformers' ACT2FN ("silu"), or None.

    Returns:
        [B, C, T] in x's dtype.
    """
    T, K = x.shape[-1], weight.shape[-1]
    x_w = x.to(weight.dtype)
    out = torch.zeros_like(x_w) if bias is None else bias[None, :, None].expand_as(x_w).clone()
    for k in range(K):
        shift = K - 1 - k  # tap k reads the token `shift` steps back
        x_shift = F.pad(x_w, (shift, 0))[..., :T]  # [B, C, T]
        same = seq_idx == F.pad(seq_idx, (shift, 0), value=-1)[..., :T]  # [B, T]
        out = out + weight[None, :, k, None] * x_shift * same[:, None, :].to(x_w.dtype)
    if activation is not None:
        out = ACT2FN[activation](out)
    return out.to(x.dtype)


def _segsum(x: torch.Tensor) -> torch.Tensor:
    """[..., L] -> [..., L, L] with out[..., i, j] = sum(x[..., j+1 : i+1]) for j <= i and -inf above the diagonal."""
    L = x.shape[-1]
    x = x[..., None].expand(*x.shape, L)  # [..., L(i), L(j)], column j holds x
    x = x.masked_fill(~torch.tril(torch.ones(L, L, dtype=torch.bool, device=x.device), -1), 0)
    out = torch.cumsum(x, dim=-2)
    return out.masked_fill(~torch.tril(torch.ones(L, L, dtype=torch.bool, device=x.device), 0), -torch.inf)


def mamba2_chunk_scan_seq_idx(
    x: torch.Tensor,
    dt: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    chunk_size: int,
    seq_idx: torch.Tensor,
    D: torch.Tensor | None = None,
    dt_bias: torch.Tensor | None = None,
    initial_states: torch.Tensor | None = None,
    dt_softplus: bool = False,
    dt_limit: tuple[float, float] = (0.0, float("inf")),
    return_final_states: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Chunked SSD scan (Mamba-2) whose state resets wherever `seq_idx` changes.

    The chunked algorithm (as in transformers' `mamba2_chunk_scan`) has three places where a state crosses
    tokens, and each gets a mask:
      1. inside a chunk, token s feeds token l only if both belong to the same sample;
      2. a chunk's end state only collects tokens of the sample the chunk ends in;
      3. a state passes from the end of chunk j-1 to the start of chunk i only if the same sample owns both
         points (samples are contiguous, so it then owns everything between), and a chunk's tokens read their
         start state only if they belong to that sample.
    `initial_states` belongs to the sample of token 0. The final state is that of the last token's sample.

    Args (b batch, t tokens, h heads, p head dim, g groups, n state size):
        x: [b, t, h, p]; dt: [b, t, h]; A: [h]; B, C: [b, t, g, n]; seq_idx: [b, t] (or [1, t]) int.
        D: [h] skip; dt_bias: [h]; initial_states: [b, h, p, n]; the rest as in mamba-ssm.

    Returns:
        y [b, t, h, p] (fp32), and the final state [b, h, p, n] when `return_final_states`.
    """
    b, t, h, p = x.shape
    g = B.shape[2]
    if dt_bias is not None:
        dt = dt + dt_bias.to(dt.dtype)
    if dt_softplus:
        dt = F.softplus(dt)
    dt = torch.clamp(dt, min=dt_limit[0], max=dt_limit[1]).float()
    x = x.float()
    B = B.float().repeat_interleave(h // g, dim=2)  # [b, t, h, n]
    C = C.float().repeat_interleave(h // g, dim=2)
    seq = seq_idx.expand(b, t)

    # Pad t to a multiple of the chunk. Padded steps have dt = 0 (no decay, no input) and extend the last sample,
    # so they leave its state untouched.
    pad = (-t) % chunk_size
    y_skip = None if D is None else D[:, None] * x  # [b, t, h, p]
    x = F.pad(x * dt[..., None], (0, 0, 0, 0, 0, pad))  # [b, t', h, p], discretized input
    A = F.pad(A.float() * dt, (0, 0, 0, pad))  # [b, t', h], log-decay per step
    B = F.pad(B, (0, 0, 0, 0, 0, pad))
    C = F.pad(C, (0, 0, 0, 0, 0, pad))
    seq = torch.cat([seq, seq[:, -1:].expand(b, pad)], dim=1)  # [b, t']

    c, L = (t + pad) // chunk_size, chunk_size
    x = x.reshape(b, c, L, h, p)
    B = B.reshape(b, c, L, h, -1)  # [b, c, L, h, n]
    C = C.reshape(b, c, L, h, -1)
    seq = seq.reshape(b, c, L)
    A = A.reshape(b, c, L, h).permute(0, 3, 1, 2)  # [b, h, c, L]
    A_cumsum = torch.cumsum(A, dim=-1)  # [b, h, c, L]

    # 1. intra-chunk (diagonal blocks): y[l] = sum_{s <= l, same sample} C[l].B[s] exp(A(s, l]) x[s], with the
    #    log-decay A(s, l] = A_cumsum[l] - A_cumsum[s] as mamba-ssm's chunk-scan kernel computes it.
    causal = torch.tril(torch.ones(L, L, dtype=torch.bool, device=x.device))
    attends = (seq[:, :, :, None] == seq[:, :, None, :]) & causal  # [b, c, L(l), L(s)]
    log_decay = A_cumsum[..., :, None] - A_cumsum[..., None, :]  # [b, h, c, L(l), L(s)]
    decay_ls = torch.exp(log_decay.masked_fill(~attends[:, None], -torch.inf))  # [b, h, c, L, L]
    scores = torch.einsum("bclhn,bcshn->bhcls", C, B) * decay_ls  # [b, h, c, L, L]
    y_diag = torch.einsum("bhcls,bcshp->bclhp", scores, x)  # [b, c, L, h, p]

    # 2. end state of each chunk, from the tokens of the sample the chunk ends in
    owns_end = (seq == seq[:, :, -1:])[:, None].float()  # [b, 1, c, L]
    decay_to_end = torch.exp(A_cumsum[..., -1:] - A_cumsum) * owns_end  # [b, h, c, L]
    states = torch.einsum("bclhn,bhcl,bclhp->bchpn", B, decay_to_end, x)  # [b, c, h, p, n]

    # 3. pass states between chunks. Point j = end of chunk j-1 (point 0: the start, owned by token 0's sample).
    if initial_states is None:
        initial_states = torch.zeros_like(states[:, 0])
    states = torch.cat([initial_states[:, None].float(), states], dim=1)  # [b, c+1, h, p, n]
    point_owner = torch.cat([seq[:, :1, 0], seq[:, :, -1]], dim=1)  # [b, c+1]
    same_ij = point_owner[:, :, None] == point_owner[:, None, :]  # [b, c+1(i), c+1(j)]
    chunk_decay = _segsum(F.pad(A_cumsum[..., -1], (1, 0)))  # [b, h, c+1, c+1], log-decay from point j to i
    chunk_decay = torch.exp(chunk_decay.masked_fill(~same_ij[:, None], -torch.inf))
    states = torch.einsum("bhij,bjhpn->bihpn", chunk_decay, states)  # [b, c+1, h, p, n]
    start_states, final_state = states[:, :-1], states[:, -1]

    # 4. tokens read their chunk's start state if their sample owns it
    owns_start = (seq == point_owner[:, :-1, None]).float()  # [b, c, L]
    decay_from_start = torch.exp(A_cumsum).permute(0, 2, 3, 1) * owns_start[..., None]  # [b, c, L, h]
    y_off = torch.einsum("bclhn,bchpn->bclhp", C, start_states) * decay_from_start[..., None]

    y = (y_diag + y_off).reshape(b, c * L, h, p)[:, :t]
    if y_skip is not None:
        y = y + y_skip
    return (y, final_state) if return_final_states else y


# ---------------------------------------------------------------------------------------------------------------
# Installing the reference path: wrap the three names the Mamba-2 mixer calls
# ---------------------------------------------------------------------------------------------------------------


def _conv_override(original: Callable) -> Callable:
    def causal_conv1d_fn(hidden_states, weight, bias=None, activation=None, seq_idx=None, **kwargs):
        if seq_idx is None:
            return original(hidden_states, weight, bias, activation=activation, **kwargs)
        return causal_conv1d_seq_idx(hidden_states, weight, bias, seq_idx, activation)

    return causal_conv1d_fn


def _scan_override(original: Callable) -> Callable:
    params = set(inspect.signature(mamba2_chunk_scan_seq_idx).parameters)

    def mamba2_chunk_scan(*args, seq_idx=None, **kwargs):
        if seq_idx is None:
            return original(*args, **kwargs)
        kwargs = {k: v for k, v in kwargs.items() if k in params}  # drops z=None and unrelated forward kwargs
        return mamba2_chunk_scan_seq_idx(*args, seq_idx=seq_idx, **kwargs)

    return mamba2_chunk_scan


def _fused_override(original: Callable) -> Callable:
    def mamba2_split_conv1d_scan_combined(*args, seq_idx=None, **kwargs):
        if seq_idx is None:
            return original(*args, **kwargs)
        return None  # None sends the mixer down its unfused path, i.e. to the two overrides above

    return mamba2_split_conv1d_scan_combined


_OVERRIDES: dict[str, Callable[[Callable], Callable]] = {
    "causal_conv1d_fn": _conv_override,
    "mamba2_chunk_scan": _scan_override,
    "mamba2_split_conv1d_scan_combined": _fused_override,
}
_INSTALLED_FLAG = "_seq_idx_reference_installed"


def _modeling_module(mixer: nn.Module) -> ModuleType:
    return sys.modules[type(mixer).__module__]


def _reference_path_applies(mixer: nn.Module) -> bool:
    """The mixer's modeling module calls the three overridable functions and its forward passes kwargs on."""
    module = _modeling_module(mixer)
    takes_kwargs = any(
        p.kind is inspect.Parameter.VAR_KEYWORD for p in inspect.signature(type(mixer).forward).parameters.values()
    )
    return takes_kwargs and all(callable(getattr(module, name, None)) for name in _OVERRIDES)


def _install_reference_path(module: ModuleType) -> None:
    if getattr(module, _INSTALLED_FLAG, False):
        return
    for name, make in _OVERRIDES.items():
        original = getattr(module, name)
        override = make(original)
        override.__wrapped__ = original  # alignment.mamba_kernels follows it to transformers' kernel binding
        setattr(module, name, override)
    setattr(module, _INSTALLED_FLAG, True)


def _cuda_kernels_available() -> bool:
    return all(importlib.util.find_spec(name) is not None for name in ("mamba_ssm", "causal_conv1d"))


# ---------------------------------------------------------------------------------------------------------------
# Attention: per-sample SDPA, no [T, T] mask
# ---------------------------------------------------------------------------------------------------------------

SEGMENT_SDPA = "segment_sdpa"


def _segment_ids(kwargs: dict, T: int) -> torch.Tensor | None:
    """[B, T] sample ids of a packed batch from `seq_idx`, else from restarting `position_ids`; None if unpacked."""
    seq_idx = kwargs.get("seq_idx")
    if seq_idx is not None and seq_idx.shape[-1] == T:
        return seq_idx
    position_ids = kwargs.get("position_ids")
    if position_ids is not None and position_ids.shape[-1] == T and position_ids.ndim == 2:
        return find_packed_sequence_indices(position_ids)
    return None


def _runs(ids: torch.Tensor) -> list[tuple[int, int]]:
    """[T] ids -> [(start, end)] of each run of equal values."""
    cuts = ((ids[1:] != ids[:-1]).nonzero().flatten() + 1).tolist()
    return list(zip([0] + cuts, cuts + [ids.shape[0]]))


def segment_sdpa_attention(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float | None = None,
    dropout: float = 0.0,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """Attention interface for packed rows: SDPA on each sample of each row (causal as the module), no mask tensor.

    Unpacked inputs (a padding mask, a cache, no restarts) go to transformers' sdpa unchanged.

    Args:
        query: [B, H, T, D]; key, value: [B, Hkv, T, D].

    Returns:
        ([B, T, H, D], None), the layout transformers' attention interfaces return.
    """
    T = query.shape[2]
    seg = _segment_ids(kwargs, T) if attention_mask is None and key.shape[2] == T else None
    if seg is None:
        return sdpa_attention_forward(
            module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs
        )
    seg = seg.expand(query.shape[0], T)
    gqa = key.shape[1] != query.shape[1]
    causal = getattr(module, "is_causal", True)
    p = dropout if module.training else 0.0
    rows = []
    # unbind and split, not slicing: their backward is one stack / cat, where each slice's backward would write
    # into a zero tensor of the whole input's size.
    for r, (q_row, k_row, v_row) in enumerate(zip(query.unbind(0), key.unbind(0), value.unbind(0))):  # [H, T, D]
        sizes = [e - s for s, e in _runs(seg[r])]
        parts = [
            F.scaled_dot_product_attention(
                q[None], k[None], v[None], dropout_p=p, is_causal=causal, scale=scaling, enable_gqa=gqa,
            )[0]  # [H, L, D]
            for q, k, v in zip(q_row.split(sizes, dim=1), k_row.split(sizes, dim=1), v_row.split(sizes, dim=1))
        ]
        rows.append(torch.cat(parts, dim=1))
    return torch.stack(rows).transpose(1, 2).contiguous(), None


def _segment_sdpa_mask(**kwargs: Any) -> torch.Tensor | None:
    """Mask builder for `segment_sdpa`: no mask when the attention function can work from the segments alone."""
    plain = (
        kwargs.get("attention_mask") is None
        and not kwargs.get("use_vmap", False)  # custom mask functions (or/and masks) need the real mask
        and kwargs.get("q_length") == kwargs.get("kv_length")
        and not kwargs.get("kv_offset")
    )
    return None if plain else sdpa_mask(**kwargs)


def _register_segment_sdpa() -> None:
    AttentionInterface.register(SEGMENT_SDPA, segment_sdpa_attention)
    AttentionMaskInterface.register(SEGMENT_SDPA, _segment_sdpa_mask)


def _choose_attention(model: nn.Module, attention: Literal["auto", "keep"]) -> str:
    impl = getattr(getattr(model, "config", None), "_attn_implementation", None) or "eager"
    if impl.startswith("flash_attention") or "/" in impl:
        return "flash-varlen"  # transformers' flash path already runs varlen from position_ids / cu_seq_lens
    if impl == SEGMENT_SDPA:
        return "segment-sdpa"
    if attention == "keep":
        return f"{impl}-dense-mask"
    from alignment.varlen_attention import VARLEN_ATTENTION, use_varlen_attention  # imports this module

    # PyTorch's varlen kernel (CUDA, half precision) runs a whole packed row in one call per layer: 1.26x faster
    # than per-sample SDPA on an H100 (bench/bench_sft.py).
    on_gpu_half = any(p.is_cuda and p.dtype in (torch.bfloat16, torch.float16) for p in model.parameters())
    if impl == VARLEN_ATTENTION or (on_gpu_half and use_varlen_attention(model)):
        return "varlen"
    _register_segment_sdpa()
    model.set_attn_implementation(SEGMENT_SDPA)
    return "segment-sdpa"


# ---------------------------------------------------------------------------------------------------------------
# Forward pre-hook: every packed forward carries seq_idx and runs without a cache
# ---------------------------------------------------------------------------------------------------------------


def _packed_forward_pre_hook(module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
    cache = kwargs.get("cache", kwargs.get("past_key_values"))  # transformers 5.2x renamed the argument
    if kwargs.get("seq_idx") is None and kwargs.get("attention_mask") is None and cache is None:
        position_ids = kwargs.get("position_ids")
        if isinstance(position_ids, torch.Tensor) and position_ids.ndim == 2 and position_ids.shape[-1] > 1:
            # Same rule transformers uses for attention, so the Mamba layers split the row the same way.
            seg = find_packed_sequence_indices(position_ids)
            if seg is not None:
                kwargs["seq_idx"] = seg.to(torch.int32)
    if kwargs.get("seq_idx") is not None:
        # With a cache, transformers skips packed-sequence detection and attention would span the whole row.
        kwargs["use_cache"] = False
    return args, kwargs


def _backbone(model: nn.Module) -> nn.Module:
    """The module that owns the decoder layers (under PEFT and causal-LM heads alike)."""
    for module in model.modules():
        if isinstance(getattr(module, "layers", None), nn.ModuleList):
            return module
    return model


# ---------------------------------------------------------------------------------------------------------------
# Public entry points
# ---------------------------------------------------------------------------------------------------------------

_ENABLED: "weakref.WeakKeyDictionary[nn.Module, PackedPath]" = weakref.WeakKeyDictionary()
_HOOKED: "weakref.WeakSet[nn.Module]" = weakref.WeakSet()


def _mamba_path(model: nn.Module, mixers: list[tuple[str, nn.Module]]) -> str:
    if not mixers:
        return "none"
    on_cuda = any(p.is_cuda for p in model.parameters())
    why_not_kernels = "the model is on CPU"
    if on_cuda and not _cuda_kernels_available():
        why_not_kernels = "mamba-ssm and causal-conv1d are not installed"
    elif on_cuda:
        misaligned = sorted({f"{type(m).__name__} ({m.in_proj.out_features})" for _, m in mixers
                             if not _kernels_take_seq_idx(m)})
        if not misaligned:
            return "cuda-kernels"
        why_not_kernels = (f"causal-conv1d takes sample boundaries only when the Mamba in_proj width is a multiple "
                           f"of 8 (mamba_num_heads a multiple of 8), and here it is {', '.join(misaligned)}")
        logger.warning("packed rows: %s; the PyTorch reference conv and scan run for packed rows instead", why_not_kernels)
    unsupported = sorted({type(m).__name__ for _, m in mixers if not _reference_path_applies(m)})
    if unsupported:
        raise PackingNotSupportedError(
            f"{type(model).__name__} has recurrent layers ({', '.join(unsupported)}) with no correct packed path "
            f"here: {why_not_kernels} and no seq_idx-aware reference exists for them. "
            "Use SampleCollator(mode='padded')."
        )
    return "reference-seq_idx"


def _kernels_take_seq_idx(mixer: nn.Module) -> bool:
    """Whether causal-conv1d accepts this mixer's packed rows: with `seq_idx` its input is always the channel-last
    view into the in_proj output, whose stride is the in_proj width (`mamba_kernels.causal_conv1d_takes_stride`)."""
    width = getattr(getattr(mixer, "in_proj", None), "out_features", None)
    return width is None or causal_conv1d_takes_stride(width)


@torch.no_grad()
def _probe(mixer: nn.Module) -> float:
    """Max relative difference between a packed row and its samples run one by one, through one mixer.

    The row mixes a 2-token sample (shorter than the conv), one that crosses a chunk boundary and a short tail
    sample; eval and training modes are both run because they take different branches (unfused vs fused).
    """
    weight = next(mixer.parameters())
    hidden = mixer.in_proj.in_features if hasattr(mixer, "in_proj") else mixer.hidden_size
    chunk = int(getattr(mixer, "chunk_size", 8))
    lengths = [2, chunk + 3, 3]
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, sum(lengths), hidden, generator=g).to(weight.device, weight.dtype)
    seq_idx = torch.repeat_interleave(torch.arange(len(lengths)), torch.tensor(lengths))[None]
    seq_idx = seq_idx.to(device=weight.device, dtype=torch.int32)
    flags = [m.training for m in mixer.modules()]
    worst = 0.0
    try:
        for training in (False, True):
            mixer.train(training)
            packed = mixer(x, seq_idx=seq_idx)
            alone = torch.cat([mixer(part) for part in x.split(lengths, dim=1)], dim=1)
            err = (packed.float() - alone.float()).abs().max() / alone.float().abs().max().clamp_min(1e-6)
            worst = max(worst, err.item())
    finally:
        for m, flag in zip(mixer.modules(), flags):
            m.training = flag
    return worst


def enable_packed_sequences(
    model: nn.Module, attention: Literal["auto", "keep"] = "auto", verify: bool = True
) -> PackedPath:
    """Make `model` correct on packed rows from `SampleCollator(mode="packed")`; return and log the path used.

    - Mamba-2 layers: "cuda-kernels" when the model is on CUDA and mamba-ssm + causal-conv1d are installed
      (seq_idx reaches them as a forward kwarg), else "reference-seq_idx" (the reference conv and scan above).
      Recurrent layers with neither raise `PackingNotSupportedError`.
    - Attention: with `attention="auto"`, flash-attention models keep their varlen path, others switch to
      `segment_sdpa`; `attention="keep"` leaves the implementation alone (transformers' dense block mask).
    - A forward pre-hook on the backbone turns the cache off for packed forwards, and derives `seq_idx` from
      restarting `position_ids` when a caller passes only those (the rule transformers uses for attention).
    - `verify` runs one packed row through one mixer of each class against its samples run alone and raises
      if they disagree, so an upstream change that bypasses the hook cannot go unnoticed. Turn it off only for
      models whose parameters are not materialized on this rank (e.g. sharded before the first forward).

    Safe to call twice. Forwards without `seq_idx` (generation, padded batches) are unchanged.
    """
    route_kernels_by_device(model)  # beneath the overrides: unpacked calls on the CPU must not reach CUDA kernels
    mixers = recurrent_modules(model)
    if not mixers and has_recurrent_layers(model):
        raise PackingNotSupportedError(f"{type(model).__name__}: config lists recurrent layers but none was found")
    mamba = _mamba_path(model, mixers)
    if mamba == "reference-seq_idx":
        for module in {_modeling_module(m) for _, m in mixers}:
            _install_reference_path(module)
    backbone = _backbone(model)
    if backbone not in _HOOKED:
        backbone.register_forward_pre_hook(_packed_forward_pre_hook, with_kwargs=True)
        _HOOKED.add(backbone)
    path = PackedPath(mamba=mamba, attention=_choose_attention(model, attention))

    if verify and mixers:
        tol = 1e-3 if next(model.parameters()).dtype == torch.float32 else 5e-2
        for cls in {type(m) for _, m in mixers}:
            mixer = next(m for _, m in mixers if type(m) is cls)
            try:
                err = _probe(mixer)
            except Exception as e:  # a mixer that rejects seq_idx or breaks on it has no packed path
                raise PackingNotSupportedError(f"{cls.__name__} fails on a packed row: {e}") from e
            if not err <= tol:
                raise PackingNotSupportedError(
                    f"{cls.__name__}: a packed row differs from its samples run alone (max rel. error {err:.2e} > "
                    f"{tol:g}) on the {mamba} path; seq_idx does not reach the conv/scan in this transformers "
                    "version. Use SampleCollator(mode='padded')."
                )
    _ENABLED[model] = path
    logger.info("packed sequences: %s", path)
    return path


def check_packing_supported(model: nn.Module) -> PackedPath:
    """Return the packed path of `model`, or raise `PackingNotSupportedError` if packing it would mix samples.

    Models without recurrent layers are fine with `position_ids` alone (attention path as configured).
    Models with recurrent layers must have gone through `enable_packed_sequences`.
    """
    if model in _ENABLED:
        return _ENABLED[model]
    if not has_recurrent_layers(model):
        return PackedPath(mamba="none", attention=_choose_attention(model, "keep"))
    names = sorted({type(m).__name__ for _, m in recurrent_modules(model)}) or ["recurrent layers in config"]
    try:
        _mamba_path(model, recurrent_modules(model))
        hint = "call alignment.packed_model.enable_packed_sequences(model) before packing"
    except PackingNotSupportedError as e:
        hint = str(e)
    raise PackingNotSupportedError(
        f"{type(model).__name__} has recurrent layers ({', '.join(names)}): position_ids alone let their state "
        f"run from one sample into the next. {hint}."
    )


def guard_trl_config(model: nn.Module, trl_args: Any) -> None:
    """Refuse TRL's own `padding_free` / `packing` for a model with recurrent layers.

    TRL's packing strategies either concatenate samples with no boundary at all ("wrapped") or rely on the
    model getting every boundary right by itself; for hybrids this project packs with `SampleCollator` and
    `enable_packed_sequences` instead, which are tested to match per-sample losses and gradients.
    """
    on = [name for name in ("padding_free", "packing") if getattr(trl_args, name, False)]
    if on and has_recurrent_layers(model):
        raise PackingNotSupportedError(
            f"TRL option(s) {', '.join(f'{n}=True' for n in on)} on {type(model).__name__}, which has recurrent "
            "(Mamba/SSM) layers. Set them to False and pack with alignment.packing.SampleCollator(mode='packed') "
            "after alignment.packed_model.enable_packed_sequences(model)."
        )
