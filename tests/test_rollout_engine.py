"""Continuous batching (alignment/rollout/continuous.py) against each sample generated alone on transformers' dynamic cache.

Few slots and many samples, so slots are refilled many times; repeated prompts, so prefills are shared; mixed budgets
and reasoning modes, so forced closes happen in refilled slots. Greedy and seeded sampling.
"""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch

from alignment.rollout.generation import (
    GenerationSettings, _generate_batch, _Sample, generate, next_tokens_from_uniforms, sample_uniforms,
)  # fmt: skip
from alignment.rollout.continuous import generate_continuous
from alignment.rollout.static_decode import static_max_len
from tests.test_generation import (  # noqa: F401
    MIXED_BUDGETS, MIXED_REASONING, cuda_tiny_model, tiny_model, tiny_prompts, tiny_settings,
)  # fmt: skip


def alone(model, prompt, budget, reasoning, settings: GenerationSettings, uniforms=None):
    """The slow obvious reference: one sample, transformers' forward and dynamic cache, its own draws if given."""
    sample = _Sample(prompt, budget, reasoning, settings)
    sample.uniforms = uniforms
    _generate_batch(model, [sample], settings, torch.Generator().manual_seed(0))
    return sample.result()


@pytest.mark.parametrize("slots", [1, 3, 16], ids=["one slot", "three slots", "all at once"])
def test_greedy_refilled_slots_match_each_sample_alone(tiny_model, slots):
    prompts, reference = tiny_prompts(len(MIXED_BUDGETS)), tiny_settings()
    got = generate(tiny_model, prompts, settings=tiny_settings(decode="continuous", batch_size=slots),
                   budgets=MIXED_BUDGETS, reasoning=MIXED_REASONING)
    for i, result in enumerate(got):
        want = alone(tiny_model, prompts[i], MIXED_BUDGETS[i], MIXED_REASONING[i], reference)
        assert result == want, f"sample {i}"
        torch.testing.assert_close(torch.tensor(result.logprobs), torch.tensor(want.logprobs), equal_nan=True)
    assert {r.forced_close for r in got} == {True, False} and {r.finished for r in got} == {True, False}


def test_seeded_sampling_does_not_depend_on_the_slots_or_the_batching(tiny_model):
    prompts = tiny_prompts(len(MIXED_BUDGETS), seed=4)
    sampled = dict(temperature=0.9, top_p=0.95)
    runs = [generate(tiny_model, prompts, settings=tiny_settings(decode="continuous", batch_size=slots, **sampled),
                     budgets=MIXED_BUDGETS, reasoning=MIXED_REASONING, seed=11) for slots in (2, 5)]
    assert runs[0] == runs[1]
    reference = tiny_settings(**sampled)
    for i, result in enumerate(runs[0]):
        draws = sample_uniforms(11, i, reference.max_new_tokens)
        want = alone(tiny_model, prompts[i], MIXED_BUDGETS[i], MIXED_REASONING[i], reference, draws)
        assert result == want, f"sample {i}"
        torch.testing.assert_close(torch.tensor(result.logprobs), torch.tensor(want.logprobs), equal_nan=True)
    other_seed = generate(tiny_model, prompts, settings=tiny_settings(decode="continuous", batch_size=2, **sampled),
                          budgets=MIXED_BUDGETS, reasoning=MIXED_REASONING, seed=12)
    assert other_seed != runs[0]


def test_a_group_shares_one_prefill_and_its_samples_still_differ(tiny_model):
    distinct, group = tiny_prompts(3, seed=5), 4
    prompts = [p for p in distinct for _ in range(group)]  # as GRPO asks: each prompt G times
    settings = tiny_settings(decode="continuous", batch_size=8, temperature=1.0)
    samples = [_Sample(p, None, True, settings) for p in prompts]
    for i, sample in enumerate(samples):
        sample.uniforms = sample_uniforms(3, i, settings.max_new_tokens)
    max_len = static_max_len(max(map(len, prompts)), settings.max_new_tokens)
    stats = generate_continuous(tiny_model, samples, settings, max_len=max_len, use_graph=False)
    assert stats.prompts_prefilled == len(distinct) and stats.samples == len(prompts)
    assert stats.prefills <= len(distinct)  # forwards: at most one per distinct prompt, fewer when batched
    for i, sample in enumerate(samples):
        want = alone(tiny_model, prompts[i], None, True, tiny_settings(temperature=1.0), sample.uniforms)
        assert sample.result() == want, f"sample {i}"
    first_group = [tuple(s.tokens) for s in samples[:group]]
    assert len(set(first_group)) > 1  # one prefill, G different samples


