"""NemotronH's kernel calls changed by alignment.mamba_kernels: the frozen out_proj outside the fused Mamba training
kernel, and mamba-ssm's fused RMSNorm for CUDA tensors.

On the CPU the out_proj contract is checked against a stand-in with the kernel's signature, and the norm keeps
transformers' arithmetic. With CUDA and mamba-ssm the real kernels run against transformers' calls: the norm alone
(output and gradients), and a LoRA model both ways (loss and adapter gradients).
"""

from __future__ import annotations

import importlib.util

import pytest
import torch
import torch.nn.functional as F
from transformers.models.nemotron_h import modeling_nemotron_h

from alignment.lora import LoraConfig, apply_lora
from alignment.mamba_kernels import (FUSED_TRAINING_KERNEL, RMS_NORM_CLASS, frozen_outproj_outside,
                                     transformers_kernel_calls)
from alignment.modeling import ModelConfig, load_model
from tests.test_token_logprobs import assert_same_tensor

D_INNER, HIDDEN = 6, 4


class FusedStandIn:
    """The kernel's contract: the gated output of `zxbcdt`, projected when given out_proj's weight; calls recorded."""

    def __init__(self, final_states: bool = False):
        self.calls: list[bool] = []  # per call: was the out_proj weight handed over
        self.final_states = final_states

    def __call__(self, zxbcdt, *_, outproj_weight=None, outproj_bias=None, **__):
        self.calls.append(outproj_weight is not None)
        out = torch.tanh(zxbcdt[..., :D_INNER]) * torch.sigmoid(zxbcdt[..., D_INNER:])
        if outproj_weight is not None:
            out = F.linear(out, outproj_weight, outproj_bias)
        return (out, torch.zeros(1)) if self.final_states else out


def inputs(trainable: bool):
    g = torch.Generator().manual_seed(0)
    zxbcdt = torch.randn(2, 5, 2 * D_INNER, generator=g, requires_grad=True)
    weight = torch.randn(HIDDEN, D_INNER, generator=g).requires_grad_(trainable)
    bias = torch.randn(HIDDEN, generator=g).requires_grad_(trainable)
    return zxbcdt, weight, bias


@pytest.mark.parametrize("final_states", [False, True], ids=["output", "output+states"])
def test_a_frozen_projection_runs_outside_the_kernel_with_the_same_output_and_gradient(final_states):
    zxbcdt, weight, bias = inputs(trainable=False)
    kernel = FusedStandIn(final_states)
    want = kernel(zxbcdt, outproj_weight=weight, outproj_bias=bias)
    got = frozen_outproj_outside(kernel)(zxbcdt, outproj_weight=weight, outproj_bias=bias)
    if final_states:
        want, got = want[0], got[0]
    assert kernel.calls == [True, False]  # the wrapper kept the weight from the kernel
    torch.testing.assert_close(got, want)
    (want_grad,) = torch.autograd.grad(want.square().sum(), zxbcdt)
    (got_grad,) = torch.autograd.grad(got.square().sum(), zxbcdt)
    torch.testing.assert_close(got_grad, want_grad)


def test_a_trainable_projection_and_a_no_grad_call_go_through_the_kernel():
    zxbcdt, weight, bias = inputs(trainable=True)
    kernel = FusedStandIn()
    frozen_outproj_outside(kernel)(zxbcdt, outproj_weight=weight, outproj_bias=bias).sum().backward()
    assert kernel.calls == [True] and weight.grad is not None
    with torch.no_grad():
        frozen_outproj_outside(kernel)(zxbcdt, outproj_weight=weight.detach(), outproj_bias=None)
    assert kernel.calls == [True, True]


def test_no_kernel_means_the_unfused_path():
    zxbcdt, weight, bias = inputs(trainable=False)
    assert frozen_outproj_outside(lambda *a, **k: None)(zxbcdt, outproj_weight=weight, outproj_bias=bias) is None


