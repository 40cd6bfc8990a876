"""Sequence packing: bin packing, the collator, and packed forwards of a tiny hybrid that match per-sample runs."""

from __future__ import annotations

import random
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from transformers import NemotronHConfig, NemotronHForCausalLM
from transformers.models.nemotron_h import modeling_nemotron_h

from alignment.packed_model import (
    PackingNotSupportedError,
    causal_conv1d_seq_idx,
    check_packing_supported,
    enable_packed_sequences,
    guard_trl_config,
    has_recurrent_layers,
    _kernels_take_seq_idx,
    mamba2_chunk_scan_seq_idx,
    recurrent_modules,
)
from alignment.packing import (
    IGNORE_INDEX,
    SampleCollator,
    first_fit_decreasing,
    model_inputs,
    pad_packed_batch,
    plan_packed_batches,
)
from alignment.modeling import ModelConfig, load_model, mamba_kernels_available
from alignment.token_logprobs import per_sample_logps

VOCAB, PAD = 100, 0
# Long and short samples, and samples shorter than the conv kernel (4), so boundaries fall inside chunks (8).
LENGTHS = [1, 2, 3, 29, 11, 17, 5, 8, 23, 2]
BUDGET = 40


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    # Tiny ops on a busy 2-core machine are an order of magnitude faster on one thread.
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def tiny_hybrid(seed: int = 0, attn: str = "sdpa") -> NemotronHForCausalLM:
    torch.manual_seed(seed)
    config = NemotronHConfig(
        vocab_size=VOCAB,
        hidden_size=64,
        num_hidden_layers=9,
        hybrid_override_pattern="M-M*-M-*-",
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        intermediate_size=128,
        mamba_num_heads=4,
        mamba_head_dim=16,
        n_groups=1,
        ssm_state_size=16,
        conv_kernel=4,
        chunk_size=8,
        attn_implementation=attn,
    )
    return NemotronHForCausalLM(config).float()


def make_samples(lengths: list[int], seed: int = 0) -> list[dict]:
    g = torch.Generator().manual_seed(seed)
    samples = []
    for n in lengths:
        ids = torch.randint(1, VOCAB, (n,), generator=g).tolist()
        prompt = n // 3  # no loss on the prompt
        samples.append({"input_ids": ids, "labels": [IGNORE_INDEX] * prompt + ids[prompt:]})
    return samples


