"""Activation checkpointing of the decoder blocks: blocks really run again in backward, keep far fewer tensors for it,
and give the gradients of the plain path, with and without LoRA, on packed rows of the tiny hybrid (float32, CPU)."""

from __future__ import annotations

import copy
import json
import random

import pytest
import torch

from alignment.activation_checkpointing import activation_checkpointing_status, enable_activation_checkpointing
from alignment.config import load_config
from alignment.grpo import GRPOConfig, policy_update
from alignment.packed_model import PackedPath
from alignment.packing import SampleCollator
from alignment.sft import TrainConfig, cuda_graphs_unusable, run_sft, token_loss_sum
from tests.test_sft import tiny_sft_config
from tests.test_token_logprobs import ROW, make_samples, packed, tiny_model, trainable_grads


def mixer_calls(model) -> list[int]:
    """Calls of each block's mixer, counted from now on (a checkpointed block runs it again in backward). A pre-hook:
    the recompute stops once it has rebuilt what backward needs, before the mixer returns."""
    blocks = [m for m in model.modules() if type(m).__name__ == "NemotronHBlock"]
    counts = [0] * len(blocks)
    for i, block in enumerate(blocks):
        block.mixer.register_forward_pre_hook(lambda *_, i=i: counts.__setitem__(i, counts[i] + 1))
    return counts


def saved_bytes(fn) -> int:
    """Bytes of the tensors autograd keeps for backward while `fn()` runs its forward."""
    total = [0]

    def pack(t):
        total[0] += t.numel() * t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        return fn(), total[0]


@pytest.mark.parametrize("lora", [True, False])
def test_checkpointed_blocks_recompute_in_backward_and_give_the_same_gradients(lora):
    plain = tiny_model(lora)
    checkpointed = copy.deepcopy(plain)
    blocks = enable_activation_checkpointing(checkpointed)
    assert blocks == plain.config.num_hidden_layers
    assert activation_checkpointing_status(checkpointed) == f"on ({blocks} decoder blocks)"
    assert activation_checkpointing_status(plain) == "off"
    batch = packed(make_samples(seed=11))

    results = []
    for model in (plain, checkpointed):
        calls = mixer_calls(model)
        loss, kept = saved_bytes(lambda: token_loss_sum(model, batch, 7))
        assert calls == [1] * blocks  # one forward so far
        loss.backward()
        results.append((loss.detach(), kept, calls, trainable_grads(model)))
    (loss, kept, calls, grads), (ck_loss, ck_kept, ck_calls, ck_grads) = results
    assert calls == [1] * blocks and ck_calls == [2] * blocks  # every checkpointed block ran again in backward
    assert ck_kept < kept / 10, (ck_kept, kept)
    torch.testing.assert_close(ck_loss, loss, atol=0, rtol=0)
    assert grads.keys() == ck_grads.keys()
    for name in grads:
        torch.testing.assert_close(ck_grads[name], grads[name], atol=1e-6, rtol=1e-5,
                                   msg=lambda text, name=name: f"{name}: {text}")


def test_no_grad_and_eval_forwards_run_each_block_once():
    model = tiny_model(lora=True)
    enable_activation_checkpointing(model)
    batch = packed(make_samples(seed=12))
    calls = mixer_calls(model)
    with torch.no_grad():  # old and reference log-probs
        token_loss_sum(model, batch, 7)
    model.eval()
    token_loss_sum(model, batch, 7).backward()
    assert calls == [2] * len(calls)


def test_cuda_graphs_fall_back_when_activation_checkpointing_is_on():
    capturable = PackedPath(mamba="cuda-kernels", attention="varlen")
    cuda = torch.device("cuda")  # only a device name: nothing runs on it
    assert cuda_graphs_unusable(TrainConfig(cuda_graphs=True), cuda, capturable, world=1) is None
    why = cuda_graphs_unusable(TrainConfig(cuda_graphs=True, activation_checkpointing=True), cuda, capturable, world=1)
    assert why and "activation checkpointing" in why


def test_sft_with_activation_checkpointing_follows_the_plain_run(tiny_data, tmp_path):
    runs = {}
    for on in (False, True):
        out = tmp_path / f"checkpointing-{on}"
        run_sft(tiny_sft_config(tiny_data, out, "lora.enabled=true", "train.lr=1e-2", "train.batch_size=8",
                                f"train.activation_checkpointing={str(on).lower()}"))
        lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
        runs[on] = [line["loss"] for line in lines if "loss" in line]
    assert len(runs[True]) == 3 and runs[True][0] != runs[True][-1]
    assert runs[True] == pytest.approx(runs[False], rel=1e-5)


def test_grpo_learner_with_activation_checkpointing_follows_the_plain_update():
    samples = make_samples(seed=13)
    advantages = torch.randn(len(samples), generator=torch.Generator().manual_seed(14))
    start = tiny_model(lora=True)
    config = load_config(GRPOConfig, None, [
        "rollout.temperature=0.7", "loss.minibatches=2", "rollout.max_new_tokens=16", "train.rows_per_micro_batch=2",
        f"train.max_tokens_per_row={ROW}",
    ])
    results = []
    for on in (False, True):
        model = copy.deepcopy(start)
        if on:
            enable_activation_checkpointing(model)
        calls = mixer_calls(model)
        optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
        stats = policy_update(model, samples, advantages, config, SampleCollator(mode="packed", max_tokens_per_row=ROW),
                              optimizer, None, random.Random(0))
        results.append((stats, calls[0], {n: p.detach() for n, p in model.named_parameters() if p.requires_grad}))
    (stats, calls, weights), (ck_stats, ck_calls, ck_weights) = results
    assert ck_calls > calls  # the learner's blocks ran again in backward; the no-grad old log-probs did not
    for key in stats:
        assert ck_stats[key] == pytest.approx(stats[key], rel=1e-5, abs=1e-7), key
    for name in weights:
        torch.testing.assert_close(ck_weights[name], weights[name], atol=1e-6, rtol=1e-5,
                                   msg=lambda text, name=name: f"{name}: {text}")
