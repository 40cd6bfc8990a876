"""The chunked log-prob path (`alignment.token_logprobs`) against the full-logits path and a slow loop.

Values and gradients (of hidden states, of LoRA and full weights) for SFT's loss, DPO's per-sample log-probs and
GRPO's token log-probs at a temperature, on packed rows of the tiny hybrid, in float32 on CPU, with chunk sizes that
do not divide the token count.
"""

from __future__ import annotations

import copy
import random

import pytest
import torch
from torch import nn

from alignment.config import ConfigError, load_config
from alignment.lora import LoraConfig, apply_lora
from alignment.modeling import ModelConfig, load_model
from alignment.packed_model import enable_packed_sequences
from alignment.packing import IGNORE_INDEX, SampleCollator, model_inputs, per_sample_sums
from alignment.token_logprobs import (chunked_token_logps, final_hidden_states, model_token_logps, per_sample_logps,
                                     token_logps)
from tests.conftest import TINY_MODEL

ROW = 48  # tokens per packed row: 3 rows of 48 = 144 tokens, which 7 and 50 do not divide
LENGTHS = [30, 17, 9, 25, 11, 40, 5]


def tiny_model(lora: bool, seed: int = 0):
    model = load_model(ModelConfig(name_or_path=str(TINY_MODEL), init_seed=seed))
    if lora:
        model = apply_lora(model, LoraConfig(enabled=True))
        with torch.no_grad():  # peft starts lora_B at zero, which would leave lora_A without a gradient to compare
            g = torch.Generator().manual_seed(seed)
            for name, p in model.named_parameters():
                if "lora_B" in name:
                    p.copy_(torch.randn(p.shape, generator=g) * 0.02)
    enable_packed_sequences(model)
    return model.train()


def make_samples(lengths=LENGTHS, seed: int = 0) -> list[dict]:
    g = torch.Generator().manual_seed(seed)
    samples = []
    for n in lengths:
        ids = torch.randint(5, 384, (n,), generator=g).tolist()
        prompt = n // 3
        samples.append({"input_ids": ids, "labels": [IGNORE_INDEX] * prompt + ids[prompt:]})
    return samples


def packed(samples: list[dict]) -> dict:
    batch = SampleCollator(mode="packed", max_tokens_per_row=ROW)(samples)
    R, T = batch["input_ids"].shape
    assert R > 1 and (batch["seq_idx"] > 0).any()  # several rows, several samples in a row
    return batch


def trainable_grads(model) -> dict[str, torch.Tensor]:
    return {name: p.grad.clone() for name, p in model.named_parameters() if p.requires_grad}


def assert_same_grads(a: dict, b: dict) -> None:
    """Equal up to float32 reordering: the chunked path sums the same per-token terms in another order, so each
    tensor must agree relative to its own size (elementwise tolerances fail on entries that cancel to near zero,
    and their size depends on the machine's matmul blocking). A wrong gradient is off by O(1) of the norm."""
    assert a.keys() == b.keys() and a
    for name in a:
        assert_same_tensor(a[name], b[name], name)


def assert_same_tensor(a: torch.Tensor, b: torch.Tensor, name: str, rel: float = 1e-5) -> None:
    error, size = float((a - b).norm()), float(b.norm())
    assert error <= rel * size + 1e-7, f"{name}: |a - b| = {error:.3g}, |b| = {size:.3g}, max |a - b| = " \
                                       f"{float((a - b).abs().max()):.3g}"


# --- the numerics alone -------------------------------------------------------------------------------------------


def test_chunked_token_logps_match_a_slow_loop():
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(2, 9, 16, generator=g)
    head = nn.Linear(16, 11)
    labels = torch.randint(0, 11, (2, 9), generator=g)
    labels[0, :3] = IGNORE_INDEX
    labels[1, 5] = IGNORE_INDEX
    fast = chunked_token_logps(hidden, head, labels, temperature=0.7, chunk_tokens=4)  # 18 tokens: 4 + 4 + 4 + 4 + 2
    assert fast.shape == (2, 8)
    with torch.no_grad():
        for r in range(2):
            for t in range(8):
                y = labels[r, t + 1].item()  # position t predicts the token after it
                want = 0.0 if y == IGNORE_INDEX else torch.log_softmax(head(hidden[r, t]) / 0.7, -1)[y].item()
                assert fast[r, t].item() == pytest.approx(want, abs=1e-5)