def per_sample_sums(model: nn.Module, batch: dict, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    logits = model(**model_inputs(batch)).logits
    return per_sample_logps(logits, batch["labels"], batch["sample_ids"], n)


def one_by_one(model: nn.Module, samples: list[dict]) -> torch.Tensor:
    """Sum of target log-probs of each sample, run alone (batch of one, no padding)."""
    collate = SampleCollator(mode="padded", pad_token_id=PAD, max_tokens_per_row=BUDGET)
    return torch.cat([per_sample_sums(model, collate([s]), 1)[0] for s in samples])


# ---------------------------------------------------------------------------------------------------------------
# Bin packing and the collator
# ---------------------------------------------------------------------------------------------------------------


def test_first_fit_decreasing_respects_budget_and_keeps_every_sample_once():
    rng = random.Random(0)
    for _ in range(200):
        budget = rng.randint(1, 64)
        lengths = [rng.randint(1, budget) for _ in range(rng.randint(1, 40))]
        rows = first_fit_decreasing(lengths, budget)
        assert all(sum(lengths[i] for i in row) <= budget for row in rows)
        assert sorted(i for row in rows for i in row) == list(range(len(lengths)))
        # FFD never needs more rows than twice the lower bound.
        assert len(rows) <= 2 * -(-sum(lengths) // budget)


def test_first_fit_decreasing_rejects_overlong_sample():
    with pytest.raises(ValueError, match="truncate"):
        first_fit_decreasing([3, 9], 8)


def test_plan_packed_batches_covers_dataset():
    lengths = [random.Random(i).randint(1, 50) for i in range(300)]
    batches = plan_packed_batches(lengths, 64, rows_per_batch=4, seed=1)
    assert sorted(i for b in batches for i in b) == list(range(300))
    rows = [len(first_fit_decreasing([lengths[i] for i in b], 64)) for b in batches]
    assert max(rows) <= 5 and sum(rows) <= 4 * len(batches)


def test_packed_batch_layout():
    samples = make_samples(LENGTHS)
    batch = SampleCollator(mode="packed", pad_token_id=PAD, max_tokens_per_row=BUDGET)(samples)
    R, T = batch["input_ids"].shape
    assert T <= BUDGET and batch["seq_idx"].dtype == torch.int32
    seen = []
    for r in range(R):
        ids = batch["sample_ids"][r]
        for k in batch["seq_idx"][r].unique().tolist():
            where = (batch["seq_idx"][r] == k).nonzero().flatten()
            assert (where.diff() == 1).all()  # every segment is contiguous
            s, e = where[0].item(), where[-1].item() + 1
            assert batch["position_ids"][r, s:e].tolist() == list(range(e - s))
            assert batch["labels"][r, s] == IGNORE_INDEX  # nothing predicts across a boundary
            i = ids[s].item()
            if i < 0:  # the padding tail: its own segment, no targets
                assert e == T and (batch["input_ids"][r, s:e] == PAD).all()
                assert not batch["loss_mask"][r, s:e].any()
                continue
            seen.append(i)
            assert batch["input_ids"][r, s:e].tolist() == samples[i]["input_ids"]
            assert batch["labels"][r, s + 1 : e].tolist() == samples[i]["labels"][1:]
    assert sorted(seen) == list(range(len(samples)))
    # cu_seq_lens: boundaries of every segment (tails included) over the flattened rows.
    flat = (batch["seq_idx"] + 1000 * torch.arange(R, dtype=torch.int32)[:, None]).flatten()
    runs = torch.unique_consecutive(flat, return_counts=True)[1]
    assert batch["cu_seq_lens_q"].tolist() == [0] + runs.cumsum(0).tolist()
    assert batch["max_length_q"] == runs.max().item()


def test_overlong_samples_are_truncated_in_both_modes():
    samples = make_samples([50, 3])
    short = SampleCollator(mode="packed", pad_token_id=PAD, max_tokens_per_row=BUDGET)(make_samples([5, 3, 9]))
    assert short["input_ids"].shape[1] == 32  # 17 tokens in one row, rounded up to the default multiple (16)
    for mode in ("packed", "padded"):
        collate = SampleCollator(mode=mode, pad_token_id=PAD, max_tokens_per_row=BUDGET, pad_to_multiple_of=16)
        batch = collate(samples)
        assert collate.num_truncated == 1
        assert batch["input_ids"].shape[1] == BUDGET  # rounded up to the multiple, but never past the budget
        row = batch["sample_ids"] == 0
        assert row.sum() == BUDGET and batch["input_ids"][row].tolist() == samples[0]["input_ids"][:BUDGET]


# ---------------------------------------------------------------------------------------------------------------
# Reference numerics against slow obvious versions
# ---------------------------------------------------------------------------------------------------------------


def test_conv_matches_per_sample_conv():
    torch.manual_seed(0)
    lengths = [1, 2, 7, 3]
    x, w, b = torch.randn(1, 6, sum(lengths)), torch.randn(6, 4), torch.randn(6)
    seq_idx = torch.repeat_interleave(torch.arange(4), torch.tensor(lengths))[None].int()
    out = causal_conv1d_seq_idx(x, w, b, seq_idx, "silu")
    ref = [F.conv1d(part, w[:, None], b, padding=3, groups=6)[..., : part.shape[-1]] for part in x.split(lengths, -1)]
    torch.testing.assert_close(out, F.silu(torch.cat(ref, -1)), atol=1e-6, rtol=1e-6)


def test_scan_matches_stepwise_recurrence():
    """h_t = exp(dt_t A) h_{t-1} + dt_t B_t x_t, y_t = C_t h_t + D x_t, with h reset at each new sample."""
    torch.manual_seed(0)
    lengths = [3, 1, 13, 2, 9]  # chunk 4: boundaries inside chunks and on them
    b, t, h, p, g, n = 2, sum(lengths), 4, 3, 2, 5
    x, dt = torch.randn(b, t, h, p), torch.randn(b, t, h)
    A, B, C, D = -torch.rand(h) - 0.5, torch.randn(b, t, g, n), torch.randn(b, t, g, n), torch.randn(h)
    dt_bias, h0 = torch.randn(h), torch.randn(b, h, p, n)
    seq_idx = torch.repeat_interleave(torch.arange(len(lengths)), torch.tensor(lengths))[None].int()
    y, final = mamba2_chunk_scan_seq_idx(
        x, dt, A, B, C, 4, seq_idx, D=D, dt_bias=dt_bias, initial_states=h0, dt_softplus=True, return_final_states=True
    )
    delta = F.softplus(dt + dt_bias)  # [b, t, h]
    Bh, Ch = B.repeat_interleave(h // g, 2), C.repeat_interleave(h // g, 2)  # [b, t, h, n]
    state, ys = h0.clone(), []
    for i in range(t):
        if i > 0 and seq_idx[0, i] != seq_idx[0, i - 1]:
            state = torch.zeros_like(state)
        decay = torch.exp(delta[:, i] * A)[..., None, None]  # [b, h, 1, 1]
        state = decay * state + (delta[:, i, :, None] * x[:, i])[..., None] * Bh[:, i, :, None, :]
        ys.append(torch.einsum("bhpn,bhn->bhp", state, Ch[:, i]) + D[:, None] * x[:, i])
    torch.testing.assert_close(y, torch.stack(ys, 1), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(final, state, atol=1e-5, rtol=1e-5)


# ---------------------------------------------------------------------------------------------------------------
# Packed forwards of a tiny hybrid
# ---------------------------------------------------------------------------------------------------------------


def test_position_ids_alone_leak_across_samples():
    """Without seq_idx the Mamba layers carry state from one sample into the next: the bug is real."""
    model = tiny_hybrid(seed=1)
    samples = make_samples(LENGTHS)
    batch = SampleCollator(mode="packed", pad_token_id=PAD, max_tokens_per_row=BUDGET)(samples)
    inputs = {k: v for k, v in model_inputs(batch).items() if k != "seq_idx"}  # attention is kept apart
    with torch.no_grad():
        logits = model(**inputs).logits
        packed = per_sample_logps(logits, batch["labels"], batch["sample_ids"], len(samples))[0]
        alone = one_by_one(model, samples)
    assert (packed - alone).abs().max() > 1e-2


@pytest.mark.parametrize("attention", ["auto", "keep"])
def test_packed_loss_and_gradients_match_one_by_one(attention):
    samples = make_samples(LENGTHS, seed=2)
    model = tiny_hybrid(seed=2)
    path = enable_packed_sequences(model, attention=attention)
    assert path.mamba == "reference-seq_idx"
    assert path.attention == ("segment-sdpa" if attention == "auto" else "sdpa-dense-mask")
    model.train()  # the training branch of the mixer (fused call first)

    batch = SampleCollator(mode="packed", pad_token_id=PAD, max_tokens_per_row=BUDGET)(samples)
    assert batch["input_ids"].shape[0] < len(samples)  # really packed
    packed, counts = per_sample_sums(model, batch, len(samples))
    (-packed.sum()).backward()
    packed_grads = {k: p.grad.clone() for k, p in model.named_parameters()}
    model.zero_grad()

    alone = one_by_one(model, samples)
    (-alone.sum()).backward()
    torch.testing.assert_close(packed, alone, atol=1e-5, rtol=1e-6)
    assert counts.tolist() == [max(len(s["labels"]) - max(len(s["labels"]) // 3, 1), 0) for s in samples]
    for k, p in model.named_parameters():
        torch.testing.assert_close(packed_grads[k], p.grad, atol=1e-5, rtol=1e-4, msg=lambda text, k=k: f"{k}: {text}")


def test_hf_loss_on_packed_batch_equals_token_mean_of_samples():
    model = tiny_hybrid(seed=3)
    enable_packed_sequences(model)
    samples = make_samples(LENGTHS, seed=3)
    batch = SampleCollator(mode="packed", pad_token_id=PAD, max_tokens_per_row=BUDGET)(samples)
    with torch.no_grad():
        loss = model(**model_inputs(batch)).loss
        alone = one_by_one(model, samples)
    total = sum(sum(y != IGNORE_INDEX for y in s["labels"][1:]) for s in samples)
    torch.testing.assert_close(loss, -alone.sum() / total, atol=1e-6, rtol=1e-6)


def test_fixed_shape_batch_keeps_loss_and_gradients():
    """`pad_packed_batch` (the CUDA-graph shape) adds only padding segments: same per-sample sums and gradients."""
    model = tiny_hybrid(seed=5)
    enable_packed_sequences(model)
    samples = make_samples(LENGTHS, seed=5)
    batch = SampleCollator("packed", PAD, BUDGET)(samples)
    R, T = batch["input_ids"].shape
    fixed = pad_packed_batch(batch, rows=R + 1, tokens_per_row=T + 7, max_segments=32)
    assert fixed["input_ids"].shape == (R + 1, T + 7) and fixed["cu_seq_lens_q"].shape == (33,)
    cu = fixed["cu_seq_lens_q"]
    assert cu[0] == 0 and cu[-1] == (R + 1) * (T + 7) and bool((cu[1:] >= cu[:-1]).all())
    assert fixed["max_length_q"] == T + 7 and int(fixed["loss_mask"].sum()) == int(batch["loss_mask"].sum())
    # seq_idx never decreases within a row and the padding tail is a segment of its own.
    assert bool((fixed["seq_idx"][:, 1:] >= fixed["seq_idx"][:, :-1]).all())

    results = []
    for b in (batch, fixed):
        model.zero_grad()
        sums, counts = per_sample_sums(model, b, len(samples))
        (-sums.sum()).backward()
        results.append((sums.detach(), counts, {k: p.grad.clone() for k, p in model.named_parameters()}))
    torch.testing.assert_close(results[1][0], results[0][0], atol=1e-5, rtol=1e-6)
    assert results[1][1].tolist() == results[0][1].tolist()
    for k in results[0][2]:
        torch.testing.assert_close(results[1][2][k], results[0][2][k], atol=1e-5, rtol=1e-4,
                                   msg=lambda text, k=k: f"{k}: {text}")

    assert pad_packed_batch(batch, rows=R - 1, tokens_per_row=T, max_segments=64) is None  # too many rows
    assert pad_packed_batch(batch, rows=R, tokens_per_row=T - 1, max_segments=64) is None  # rows too long
    assert pad_packed_batch(batch, rows=R, tokens_per_row=T, max_segments=2) is None  # too many segments


def test_padded_and_packed_modes_agree():
    model = tiny_hybrid(seed=4)
    enable_packed_sequences(model)
    samples = make_samples(LENGTHS, seed=4)
    with torch.no_grad():
        packed = per_sample_sums(model, SampleCollator("packed", PAD, BUDGET)(samples), len(samples))
        padded = per_sample_sums(model, SampleCollator("padded", PAD, BUDGET)(samples), len(samples))
    torch.testing.assert_close(packed[0], padded[0], atol=1e-5, rtol=1e-6)
    assert packed[1].tolist() == padded[1].tolist()


def test_position_ids_only_input_is_made_correct_once_enabled():
    """Callers that pass only restarting position_ids (TRL's padding-free rows) get seq_idx derived for them."""
    model = tiny_hybrid(seed=5)
    enable_packed_sequences(model)
    samples = make_samples(LENGTHS, seed=5)
    batch = SampleCollator(mode="packed", pad_token_id=PAD, max_tokens_per_row=BUDGET)(samples)
    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"]).logits  # cache on, too
        packed = per_sample_logps(logits, batch["labels"], batch["sample_ids"], len(samples))[0]
        alone = one_by_one(model, samples)
    torch.testing.assert_close(packed, alone, atol=1e-5, rtol=1e-6)


def test_unpacked_forward_is_unchanged_by_enabling():
    model, stock = tiny_hybrid(seed=6), tiny_hybrid(seed=6)
    enable_packed_sequences(model)
    ids = torch.randint(1, VOCAB, (2, 19))
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=ids).logits, stock(input_ids=ids).logits, atol=1e-6, rtol=1e-6)
        out = model.generate(ids[:1, :5], max_new_tokens=4, do_sample=False)
        ref = stock.generate(ids[:1, :5], max_new_tokens=4, do_sample=False)
    assert out.tolist() == ref.tolist()


# ---------------------------------------------------------------------------------------------------------------
# Guards
# ---------------------------------------------------------------------------------------------------------------


def test_guard_refuses_hybrid_without_packed_path():
    model = tiny_hybrid()
    assert has_recurrent_layers(model)
    with pytest.raises(PackingNotSupportedError, match="enable_packed_sequences"):
        check_packing_supported(model)
    assert check_packing_supported(nn.Linear(2, 2)).mamba == "none"  # nothing recurrent, nothing to refuse
    enable_packed_sequences(model)
    assert check_packing_supported(model).mamba == "reference-seq_idx"


def test_guard_refuses_trl_padding_free_and_packing_for_hybrid():
    model = tiny_hybrid()
    for args in (SimpleNamespace(padding_free=True, packing=False), SimpleNamespace(padding_free=False, packing=True)):
        with pytest.raises(PackingNotSupportedError, match="SampleCollator"):
            guard_trl_config(model, args)
    guard_trl_config(model, SimpleNamespace(padding_free=False, packing=False))
    guard_trl_config(nn.Linear(2, 2), SimpleNamespace(padding_free=True, packing=True))


def test_unknown_recurrent_layer_is_refused():
    class ToyMambaMixer(nn.Module):
        def __init__(self):
            super().__init__()
            self.A_log = nn.Parameter(torch.zeros(2))

        def forward(self, x):
            return x

    model = nn.Sequential(ToyMambaMixer())
    with pytest.raises(PackingNotSupportedError, match="no correct packed path"):
        enable_packed_sequences(model)


def test_bypassed_hook_is_caught_by_the_probe(monkeypatch):
    """If the mixer stopped routing seq_idx through the hooked functions, enabling must fail loudly."""
    enable_packed_sequences(tiny_hybrid())  # installs the reference path
    hooked = modeling_nemotron_h.causal_conv1d_fn

    def conv_ignoring_seq_idx(hidden_states, weight, bias=None, activation=None, seq_idx=None, **kwargs):
        return hooked(hidden_states, weight, bias, activation=activation)

    monkeypatch.setattr(modeling_nemotron_h, "causal_conv1d_fn", conv_ignoring_seq_idx)
    with pytest.raises(PackingNotSupportedError, match="differs from its samples run alone"):
        enable_packed_sequences(tiny_hybrid())


@pytest.mark.parametrize("path, accepted", [("configs/tiny/model.json", False), ("configs/gpu/model_250m.json", True),
                                            ("configs/nano9b/model_nano9b_v2.json", True),
                                            ("configs/nano9b/model_nemotron_h_8b.json", True)])
def test_the_cuda_kernels_take_packed_rows_only_at_in_proj_widths_they_accept(path, accepted):
    """causal-conv1d refuses channel-last views whose strides are not multiples of 8 (the tiny hybrid's 422)."""
    model = load_model(ModelConfig(name_or_path=path, dtype="bfloat16"), "meta")
    mixers = [m for _, m in recurrent_modules(model)]
    assert mixers and all(_kernels_take_seq_idx(m) == accepted for m in mixers)


@pytest.mark.skipif(not (torch.cuda.is_available() and mamba_kernels_available()), reason="needs CUDA and mamba-ssm")
def test_a_width_the_kernels_refuse_packs_through_the_reference_on_cuda():
    model = tiny_hybrid().cuda()  # in_proj width 164
    assert enable_packed_sequences(model).mamba == "reference-seq_idx"  # the probe checked it against samples alone
    samples = make_samples(LENGTHS)
    packed, padded = (SampleCollator(mode=mode, pad_token_id=PAD, max_tokens_per_row=BUDGET) for mode in ("packed", "padded"))
    cuda = lambda batch: {k: v.cuda() if torch.is_tensor(v) else v for k, v in batch.items()}  # noqa: E731
    alone = torch.cat([per_sample_sums(model, cuda(padded([s])), 1)[0] for s in samples])
    torch.testing.assert_close(per_sample_sums(model, cuda(packed(samples)), len(samples))[0], alone,
                               rtol=1e-4, atol=1e-4)
