"""The Mamba-2 SSM state's one-token update of a decode step, as one Triton kernel with large tiles (CUDA).

Why: at decode batch sizes the state update is most of a hybrid's step (Nano-9B-v2, batch 256: 35.4M state values
per sequence, read and written every step). mamba-ssm's `selective_state_update` gives each Triton program 4 rows
of the head dimension (dstate 128: 512 state values), so a step launches batch x heads x head_dim / 4 programs and
is bound by their count, not by memory: a bf16 state has half the bytes of a float32 one but takes as long (H200,
Nano-9B-v2's layer at batch 256: 738 us against 790 us, 38% of the HBM bandwidth). Here a program updates a whole
head, `BLOCK_P` rows at a time (autotuned per shape and dtype) over all `dstate` columns, with the head's scalars
(dt, A, D) loaded once: 355 us for the bf16 state, 79% of the bandwidth (`bench/bench_ssm_step.py`).

The static decoder (alignment/rollout/static_decode.py) calls `ssm_step` for a CUDA state kept in the model's dtype
(`ssm_state_dtype: model`). A float32 state keeps the mixer's own function (mamba-ssm's kernel): there the kernel
alone was 1.1x faster, but a whole batch-64 rollout with it was not (16.3 against 13.8 ms per step, two runs).

The case handled is the one NemotronH's decode calls: A, dt and dt_bias shared across a head's dimension (one scalar
per head), softplus on dt, no gate z (the mixer's gated norm applies it), D present. `ssm_step_reference` is the same
arithmetic in PyTorch; `tests/test_ssm_step.py` checks the kernel against it and against mamba-ssm's kernel on a
GPU, and the reference against the mixer's PyTorch function on the CPU.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

try:
    import triton
    import triton.language as tl
except ImportError:  # the CPU install: the reference path only
    triton = None


def ssm_step_reference(state: torch.Tensor, x: torch.Tensor, dt: torch.Tensor, a: torch.Tensor, b: torch.Tensor,
                       c: torch.Tensor, d: torch.Tensor, dt_bias: torch.Tensor) -> torch.Tensor:
    """One token through the SSM, state updated in place (float32 arithmetic); returns y [B, H, P] in x's dtype.

    state [B, H, P, N] (any float dtype), x [B, H, P], dt [B, H] (before softplus and bias), a [H] (negative),
    b and c [B, G, N] (head h reads group h // (H / G)), d [H], dt_bias [H].
    """
    heads, groups = x.shape[1], b.shape[1]
    step = F.softplus(dt.float() + dt_bias.float())  # [B, H]
    decay = torch.exp(step * a.float())  # [B, H]
    b_heads = b.float().repeat_interleave(heads // groups, dim=1)  # [B, H, N]
    c_heads = c.float().repeat_interleave(heads // groups, dim=1)
    new = state.float() * decay[..., None, None] + (step[..., None] * x.float())[..., None] * b_heads[:, :, None, :]
    state.copy_(new)
    y = (new * c_heads[:, :, None, :]).sum(-1) + d.float()[:, None] * x.float()
    return y.to(x.dtype)


def ssm_step_available(device: torch.device) -> bool:
    """Whether `ssm_step` runs the kernel for states on `device` (CUDA, with Triton installed)."""
    return triton is not None and device.type == "cuda"


def ssm_step_chosen(device: torch.device, state_dtype: torch.dtype) -> bool:
    """Whether the static decoder takes `ssm_step` for a state on `device` in `state_dtype`: CUDA, below float32."""
    return ssm_step_available(device) and state_dtype != torch.float32


def ssm_step(state: torch.Tensor, x: torch.Tensor, dt: torch.Tensor, a: torch.Tensor, b: torch.Tensor,
             c: torch.Tensor, d: torch.Tensor, dt_bias: torch.Tensor) -> torch.Tensor:
    """`ssm_step_reference` on the kernel for CUDA tensors (the reference elsewhere). Shapes as there."""
    if not ssm_step_available(state.device):
        return ssm_step_reference(state, x, dt, a, b, c, d, dt_bias)
    batch, heads, head_dim, dstate = state.shape
    groups = b.shape[1]
    if heads % groups or b.shape != c.shape or x.shape != (batch, heads, head_dim) or dt.shape != (batch, heads):
        raise ValueError(f"ssm_step: state {tuple(state.shape)}, x {tuple(x.shape)}, dt {tuple(dt.shape)}, "
                         f"b {tuple(b.shape)}, c {tuple(c.shape)} do not fit together")
    if state.stride(-1) != 1:
        raise ValueError("ssm_step: the state's last dimension must be contiguous")
    y = torch.empty_like(x)
    grid = (batch, heads)
    _kernel()[grid](
        state, x, dt, a, b, c, d, dt_bias, y,
        heads // groups, head_dim, dstate, triton.next_power_of_2(batch),
        *state.stride()[:3], *x.stride(), *dt.stride(), *b.stride(), *c.stride(), *y.stride(),
        BLOCK_N=triton.next_power_of_2(dstate),
    )  # fmt: skip
    return y


@functools.cache
def _kernel():
    """The autotuned kernel, built on first use (Triton compiles per shape and dtype)."""

    @triton.autotune(
        # The winners on an H200 (bf16 state: 32 rows, 2 or 4 warps) and their neighbours: few configs, because the
        # continuous engine's tail meets several batch sizes and each is tuned once per process.
        configs=[triton.Config({"BLOCK_P": p}, num_warps=w) for p in (16, 32) for w in (2, 4)],
        key=["head_dim", "dstate", "batch_bucket"],
        restore_value=["state_ptr"],  # tuning runs the update several times: each from the same state
    )
    @triton.jit
    def ssm_step_kernel(
        state_ptr, x_ptr, dt_ptr, a_ptr, b_ptr, c_ptr, d_ptr, dt_bias_ptr, y_ptr,
        heads_per_group, head_dim, dstate, batch_bucket,
        s_b, s_h, s_p, x_b, x_h, x_p, dt_b, dt_h, b_b, b_g, b_n, c_b, c_g, c_n, y_b, y_h, y_p,
        BLOCK_P: tl.constexpr, BLOCK_N: tl.constexpr,
    ):  # fmt: skip
        row, head = tl.program_id(0), tl.program_id(1)
        group = head // heads_per_group
        n = tl.arange(0, BLOCK_N)
        n_in = n < dstate
        step = tl.load(dt_ptr + row * dt_b + head * dt_h).to(tl.float32) + tl.load(dt_bias_ptr + head).to(tl.float32)
        step = tl.where(step <= 20.0, tl.log(1.0 + tl.exp(step)), step)  # softplus, as torch's threshold 20
        decay = tl.exp(step * tl.load(a_ptr + head).to(tl.float32))
        skip = tl.load(d_ptr + head).to(tl.float32)
        b_row = tl.load(b_ptr + row * b_b + group * b_g + n * b_n, mask=n_in, other=0.0).to(tl.float32)
        c_row = tl.load(c_ptr + row * c_b + group * c_g + n * c_n, mask=n_in, other=0.0).to(tl.float32)
        state_head = state_ptr + row * s_b + head * s_h
        for start in range(0, head_dim, BLOCK_P):
            p = start + tl.arange(0, BLOCK_P)
            p_in = p < head_dim
            x = tl.load(x_ptr + row * x_b + head * x_h + p * x_p, mask=p_in, other=0.0).to(tl.float32)
            tile = state_head + p[:, None] * s_p + n[None, :]
            tile_in = p_in[:, None] & n_in[None, :]
            state = tl.load(tile, mask=tile_in, other=0.0).to(tl.float32)
            state = state * decay + (step * x)[:, None] * b_row[None, :]
            tl.store(tile, state.to(state_ptr.dtype.element_ty), mask=tile_in)
            y = tl.sum(state * c_row[None, :], axis=1) + skip * x
            tl.store(y_ptr + row * y_b + head * y_h + p * y_p, y.to(y_ptr.dtype.element_ty), mask=p_in)

    return ssm_step_kernel
