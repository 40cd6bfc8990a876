"""The decode step's SSM state update (alignment/rollout/ssm_step.py): the Triton kernel against the PyTorch reference,
and the reference against the function NemotronH's mixer calls."""

from __future__ import annotations

import pytest
import torch

from alignment.rollout.ssm_step import ssm_step, ssm_step_available, ssm_step_reference

# (batch, heads, groups, head_dim, dstate): head_dim and dstate off the tile sizes, to reach the masked edges
SHAPES = [(5, 8, 2, 12, 16), (3, 6, 3, 20, 24), (2, 128, 8, 80, 128)]


def inputs(shape, device, dtype=torch.float32, state_dtype=torch.float32, seed=0):
    batch, heads, groups, head_dim, dstate = shape
    g = torch.Generator().manual_seed(seed)

    def rand(*size, scale=1.0):
        return (torch.randn(*size, generator=g) * scale).to(device)

    return dict(
        state=rand(batch, heads, head_dim, dstate).to(state_dtype),
        x=rand(batch, heads, head_dim).to(dtype),
        dt=rand(batch, heads, scale=2.0).to(dtype),  # both sides of softplus's threshold after the bias
        a=-torch.rand(heads, generator=g).to(device) * 4 - 0.1,
        b=rand(batch, groups, dstate).to(dtype),
        c=rand(batch, groups, dstate).to(dtype),
        d=rand(heads),
        dt_bias=rand(heads, scale=8.0),
    )


def mixers_update(values: dict) -> torch.Tensor:
    """transformers' mamba2_selective_state_update on `inputs(...)`, called as the static decoder called it before
    it had its own updates (per-head scalars expanded over the head dimension); updates values["state"]."""
    from transformers.models.nemotron_h import modeling_nemotron_h as modeling

    head_dim, dstate = values["state"].shape[2:]
    return modeling.mamba2_selective_state_update(
        values["state"], values["x"], values["dt"][..., None].expand(-1, -1, head_dim),
        values["a"][:, None, None].expand(-1, head_dim, dstate), values["b"], values["c"],
        values["d"][:, None].expand(-1, head_dim), dt_bias=values["dt_bias"][:, None].expand(-1, head_dim),
        dt_softplus=True,
    )  # fmt: skip


@pytest.mark.parametrize("shape", SHAPES[:2])
def test_the_reference_is_the_mixers_own_update(shape):
    """float32 on the CPU: ssm_step_reference equals transformers' mamba2_selective_state_update called as the
    static decoder called it (per-head scalars expanded over the head dimension)."""
    ours, theirs = inputs(shape, "cpu"), inputs(shape, "cpu")
    y = ssm_step_reference(**ours)
    expected = mixers_update(theirs)
    torch.testing.assert_close(y, expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ours["state"], theirs["state"], rtol=1e-5, atol=1e-5)


def test_without_cuda_the_step_is_the_reference():
    ours, theirs = inputs(SHAPES[0], "cpu"), inputs(SHAPES[0], "cpu")
    assert not ssm_step_available(torch.device("cpu"))
    torch.testing.assert_close(ssm_step(**ours), ssm_step_reference(**theirs), rtol=0, atol=0)


cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="the kernel runs on CUDA")


@cuda
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("state_dtype", [torch.float32, torch.bfloat16])
def test_the_kernel_matches_the_reference(shape, state_dtype):
    assert ssm_step_available(torch.device("cuda"))
    for dtype in (torch.float32, torch.bfloat16):
        ours = inputs(shape, "cuda", dtype, state_dtype)
        theirs = {k: v.clone() for k, v in ours.items()}
        before = ours["state"].clone()
        y = ssm_step(**ours)
        expected = ssm_step_reference(**theirs)
        assert not torch.equal(ours["state"], before)
        # float32 state: the same sums in another order; bf16: at most one rounding of the stored state apart
        state_tol = dict(rtol=1e-5, atol=1e-5) if state_dtype == torch.float32 else dict(rtol=1e-2, atol=1e-2)
        torch.testing.assert_close(ours["state"].float(), theirs["state"].float(), **state_tol)
        y_tol = dict(rtol=1e-4, atol=1e-4) if dtype == torch.float32 else dict(rtol=2e-2, atol=2e-2)
        torch.testing.assert_close(y.float(), expected.float(), **y_tol)


@cuda
@pytest.mark.parametrize("state_dtype", [torch.float32, torch.bfloat16])
def test_the_kernel_matches_mamba_ssm(state_dtype):
    """bf16 activations as in decoding, against the kernel the mixer's decode branch calls."""
    selective_state_update = pytest.importorskip("mamba_ssm.ops.triton.selective_state_update").selective_state_update
    shape = SHAPES[2]
    head_dim, dstate = shape[3], shape[4]
    ours = inputs(shape, "cuda", torch.bfloat16, state_dtype, seed=3)
    theirs = {k: v.clone() for k, v in ours.items()}
    y = ssm_step(**ours)
    expected = selective_state_update(
        theirs["state"], theirs["x"], theirs["dt"][..., None].expand(-1, -1, head_dim),
        theirs["a"][:, None, None].expand(-1, head_dim, dstate), theirs["b"], theirs["c"],
        theirs["d"][:, None].expand(-1, head_dim), dt_bias=theirs["dt_bias"][:, None].expand(-1, head_dim),
        dt_softplus=True,
    )  # fmt: skip
    state_tol = dict(rtol=1e-4, atol=1e-4) if state_dtype == torch.float32 else dict(rtol=1e-2, atol=1e-2)
    torch.testing.assert_close(ours["state"].float(), theirs["state"].float(), **state_tol)
    torch.testing.assert_close(y.float(), expected.float(), rtol=2e-2, atol=2e-2)


@cuda
def test_a_bf16_state_decodes_through_the_kernel_as_through_the_mixers_function(monkeypatch):
    """The static decoder's step with a bf16 state: the same logits with ssm_step as with the function the mixer's
    decode branch calls (mamba-ssm's kernel where installed), over steps that carry the state along."""
    from transformers import NemotronHConfig, NemotronHForCausalLM

    from alignment.rollout import static_decode
    from alignment.rollout.generation import prefill

    torch.manual_seed(0)
    config = NemotronHConfig(  # the causal-conv1d kernels want the projection width a multiple of 8
        vocab_size=100, hidden_size=64, hybrid_override_pattern="M-M*-M-", num_attention_heads=4, num_key_value_heads=2,
        head_dim=16, intermediate_size=128, mamba_num_heads=8, mamba_head_dim=16, n_groups=2, ssm_state_size=16,
        chunk_size=8, conv_kernel=4, pad_token_id=0,
    )  # fmt: skip
    model = NemotronHForCausalLM(config).to("cuda", torch.bfloat16).eval()
    prompts = [[5, 6, 7, 8, 9], [10, 11, 12]]
    logits = {}
    for chosen in (True, False):
        monkeypatch.setattr(static_decode, "ssm_step_chosen", lambda device, dtype, chosen=chosen: chosen)
        with torch.inference_mode():
            _, cache, mask = prefill(model, prompts, 0)
            decoder = static_decode.StaticDecoder(model, 2, 64, use_graph=False, ssm_state_dtype=torch.bfloat16)
            decoder.start(cache, mask)
            logits[chosen] = torch.stack([decoder.next([13 + t, 20 + t], [0, 1]) for t in range(12)])
    torch.testing.assert_close(logits[True], logits[False], rtol=2e-2, atol=2e-2)