def test_nemotron_h_runs_both_changes_and_a_baseline_can_take_them_off(monkeypatch):
    wrapper = getattr(modeling_nemotron_h, FUSED_TRAINING_KERNEL)
    while not getattr(wrapper, "_frozen_outproj_outside", False):  # a CPU test may have put packing's override on top
        wrapper = wrapper.__wrapped__
    monkeypatch.setattr(modeling_nemotron_h, FUSED_TRAINING_KERNEL, wrapper)  # as on a GPU machine
    norm = getattr(modeling_nemotron_h, RMS_NORM_CLASS)
    forward = norm.forward
    assert getattr(forward, "_rms_norm_kernel_on_cuda", False)
    with transformers_kernel_calls(modeling_nemotron_h):
        assert getattr(modeling_nemotron_h, FUSED_TRAINING_KERNEL) is wrapper.__wrapped__
        assert norm.forward is forward.__wrapped__
    assert getattr(modeling_nemotron_h, FUSED_TRAINING_KERNEL) is wrapper and norm.forward is forward


def test_the_norm_runs_transformers_forward_off_cuda():
    norm = getattr(modeling_nemotron_h, RMS_NORM_CLASS)(16, eps=1e-5).to(torch.bfloat16)
    with torch.no_grad():
        norm.weight.uniform_(0.5, 1.5)
    x = torch.randn(3, 7, 16, dtype=torch.bfloat16)
    torch.testing.assert_close(norm(x), type(norm).forward.__wrapped__(norm, x), rtol=0, atol=0)


def test_lora_on_the_mamba_out_proj_is_refused():
    model = load_model(ModelConfig(), "cpu")
    with pytest.raises(ValueError, match=r"lora.target_modules has out_proj.*fused training kernel"):
        apply_lora(model, LoraConfig(enabled=True, r=4, target_modules=["in_proj", "out_proj"]))


KERNELS = torch.cuda.is_available() and importlib.util.find_spec("mamba_ssm") is not None


@pytest.mark.gpu
@pytest.mark.skipif(not KERNELS, reason="needs CUDA and mamba-ssm")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_the_fused_norm_matches_transformers_norm_and_its_gradients(dtype):
    norm = getattr(modeling_nemotron_h, RMS_NORM_CLASS)(4480, eps=1e-5).to("cuda", dtype)
    with torch.no_grad():
        norm.weight.uniform_(0.5, 1.5)
    g = torch.Generator(device="cuda").manual_seed(0)
    x = torch.randn(2, 3000, 4480, device="cuda", generator=g).to(dtype).requires_grad_()
    upstream = torch.randn(x.shape, device="cuda", generator=g).to(dtype)
    results = []
    for fused in (True, False):
        x.grad = norm.weight.grad = None
        if fused:
            out = norm(x)
        else:
            with transformers_kernel_calls(modeling_nemotron_h):
                out = norm(x)
        out.backward(upstream)
        results.append((out.detach().float(), x.grad.float(), norm.weight.grad.float()))
    rel = 1e-5 if dtype == torch.float32 else 2**-8  # bf16: outputs rounded once either way, a flip is one unit (2^-8)
    for name, got, want in zip(("output", "input grad", "weight grad"), *results):
        assert_same_tensor(got, want, name, rel=rel)


@pytest.mark.gpu
@pytest.mark.skipif(not KERNELS, reason="needs CUDA and mamba-ssm")
def test_the_real_kernel_gives_the_same_loss_and_adapter_gradients_both_ways():
    torch.manual_seed(0)
    model = apply_lora(load_model(ModelConfig(dtype="float32"), "cuda"), LoraConfig(enabled=True, r=4)).train()
    input_ids = torch.randint(5, 300, (2, 64), device="cuda")

    def loss_and_grads():
        model.zero_grad()
        logits = model(input_ids=input_ids, use_cache=False).logits
        loss = F.cross_entropy(logits[:, :-1].flatten(0, 1), input_ids[:, 1:].flatten())
        loss.backward()
        return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}

    outside_loss, outside = loss_and_grads()
    with transformers_kernel_calls(modeling_nemotron_h):
        inside_loss, inside = loss_and_grads()
    assert_same_tensor(outside_loss, inside_loss, "loss", rel=1e-5)
    assert any("in_proj" in n for n in inside)
    for name, grad in inside.items():
        assert_same_tensor(outside[name], grad, name, rel=1e-4)