def test_the_tail_moves_to_fewer_slots_and_every_sample_still_matches_alone(tiny_model):
    """12 samples in 12 slots, mixed budgets and lengths: as they finish, the rest move to 4 slots."""
    check_tail_moves(tiny_model, use_graph=False)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_the_tail_moves_to_smaller_captured_graphs_on_gpu():
    """The same on CUDA: each smaller decoder is captured anew, with the states, KV and positions moved into it."""
    check_tail_moves(cuda_tiny_model(), use_graph=True)


def check_tail_moves(model, use_graph: bool):
    prompts = tiny_prompts(len(MIXED_BUDGETS), seed=7)
    settings = tiny_settings(decode="continuous", batch_size=len(prompts), temperature=1.0)
    lengths = [24, 3, 5, 8, 2, 20, 4, 6, 3, 2, 24, 7]  # each sample's max_new_tokens: a long tail
    samples = [_Sample(p, b, r, dataclasses.replace(settings, max_new_tokens=n))
               for p, b, r, n in zip(prompts, MIXED_BUDGETS, MIXED_REASONING, lengths)]
    for i, sample in enumerate(samples):
        sample.uniforms = sample_uniforms(5, i, settings.max_new_tokens)
    max_len = static_max_len(max(map(len, prompts)), settings.max_new_tokens)
    stats = generate_continuous(model, samples, settings, max_len=max_len, use_graph=use_graph)
    assert stats.moves >= 1 and stats.slot_steps < stats.decode_steps * len(prompts)
    for i, sample in enumerate(samples):
        own = tiny_settings(temperature=1.0, max_new_tokens=lengths[i])
        want = alone(model, prompts[i], MIXED_BUDGETS[i], MIXED_REASONING[i], own, sample.uniforms)
        assert sample.result() == want, f"sample {i}"
        # On CUDA the batched and the one-row forwards may reduce in different orders (cuBLAS picks per shape).
        tolerance = dict(rtol=1e-4, atol=1e-4) if use_graph else {}
        torch.testing.assert_close(torch.tensor(sample.result().logprobs), torch.tensor(want.logprobs), equal_nan=True,
                                   **tolerance)


def test_moved_slots_step_as_they_would_have_in_place(tiny_model):
    from alignment.rollout.generation import prefill
    from alignment.rollout.static_decode import StaticDecoder

    prompts = tiny_prompts(4, seed=8)
    _, cache, mask = prefill(tiny_model, prompts, 0)
    with torch.inference_mode():
        decoder = StaticDecoder(tiny_model, 4, 64, use_graph=False)
        decoder.load_slots(cache, mask, [0, 1, 2, 3], [0, 1, 2, 3])
        decoder.step_slots([5, 6, 7, 8])
        moved = decoder.moved_to([2, 0], 4)  # rows 2 and 3 of the new one parked
        assert not moved.valid[2:].any() and (moved.position[2:] == 0).all()
        assert torch.equal(moved.position[:2], decoder.position[[2, 0]])
        in_place = torch.stack([decoder.step_slots([9, 0, 10, 0])[[2, 0]] for _ in range(3)])
        after_move = torch.stack([moved.step_slots([10, 9, 0, 0])[:2] for _ in range(3)])
    torch.testing.assert_close(after_move, in_place, rtol=1e-5, atol=1e-5)


def test_the_tail_shrinks_by_powers_of_two_down_to_a_floor():
    from alignment.rollout.continuous import MIN_SLOTS, smaller_slots

    assert MIN_SLOTS == 4
    assert [smaller_slots(live, 256) for live in (1, 3, 5, 64, 100, 128, 129)] == [4, 4, 8, 64, 128, 128, None]
    assert smaller_slots(2, 8) == 4 and smaller_slots(3, 7) is None and smaller_slots(1, 5) is None


