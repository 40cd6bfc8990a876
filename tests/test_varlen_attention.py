"""Varlen attention for packed rows: the layout around the kernel, checked on CPU with a slow stand-in kernel.

The real kernel (`torch.nn.attention.varlen.varlen_attn`) is CUDA-only; `bench/gpu_packing_check.py` checks it on
the GPU. Here a per-sample SDPA stand-in with the same signature takes its place, so what is tested is everything
around it: flattening, boundaries, GQA, causal flags, falling back where the kernel does not apply.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from alignment import varlen_attention
from alignment.packed_model import enable_packed_sequences
from alignment.packing import SampleCollator, model_inputs
from alignment.token_logprobs import per_sample_logps
from alignment.varlen_attention import VARLEN_ATTENTION, cu_seqlens_from_segments, use_varlen_attention
from tests.test_packing import BUDGET, LENGTHS, PAD, make_samples, one_by_one, tiny_hybrid


def _reference(q, k, v, cu, max_len, causal, scale=None, gqa=False):
    """Per-sample causal SDPA over flattened [N, H, D] tensors: the obvious version of varlen attention."""
    assert causal and int(cu[-1]) == q.shape[0] and int((cu[1:] - cu[:-1]).max()) == max_len
    assert gqa or k.shape[1] == q.shape[1], "old signature has no GQA: heads must have been expanded"
    out = []
    for s, e in zip(cu[:-1].tolist(), cu[1:].tolist()):
        part = F.scaled_dot_product_attention(
            q[s:e].transpose(0, 1), k[s:e].transpose(0, 1), v[s:e].transpose(0, 1),
            is_causal=True, scale=scale, enable_gqa=gqa,
        )  # [H, L, D]
        out.append(part.transpose(0, 1))
    return torch.cat(out)


class OldSignature:  # torch 2.10-style: is_causal, no scale, no GQA
    def __init__(self):
        self.calls = 0

    def __call__(self, query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, is_causal=False, return_aux=None):
        self.calls += 1
        return _reference(query, key, value, cu_seq_q, max_q, is_causal)


class NewSignature:  # later: window_size=(-1, 0) for causal, scale, enable_gqa
    def __init__(self):
        self.calls = 0

    def __call__(self, query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, *, return_aux=None, scale=None,
                 window_size=(-1, -1), enable_gqa=False, seqused_k=None, block_table=None, num_splits=None):
        self.calls += 1
        return _reference(query, key, value, cu_seq_q, max_q, tuple(window_size) == (-1, 0), scale, enable_gqa)


class Torch211Signature:  # torch 2.11 (seen on the H100 machine): window_size and scale, no GQA
    def __init__(self):
        self.calls = 0

    def __call__(self, query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, *, return_aux=None, scale=None,
                 window_size=(-1, -1)):
        self.calls += 1
        return _reference(query, key, value, cu_seq_q, max_q, tuple(window_size) == (-1, 0), scale)


@pytest.fixture(params=[OldSignature, Torch211Signature, NewSignature])
def kernel(request, monkeypatch):
    fake = request.param()
    monkeypatch.setattr(varlen_attention, "varlen_kernel", lambda: fake)
    monkeypatch.setattr(varlen_attention, "KERNEL_DEVICE_TYPES", ("cpu",))
    monkeypatch.setattr(varlen_attention, "KERNEL_DTYPES", (torch.float32,))
    return fake


def test_cu_seqlens_from_segments_restarts_at_every_row():
    seg = torch.tensor([[0, 0, 1, 1, 1, 2], [0, 1, 1, 1, 1, 1]])
    cu, max_len = cu_seqlens_from_segments(seg)
    assert cu.tolist() == [0, 2, 5, 6, 7, 12] and cu.dtype == torch.int32 and max_len == 5


def test_packed_loss_and_gradients_match_one_by_one(kernel):
    samples = make_samples(LENGTHS, seed=7)
    model = tiny_hybrid(seed=7)
    enable_packed_sequences(model)
    assert use_varlen_attention(model) and model.config._attn_implementation == VARLEN_ATTENTION
    model.train()

    batch = SampleCollator(mode="packed", pad_token_id=PAD, max_tokens_per_row=BUDGET)(samples)
    logits = model(**model_inputs(batch)).logits
    packed = per_sample_logps(logits, batch["labels"], batch["sample_ids"], len(samples))[0]
    assert kernel.calls == 2  # one call per attention layer for the whole batch
    (-packed.sum()).backward()
    packed_grads = {k: p.grad.clone() for k, p in model.named_parameters()}
    model.zero_grad()

    calls = kernel.calls
    alone = one_by_one(model, samples)  # padded batches of one: the kernel does not apply
    assert kernel.calls == calls
    (-alone.sum()).backward()
    torch.testing.assert_close(packed, alone, atol=1e-5, rtol=1e-6)
    for k, p in model.named_parameters():
        # Relative to the tensor's largest entry, not entry by entry: a bias gradient sums every token's terms (up
        # to ~65 here), so its float rounding follows their size, and the summation order of the CPU's kernels.
        # Here the worst is 6e-7 of the largest entry; an attention or state leak would be of the order of 1.
        scale = float(p.grad.abs().max())
        torch.testing.assert_close(packed_grads[k], p.grad, atol=1e-5 * max(scale, 1.0), rtol=0,
                                   msg=lambda m, k=k: f"{k}: {m}")


def test_boundaries_derived_from_position_ids_alone(kernel):
    """Without the collator's cu_seq_lens (TRL-style rows), boundaries come from restarting position_ids."""
    samples = make_samples(LENGTHS, seed=8)
    model = tiny_hybrid(seed=8)
    enable_packed_sequences(model)
    use_varlen_attention(model)
    batch = SampleCollator(mode="packed", pad_token_id=PAD, max_tokens_per_row=BUDGET)(samples)
    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"]).logits
        packed = per_sample_logps(logits, batch["labels"], batch["sample_ids"], len(samples))[0]
        alone = one_by_one(model, samples)
    assert kernel.calls == 2
    torch.testing.assert_close(packed, alone, atol=1e-5, rtol=1e-6)


def test_not_switched_without_kernel(monkeypatch):
    monkeypatch.setattr(varlen_attention, "varlen_kernel", lambda: None)
    model = tiny_hybrid()
    assert not use_varlen_attention(model)
    assert model.config._attn_implementation == "sdpa"