@pytest.mark.parametrize("chunk", [1, 7, 50, 100_000])
@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_chunked_path_matches_full_logits_for_hidden_and_head_gradients(chunk, temperature):
    """From the same hidden states: equal log-probs, equal gradients of the hidden states and of the LM head."""
    model = tiny_model(lora=False)
    batch = packed(make_samples())
    hidden, head = final_hidden_states(model, {k: v for k, v in model_inputs(batch).items() if k != "labels"})
    hidden = hidden.detach().requires_grad_(True)
    R, T, _ = hidden.shape
    weights = torch.randn(R, T - 1, generator=torch.Generator().manual_seed(1))  # a different weight per token

    def value_and_grads(logps):
        (weights * logps).sum().backward()
        grads = (hidden.grad.clone(), head.weight.grad.clone())
        hidden.grad, head.weight.grad = None, None
        return logps.detach(), grads

    full, (full_dh, full_dw) = value_and_grads(token_logps(head(hidden), batch["labels"], temperature))
    chunked, (dh, dw) = value_and_grads(chunked_token_logps(hidden, head, batch["labels"], temperature, chunk))
    torch.testing.assert_close(chunked, full, atol=1e-5, rtol=1e-5)
    assert (chunked[batch["labels"][:, 1:] == IGNORE_INDEX] == 0).all()
    torch.testing.assert_close(dh, full_dh, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(dw, full_dw, atol=1e-6, rtol=1e-5)
    assert dh.abs().sum() > 0 and dw.abs().sum() > 0


def test_only_one_chunk_of_logits_is_kept_for_backward():
    """The full path saves [tokens, V] tensors for backward; the chunked path saves nothing vocabulary-wide."""
    model = tiny_model(lora=True)
    batch = packed(make_samples())
    vocab = model.config.vocab_size
    R, T = batch["input_ids"].shape
    weights = {p.untyped_storage().data_ptr() for p in model.parameters()}  # the LM head's weight is saved too

    def widest_saved(chunk: int) -> int:
        sizes = [0]

        def pack(t):
            if t.dim() and t.shape[-1] == vocab and t.untyped_storage().data_ptr() not in weights:
                sizes.append(t.numel())
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            logps = model_token_logps(model, batch, chunk)
        logps.sum().backward()
        return max(sizes)

    assert widest_saved(0) >= R * (T - 1) * vocab
    assert widest_saved(16) == 0  # the chunks' logits are recomputed in backward, not kept


# --- through the model: packed rows, LoRA and full weights --------------------------------------------------------


@pytest.mark.parametrize("lora", [True, False])
@pytest.mark.parametrize("chunk", [7, 50])
def test_model_token_logps_chunked_match_full_logits(lora, chunk):
    model = tiny_model(lora)
    batch = packed(make_samples(seed=1))
    weights = torch.randn(batch["input_ids"].shape[0], batch["input_ids"].shape[1] - 1,
                          generator=torch.Generator().manual_seed(2))
    results = []
    for chunk_tokens in (0, chunk):
        logps = model_token_logps(model, batch, chunk_tokens)
        (weights * logps).sum().backward()
        results.append((logps.detach(), trainable_grads(model)))
        model.zero_grad(set_to_none=True)
    (full, full_grads), (chunked, grads) = results
    torch.testing.assert_close(chunked, full, atol=1e-5, rtol=1e-5)
    assert_same_grads(grads, full_grads)
    if lora:
        assert any("lora_A" in name and g.abs().sum() > 0 for name, g in grads.items())
    else:
        assert grads["lm_head.weight"].abs().sum() > 0


def test_packed_rows_keep_their_samples_apart_on_the_chunked_path():
    """seq_idx still reaches the Mamba layers: packed per-sample sums equal each sample run alone on full logits."""
    model = tiny_model(lora=True).eval()
    samples = make_samples(seed=3)
    batch = packed(samples)
    alone_collate = SampleCollator(mode="padded", max_tokens_per_row=ROW)
    with torch.no_grad():
        sums, counts = per_sample_sums(model_token_logps(model, batch, 7), batch["labels"], batch["sample_ids"],
                                       len(samples))
        alone = []
        for s in samples:
            one = alone_collate([s])
            logits = model(input_ids=one["input_ids"], attention_mask=one["attention_mask"]).logits
            alone.append(per_sample_logps(logits, one["labels"], one["sample_ids"], 1)[0])
    torch.testing.assert_close(sums, torch.cat(alone), atol=1e-4, rtol=1e-5)
    assert counts.tolist() == [sum(y != IGNORE_INDEX for y in s["labels"][1:]) for s in samples]


# --- the three stages ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("chunk", [7, 50])
def test_sft_loss_chunked_matches_full_logits(chunk):
    from alignment.sft import token_loss_sum

    model = tiny_model(lora=True)
    batch = packed(make_samples(seed=4))
    results = []
    for chunk_tokens in (0, chunk):
        loss = token_loss_sum(model, batch, chunk_tokens)
        loss.backward()
        results.append((loss.detach(), trainable_grads(model)))
        model.zero_grad(set_to_none=True)
    (full, full_grads), (chunked, grads) = results
    torch.testing.assert_close(chunked, full, atol=1e-4, rtol=1e-6)
    assert_same_grads(grads, full_grads)


def test_dpo_pair_logps_chunked_match_full_logits():
    from alignment.dpo import pair_logps, preference_loss

    model = tiny_model(lora=True)
    samples = make_samples([30, 17, 9, 25, 11, 40, 5, 21], seed=5)
    pairs = [{"encoded": {"chosen": samples[i], "rejected": samples[i + 4]}} for i in range(4)]
    collator = SampleCollator(mode="packed", max_tokens_per_row=ROW)
    results = []
    for chunk_tokens in (0, 7):
        logps, counts = pair_logps(model, pairs, collator, "cpu", chunk_tokens)  # [B, 2]
        ref = logps.detach() + torch.linspace(-1, 1, 8).view(4, 2)  # a reference away from the policy
        losses, _, _ = preference_loss(logps[:, 0], logps[:, 1], ref[:, 0], ref[:, 1], counts[:, 0], counts[:, 1])
        (losses.mean() - 0.2 * logps[:, 0].sum() / counts[:, 0].sum()).backward()
        results.append((logps.detach(), counts, trainable_grads(model)))
        model.zero_grad(set_to_none=True)
    (full, full_counts, full_grads), (chunked, counts, grads) = results
    torch.testing.assert_close(chunked, full, atol=1e-4, rtol=1e-6)
    assert torch.equal(counts, full_counts)
    assert_same_grads(grads, full_grads)


def test_grpo_token_logps_chunked_match_full_logits_at_the_sampling_temperature():
    from alignment.advantages import clipped_policy_loss

    model = tiny_model(lora=True)
    batch = packed(make_samples(seed=6))
    mask = batch["labels"][:, 1:] != IGNORE_INDEX  # [R, T-1]
    g = torch.Generator().manual_seed(7)
    advantages = torch.randn(mask.shape, generator=g)
    results = []
    for chunk_tokens in (0, 7):
        logps = model_token_logps(model, batch, chunk_tokens, temperature=0.7)
        old = logps.detach() + 0.3 * torch.randn(mask.shape, generator=torch.Generator().manual_seed(8))
        loss, _ = clipped_policy_loss(logps[mask], old[mask], advantages[mask])
        loss.sum().backward()
        results.append((logps.detach(), trainable_grads(model)))
        model.zero_grad(set_to_none=True)
    (full, full_grads), (chunked, grads) = results
    torch.testing.assert_close(chunked, full, atol=1e-5, rtol=1e-5)
    assert_same_grads(grads, full_grads)
    with torch.no_grad():  # the temperature really reached the chunked path
        assert not torch.allclose(model_token_logps(model, batch, 7, temperature=1.0), chunked, atol=1e-3)


def test_grpo_policy_update_chunked_follows_the_full_logits_update():
    """The learner wires train.loss_chunk_tokens into old log-probs and loss: same statistics, same weights after."""
    from alignment.grpo import GRPOConfig, policy_update

    samples = make_samples(seed=9)
    advantages = torch.randn(len(samples), generator=torch.Generator().manual_seed(10))
    start = tiny_model(lora=True)
    results = []
    for chunk_tokens in (0, 7):
        config = load_config(GRPOConfig, None, [
            "rollout.temperature=0.7", "loss.minibatches=2", "rollout.max_new_tokens=16", "train.rows_per_micro_batch=2",
            f"train.max_tokens_per_row={ROW}", f"train.loss_chunk_tokens={chunk_tokens}",
        ])
        model = copy.deepcopy(start)
        optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
        stats = policy_update(model, samples, advantages, config, SampleCollator(mode="packed", max_tokens_per_row=ROW),
                              optimizer, None, random.Random(0))
        results.append((stats, {n: p.detach() for n, p in model.named_parameters() if p.requires_grad}))
    (full_stats, full_weights), (stats, weights) = results
    assert stats["updates"] == 2 and stats.keys() == full_stats.keys()
    for key in stats:
        assert stats[key] == pytest.approx(full_stats[key], rel=1e-4, abs=1e-6), key
    for name in weights:
        assert_same_tensor(weights[name], full_weights[name], name)


@pytest.mark.parametrize("stage", ["sft", "dpo", "grpo"])
def test_negative_chunk_size_is_refused_with_the_key(stage):
    from alignment.dpo import DPOConfig
    from alignment.grpo import GRPOConfig
    from alignment.sft import SFTConfig

    cls = {"sft": SFTConfig, "dpo": DPOConfig, "grpo": GRPOConfig}[stage]
    assert load_config(cls).train.loss_chunk_tokens == 0  # off by default: the tiny vocabulary needs no chunks
    with pytest.raises(ConfigError, match="loss_chunk_tokens"):
        load_config(cls, None, ["train.loss_chunk_tokens=-1"])


def test_zero3_falls_back_to_full_logits():
    from alignment.zero import chunked_loss_unusable

    assert chunked_loss_unusable(None) is None
    assert chunked_loss_unusable({"zero_optimization": {"stage": 2}}) is None
    assert "ZeRO-3" in chunked_loss_unusable({"zero_optimization": {"stage": 3}})


@pytest.mark.parametrize("dropout_off", [True, False])
def test_grpo_at_lr_zero_moves_nothing_once_dropout_is_off(dropout_off):
    """With lr=0 the new and old log-probs of every minibatch must agree; LoRA dropout alone breaks that."""
    from alignment.grpo import GRPOConfig, policy_update
    from alignment.token_logprobs import disable_dropout

    model = tiny_model(lora=False)
    model = apply_lora(model, LoraConfig(enabled=True, dropout=0.5))
    with torch.no_grad():  # non-zero lora_B: dropout on the adapter input then changes the output
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(std=0.05)
    if dropout_off:  # what run_grpo and run_dpo do after applying LoRA
        assert disable_dropout(model) > 0 and disable_dropout(model) == 0
    samples = make_samples(seed=3)
    config = load_config(GRPOConfig, None, ["loss.minibatches=2", "rollout.max_new_tokens=16",
                                            f"train.max_tokens_per_row={ROW}", "train.rows_per_micro_batch=2"])
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=0.0)
    model.eval()  # as generation leaves it
    stats = policy_update(model, samples, torch.randn(len(samples)), config,
                          SampleCollator(mode="packed", max_tokens_per_row=ROW), optimizer, None, random.Random(0))
    if dropout_off:
        assert stats["approx_kl_old"] == 0 and stats["clipped_low"] == 0 and stats["clipped_high"] == 0
    else:
        assert stats["approx_kl_old"] > 1e-4