def test_uniform_draws_follow_the_sampling_distribution():
    logits = torch.tensor([[2.0, 1.0, 0.0, -1.0, -8.0]])
    settings = GenerationSettings(temperature=1.0, top_p=0.9)
    probs = torch.softmax(logits, -1)[0]
    nucleus = probs.clone()
    nucleus[3:] = 0  # 0.64 + 0.24 = 0.88 < 0.9, so the third token is the last one in
    nucleus /= nucleus.sum()
    draws = torch.rand(20000, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    choice, logprob = next_tokens_from_uniforms(logits.expand(len(draws), -1), settings, draws)
    frequency = torch.bincount(choice, minlength=5).double() / len(draws)
    assert frequency[3:].sum() == 0  # outside the nucleus: never drawn
    standard_error = (nucleus * (1 - nucleus) / len(draws)).sqrt()
    assert ((frequency - nucleus).abs() <= 5 * standard_error + 1e-12).all(), (frequency, nucleus)
    torch.testing.assert_close(logprob, nucleus.log()[choice].float())
    ends = torch.tensor([0.0, 1 - 1e-12], dtype=torch.float64)
    edges, _ = next_tokens_from_uniforms(logits.expand(2, -1), settings, ends)
    assert edges.tolist() == [0, 2]  # the ends of [0, 1) land on the first and the last token with mass


def test_streams_are_distinct_per_sample_and_fixed_per_seed():
    a, b = sample_uniforms(1, 0, 8), sample_uniforms(1, 1, 8)
    assert not torch.equal(a, b) and torch.equal(a, sample_uniforms(1, 0, 8))
    assert not torch.equal(a, sample_uniforms(2, 0, 8))
    assert ((a >= 0) & (a < 1)).all() and not math.isnan(float(a.sum()))


def test_continuous_batching_is_refused_where_the_static_step_cannot_run():
    from torch import nn

    class NotAHybrid(nn.Module):
        def __init__(self):
            super().__init__()
            self.weight = nn.Parameter(torch.zeros(1))

    with pytest.raises(ValueError, match="decode='continuous'"):
        generate(NotAHybrid(), [[5, 6]], settings=tiny_settings(decode="continuous"))


def test_the_ssm_state_is_float32_by_default_and_the_models_dtype_on_request(tiny_model):
    import copy

    from alignment.rollout.generation import prefill
    from alignment.rollout.static_decode import MAMBA_BLOCKS, StaticDecoder

    prompts = tiny_prompts(4, seed=6)
    half = copy.deepcopy(tiny_model).to(torch.bfloat16)
    _, cache, mask = prefill(half, prompts[:2], 0)
    for wanted in (torch.float32, torch.bfloat16):  # the prefill cache holds float32 either way
        decoder = StaticDecoder(half, 2, 64, use_graph=False, ssm_state_dtype=wanted)
        decoder.load_slots(cache, mask, [0, 1], [1, 0])
        mamba = [state for block, state in zip(decoder.blocks, decoder.states) if block.block_type in MAMBA_BLOCKS]
        assert mamba and all(ssm.dtype == wanted and conv.dtype == torch.bfloat16 for conv, ssm in mamba)
        assert torch.isfinite(decoder.step_slots([5, 6])).all()
    assert tiny_settings().ssm_state_dtype == "float32"
    for decode in ("static", "continuous"):  # in a float32 model the option changes nothing
        kept = generate(tiny_model, prompts, settings=tiny_settings(decode=decode, ssm_state_dtype="model"))
        assert kept == generate(tiny_model, prompts, settings=tiny_settings(decode=decode))
    short = tiny_settings(max_new_tokens=4)
    with pytest.raises(ValueError, match="needs a static decode path"):
        generate(half, prompts, settings=dataclasses.replace(short, decode="dynamic", ssm_state_dtype="model"))
    # auto on the CPU: the static step, where a bf16 state can be kept; the same tokens as asking for it
    auto = generate(half, prompts, settings=dataclasses.replace(short, ssm_state_dtype="model"))
    assert auto == generate(half, prompts, settings=dataclasses.replace(short, decode="static", ssm_state_dtype="model"))
