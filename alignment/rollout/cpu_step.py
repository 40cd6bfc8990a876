"""The Mamba-2 SSM state's one-token update for the static decode step on the CPU, in place.

Why: transformers' PyTorch fallback `mamba2_selective_state_update`, which the mixer calls without the CUDA kernels,
takes dt and A expanded over the head dimension and the state size, so it computes exp() over every state value
([B, H, P, N]) instead of once per head and builds four temporaries of the state's size. On the 2-core CPU, one layer
of the tiny demo model at its decode batch of 512 rows took 8.3 ms there and 2.3 ms here, 3.5x (`python
bench/bench_cpu_step.py`, 2026-12-02).

The arithmetic is `ssm_step_reference`'s (alignment/rollout/ssm_step.py) in float32, with the state updated in place:
scaled, the outer product of dt x and B added, then read once for y. `tests/test_cpu_step.py` checks it against the
mixer's own function.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def ssm_update_chosen(device: torch.device, state_dtype: torch.dtype) -> bool:
    """Whether the static decoder takes `ssm_update` for a state on `device` in `state_dtype`: a float32 CPU state."""
    return device.type == "cpu" and state_dtype == torch.float32


def ssm_update(state: torch.Tensor, x: torch.Tensor, dt: torch.Tensor, a: torch.Tensor, b: torch.Tensor,
               c: torch.Tensor, d: torch.Tensor, dt_bias: torch.Tensor) -> torch.Tensor:
    """One token through the SSM, the float32 `state` [B, H, P, N] updated in place; returns y [B, H, P].

    Shapes as `ssm_step_reference`: x [B, H, P], dt [B, H] (before softplus and bias), a [H], b and c [B, G, N],
    d [H], dt_bias [H].
    """
    if state.dtype != torch.float32:
        raise ValueError(f"ssm_update updates a float32 state in place, got {state.dtype}")
    per_group = state.shape[1] // b.shape[1]
    step = F.softplus(dt.float() + dt_bias.float())  # [B, H]
    decay = torch.exp(step * a.float())  # [B, H]
    b_heads = b.float().repeat_interleave(per_group, dim=1)  # [B, H, N]
    c_heads = c.float().repeat_interleave(per_group, dim=1)
    # Broadcast products rather than batched matmuls: on [B*H, P, N] with P and N of tens, bmm was 2-3x slower.
    state.mul_(decay[..., None, None]).addcmul_((step[..., None] * x.float())[..., None], b_heads[:, :, None, :])
    y = (state * c_heads[:, :, None, :]).sum(-1)  # [B, H, P]
    return y.addcmul_(d.float()[:, None], x.float()).to(x.dtype)

