"""The CUDA-graph training step against the eager step it captures (GPU only; skipped on CPU machines)."""

from __future__ import annotations

import copy

import pytest
import torch

from alignment.graphed_step import GraphedTrainStep, capturable_adamw, set_learning_rate
from alignment.packed_model import enable_packed_sequences
from alignment.packing import SampleCollator
from alignment.varlen_attention import use_varlen_attention
from alignment.sft import token_loss_sum
from tests.test_packing import PAD, make_samples


def kernel_sized_hybrid(seed: int):
    """A tiny hybrid whose widths the Mamba CUDA kernels accept (in_proj width and conv channels multiples of 8)."""
    from transformers import NemotronHConfig, NemotronHForCausalLM

    torch.manual_seed(seed)
    config = NemotronHConfig(
        vocab_size=100, hidden_size=64, num_hidden_layers=5, hybrid_override_pattern="M-*M-",
        num_attention_heads=4, num_key_value_heads=2, head_dim=16, intermediate_size=128, mamba_num_heads=8,
        mamba_head_dim=8, n_groups=1, ssm_state_size=16, conv_kernel=4, chunk_size=16,
    )
    return NemotronHForCausalLM(config)

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")]


def test_graphed_steps_follow_the_eager_steps():
    """Same init, same batches: losses and weights after 9 steps agree; replays and an eager step in between.

    bf16 with the kernel paths a graph can hold (Mamba CUDA kernels, varlen attention); the replay runs the same
    kernels as the eager step, so only the Mamba backward's atomics make them differ.
    """
    device = torch.device("cuda")
    reference = kernel_sized_hybrid(seed=7).to(device, torch.bfloat16)
    path = enable_packed_sequences(reference)
    assert use_varlen_attention(reference) and path.mamba == "cuda-kernels"
    graphed = copy.deepcopy(reference)
    collate = SampleCollator("packed", PAD, max_tokens_per_row=64)
    batches = [collate(make_samples([5, 40, 17, 9, 33, 2, 21][: 3 + i % 4], seed=i)) for i in range(8)]
    batches.insert(5, collate(make_samples([60, 60, 60, 60], seed=9)))  # 4 rows: runs eagerly between replays

    eager_opt = capturable_adamw(reference.parameters(), 1e-3, device)
    step = GraphedTrainStep(graphed, capturable_adamw(graphed.parameters(), 1e-3, device), token_loss_sum,
                            rows=3, tokens_per_row=64, max_segments=16, max_grad_norm=1.0, warmup_steps=2)
    eager_losses, graphed_losses = [], []
    for i, batch in enumerate(batches):
        lr = 1e-3 * (1 - i / 10)
        set_learning_rate(eager_opt, lr)
        set_learning_rate(step.optimizer, lr)
        on_device = {k: v.to(device) if torch.is_tensor(v) else v for k, v in batch.items()}
        loss_sum = token_loss_sum(reference, on_device)
        n = on_device["loss_mask"][:, 1:].sum()
        (loss_sum / n).backward()
        torch.nn.utils.clip_grad_norm_(reference.parameters(), 1.0)
        eager_opt.step()
        eager_opt.zero_grad(set_to_none=True)
        eager_losses.append(float(loss_sum.detach() / n))
        g_sum, g_n, _ = step(batch)
        graphed_losses.append(float(g_sum / g_n))
    assert step.replayed_steps >= 5 and step.eager_steps == 1
    torch.testing.assert_close(torch.tensor(graphed_losses), torch.tensor(eager_losses), rtol=2e-3, atol=0)
    for (name, a), b in zip(reference.named_parameters(), graphed.parameters()):
        torch.testing.assert_close(b.float(), a.float(), rtol=2e-2, atol=1e-3,
                                   msg=lambda text, name=name: f"{name}: {text}")


def test_paths_that_read_back_to_the_host_are_refused():
    model = kernel_sized_hybrid(seed=8).to("cuda")  # fp32: attention takes the per-segment path, not capturable
    enable_packed_sequences(model)
    with pytest.raises(ValueError, match="varlen"):
        GraphedTrainStep(model, capturable_adamw(model.parameters(), 1e-3, torch.device("cuda")), token_loss_sum,
                         rows=2, tokens_per_row=64, max_segments=8, max_grad_norm=1.0)
