"""Budget-controlled generation: the budget rule on a scripted model, the cache path on a tiny NemotronH."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch
from torch import nn
from transformers import NemotronHConfig, NemotronHForCausalLM

from alignment.rollout.generation import (
    GenerationResult, GenerationSettings, decode_attention_backends, generate, line_end_token_ids,
)

# Token ids of the scripted vocabulary.
PAD, EOS, THINK, CLOSE, NL = 0, 1, 2, 3, 4
A, B, C, D = 5, 6, 7, 8  # plain words
VOCAB = 32


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny models decode faster on one thread than with the intra-op thread pool's overhead."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# --- a scripted model: exact control over what is "sampled" -------------------------------------------------------


class ScriptedCache:
    """Remembers every token fed per row, with its attention mask."""

    def __init__(self, input_ids: torch.Tensor, attention_mask: torch.Tensor):
        self.input_ids, self.attention_mask = input_ids, attention_mask  # [B, T]

    def append(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> None:
        self.input_ids = torch.cat([self.input_ids, input_ids], dim=1)
        assert attention_mask.shape == self.input_ids.shape, "the mask must cover the cache plus the new tokens"
        self.attention_mask = attention_mask

    def reorder_cache(self, rows: torch.Tensor) -> None:
        self.input_ids, self.attention_mask = self.input_ids[rows], self.attention_mask[rows]


class ScriptedModel(nn.Module):
    """Writes a fixed trace, then, once the context holds `</think>`, a fixed answer.

    A prompt's first token names its script. The trace position counts tokens after the `<think>\\n` prefill; the
    answer position counts tokens after the last `</think>` (prefilled, written or forced), like a real model that
    answers once its thinking is closed. Past the end of a script it writes `A` (trace) or EOS (answer).
    """

    def __init__(self, scripts: dict[int, tuple[list[int], list[int]]]):
        super().__init__()
        self.scripts = scripts
        self.anchor = nn.Parameter(torch.zeros(1))  # gives the model a device

    def next_token(self, context: list[int]) -> int:
        trace, answer = self.scripts[context[0]]
        if CLOSE in context:
            k = len(context) - 1 - max(i for i, t in enumerate(context) if t == CLOSE)
            return answer[k] if k < len(answer) else EOS
        k = len(context) - (context.index(THINK) + 2)
        return trace[k] if k < len(trace) else A

    def forward(self, input_ids, attention_mask, position_ids, past_key_values=None, use_cache=True, logits_to_keep=0):
        if past_key_values is None:
            past_key_values = ScriptedCache(input_ids, attention_mask)
        else:
            past_key_values.append(input_ids, attention_mask)
        ids, mask = past_key_values.input_ids, past_key_values.attention_mask
        assert torch.equal(position_ids[:, -1], mask.sum(dim=1) - 1), "positions must skip the left padding"
        logits = torch.zeros(len(ids), 1, VOCAB)
        for row in range(len(ids)):
            logits[row, 0, self.next_token(ids[row][mask[row] == 1].tolist())] = 1.0
        return SimpleNamespace(logits=logits, past_key_values=past_key_values)


def on_prompt(script_id: int) -> list[int]:
    return [script_id, B, C, THINK, NL]  # reasoning on: ends with the `<think>\n` prefill


def off_prompt(script_id: int) -> list[int]:
    return [script_id, C, THINK, CLOSE]  # reasoning off: ends with `<think></think>`


def settings(**overrides) -> GenerationSettings:
    fields = dict(
        max_new_tokens=40, eos_token_ids=[EOS], pad_token_id=PAD, think_end_ids=[CLOSE], line_end_ids={NL},
        grace_tokens=None, grace_fraction=None, batch_size=4,
    )  # fmt: skip
    return GenerationSettings(**(fields | overrides))


ANSWER = [NL, C, D, EOS]


def run_one(trace: list[int], budget: int | None, reasoning: bool = True, **overrides) -> GenerationResult:
    model = ScriptedModel({10: (trace, ANSWER)})
    prompt = on_prompt(10) if reasoning else off_prompt(10)
    return generate(model, [prompt], settings=settings(**overrides), budgets=[budget], reasoning=[reasoning])[0]


def forced_at(result: GenerationResult) -> list[int]:
    return [i for i, forced in enumerate(result.forced_mask) if forced]


def test_cut_at_the_next_newline_within_grace():
    r = run_one([A, B, A, B, A, NL, B, B], budget=3, grace_tokens=5)
    assert r.tokens == [A, B, A, B, A, NL, CLOSE, *ANSWER]
    assert forced_at(r) == [6]
    assert (r.thinking_tokens, r.forced_close, r.finished) == (6, True, True)


def test_newline_as_the_budget_token_cuts_at_once_and_earlier_newlines_do_not():
    r = run_one([NL, A, NL, B, B], budget=3, grace_tokens=5)
    assert r.tokens == [NL, A, NL, CLOSE, *ANSWER]
    assert r.thinking_tokens == 3


def test_hard_cut_when_no_newline_comes_within_grace():
    r = run_one([A, B, A, B, A, B, NL], budget=3, grace_tokens=2)
    assert r.tokens == [A, B, A, B, A, CLOSE, *ANSWER]
    assert forced_at(r) == [5]
    assert (r.thinking_tokens, r.forced_close) == (5, True)


def test_no_grace_cuts_exactly_at_the_budget():
    r = run_one([A, B, A, B, NL], budget=2)
    assert r.tokens == [A, B, CLOSE, *ANSWER]
    assert r.thinking_tokens == 2


def test_grace_as_a_fraction_of_the_budget():
    # budget 10, 29% -> 2 grace tokens (2.9 rounded down): a newline at trace token 12 still counts ...
    r = run_one([A] * 11 + [NL, B], budget=10, grace_fraction=0.29)
    assert r.tokens == [A] * 11 + [NL, CLOSE, *ANSWER]
    # ... one at trace token 13 comes too late.
    r = run_one([A] * 12 + [NL, B], budget=10, grace_fraction=0.29)
    assert r.tokens == [A] * 12 + [CLOSE, *ANSWER]
    assert r.thinking_tokens == 12


def test_grace_tokens_override_the_fraction():
    r = run_one([A] * 8, budget=4, grace_tokens=1, grace_fraction=0.5)
    assert r.thinking_tokens == 5


def test_model_closing_before_the_budget_is_not_forced():
    r = run_one([A, NL, B, CLOSE], budget=5, grace_tokens=1)
    assert r.tokens == [A, NL, B, CLOSE, *ANSWER]
    assert forced_at(r) == []
    assert (r.thinking_tokens, r.forced_close, r.finished) == (3, False, True)


def test_budget_zero_forces_the_close_first_and_answers_like_reasoning_off():
    r = run_one([A, NL, B], budget=0, grace_tokens=5)
    assert r.tokens == [CLOSE, *ANSWER]
    assert forced_at(r) == [0]
    assert (r.thinking_tokens, r.forced_close) == (0, True)
    off = run_one([A, NL, B], budget=None, reasoning=False)
    assert r.tokens[1:] == off.tokens  # same answer after `</think>`: an empty trace


def test_reasoning_off_is_never_forced():
    for budget in (None, 0, 1):
        r = run_one([A, NL], budget=budget, reasoning=False)
        assert r.tokens == ANSWER
        assert forced_at(r) == [] and not r.forced_close
        assert r.thinking_tokens == 0


def test_unlimited_budget_thinks_until_the_model_closes():
    r = run_one([A] * 30 + [CLOSE], budget=None)
    assert r.tokens == [A] * 30 + [CLOSE, *ANSWER]
    assert (r.thinking_tokens, r.forced_close) == (30, False)


def test_multi_token_close_marker_is_forced_whole_and_detected_whole():
    r = run_one([A, A, A, A], budget=2, think_end_ids=[NL, CLOSE])
    assert r.tokens[:4] == [A, A, NL, CLOSE]
    assert forced_at(r) == [2, 3]
    assert r.thinking_tokens == 2
    r = run_one([A, NL, CLOSE, B], budget=5, think_end_ids=[NL, CLOSE])
    assert r.tokens[:3] == [A, NL, CLOSE]
    assert forced_at(r) == [] and r.thinking_tokens == 1


def test_max_new_tokens_truncates_and_eos_in_the_trace_finishes():
    r = run_one([A] * 50, budget=None, max_new_tokens=7)
    assert r.tokens == [A] * 7 and not r.finished
    r = run_one([A] * 3, budget=3, max_new_tokens=4)  # cut in the middle of the answer
    assert r.tokens == [A, A, A, CLOSE] and r.forced_close and not r.finished
    r = run_one([A, EOS], budget=5)
    assert r.tokens == [A, EOS] and r.finished and r.thinking_tokens == 1


def test_scripted_batch_matches_one_by_one():
    traces = {
        10: [A, B, NL, A],
        11: [A] * 9 + [CLOSE],
        12: [A, NL, A, A, A, A, A, NL],
        13: [B, B, B, CLOSE],
        14: [A] * 20,
        15: [A],
    }
    model = ScriptedModel({k: (t, [NL] + [C] * (k - 9) + [EOS]) for k, t in traces.items()})
    prompts = [on_prompt(10), off_prompt(11)[:2] + on_prompt(11), on_prompt(12), off_prompt(13), on_prompt(14)]
    prompts.append([15, A, A, A, A, A, A, THINK, NL])  # the longest prompt
    budgets = [2, None, 1, 3, 0, 4]
    reasoning = [True, True, True, False, True, True]
    config = settings(grace_tokens=3, batch_size=6, max_new_tokens=15)
    batch = generate(model, prompts, settings=config, budgets=budgets, reasoning=reasoning)
    for i, got in enumerate(batch):
        alone = generate(model, [prompts[i]], settings=config, budgets=[budgets[i]], reasoning=[reasoning[i]])
        assert got == alone[0], f"sample {i}"
    assert [r.forced_close for r in batch] == [True, False, True, False, True, True]


def test_line_end_token_ids_from_a_tokenizer():
    class Tokenizer:
        texts = ["a", "\n", "b\n", "\n\n", "c"]

        def __len__(self) -> int:
            return len(self.texts)

        def decode(self, ids: list[int]) -> str:
            return self.texts[ids[0]]

    tokenizer = Tokenizer()
    assert line_end_token_ids(tokenizer) == {1, 2, 3}


def test_settings_are_validated():
    with pytest.raises(ValueError):
        settings(max_new_tokens=0)
    with pytest.raises(ValueError):
        settings(top_p=0.0)
    with pytest.raises(ValueError, match="think_end_ids"):
        generate(ScriptedModel({}), [on_prompt(10)], settings=settings(think_end_ids=[]), budgets=[3])


# --- a real tiny NemotronH: batching and the hybrid cache ---------------------------------------------------------

TINY_EOS = [1, 2, 3]
TINY_CLOSE = 4


@pytest.fixture(scope="module")
def tiny_model() -> NemotronHForCausalLM:
    """Random NemotronH with a Mamba layer after the attention layer, so padding leaking there would show."""
    torch.manual_seed(0)
    config = NemotronHConfig(
        vocab_size=100, hidden_size=64, hybrid_override_pattern="M-M*-M-", num_attention_heads=4, num_key_value_heads=2,
        head_dim=16, intermediate_size=128, mamba_num_heads=4, mamba_head_dim=16, n_groups=1, ssm_state_size=16,
        chunk_size=8, conv_kernel=4, pad_token_id=0, eos_token_id=TINY_EOS[0],
    )  # fmt: skip
    return NemotronHForCausalLM(config).float().eval()


def tiny_settings(**overrides) -> GenerationSettings:
    fields = dict(
        max_new_tokens=24, eos_token_ids=TINY_EOS, pad_token_id=0, think_end_ids=[TINY_CLOSE],
        line_end_ids=set(range(10, 20)), grace_tokens=3, grace_fraction=None, batch_size=16,
    )  # fmt: skip
    return GenerationSettings(**(fields | overrides))


def tiny_prompts(n: int, seed: int = 1) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(3, 20, (n,), generator=g).tolist()  # mixed lengths: chunked Mamba prefill + padding
    return [torch.randint(5, 100, (length,), generator=g).tolist() for length in lengths]


MIXED_BUDGETS = [None, 0, 2, 5, 10, None, 3, 1, 8, 0, None, 4]
MIXED_REASONING = [True, True, True, True, True, False, False, True, True, False, True, True]


@pytest.mark.parametrize("decode", ["dynamic", "static"])
def test_tiny_batch_with_mixed_budgets_and_modes_matches_one_by_one(tiny_model, decode):
    """A batch on either decode path against one-by-one generation on transformers' dynamic cache."""
    prompts, config = tiny_prompts(len(MIXED_BUDGETS)), tiny_settings()
    batch = generate(tiny_model, prompts, settings=tiny_settings(decode=decode), budgets=MIXED_BUDGETS,
                     reasoning=MIXED_REASONING)
    for i, got in enumerate(batch):
        budget, reasoning = [MIXED_BUDGETS[i]], [MIXED_REASONING[i]]
        alone = generate(tiny_model, [prompts[i]], settings=config, budgets=budget, reasoning=reasoning)
        assert got == alone[0], f"sample {i}"
    # The batch exercised what it should: forced and unforced closes, early finishers leaving the batch.
    assert {r.forced_close for r in batch} == {True, False}
    assert {r.finished for r in batch} == {True, False}


@pytest.mark.parametrize("decode", ["dynamic", "static"])
def test_tiny_cache_path_matches_a_full_forward_reference(tiny_model, decode):
    """Slow reference: no cache, the whole sequence through the model at every step, greedy choice compared."""
    prompts, config = tiny_prompts(len(MIXED_BUDGETS)), tiny_settings(batch_size=6, decode=decode)
    results = generate(tiny_model, prompts, settings=config, budgets=MIXED_BUDGETS, reasoning=MIXED_REASONING)
    for prompt, result in zip(prompts[:6], results[:6]):
        sequence = prompt + result.tokens
        with torch.no_grad():
            logits = tiny_model(input_ids=torch.tensor([sequence])).logits[0]  # [T, V]: no cache, no padding
        greedy = logits[len(prompt) - 1 : -1].argmax(dim=-1).tolist()  # the choice before each generated token
        for t, (token, forced) in enumerate(zip(result.tokens, result.forced_mask)):
            if not forced:
                assert token == greedy[t], f"token {t}"


def test_tiny_sampling_is_seeded_and_top_p_near_zero_is_greedy(tiny_model):
    prompts = tiny_prompts(4, seed=2)
    sampled = tiny_settings(temperature=0.8, top_p=0.9)
    first = generate(tiny_model, prompts, settings=sampled, budgets=[4] * 4, seed=7)
    assert first == generate(tiny_model, prompts, settings=sampled, budgets=[4] * 4, seed=7)
    assert first != generate(tiny_model, prompts, settings=sampled, budgets=[4] * 4, seed=8)
    nucleus_of_one = generate(tiny_model, prompts, settings=tiny_settings(temperature=1.0, top_p=1e-6), seed=3)
    assert nucleus_of_one == generate(tiny_model, prompts, settings=tiny_settings())


def full_forward_logprobs(model, prompt: list[int], result: GenerationResult, temperature: float) -> torch.Tensor:
    """Slow reference: log-softmax at `temperature` of a no-cache forward, at each generated token. [N]"""
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([prompt + result.tokens])).logits[0, len(prompt) - 1 : -1]  # [N, V]
    logps = torch.log_softmax(logits.float() / temperature, dim=-1)
    return logps.gather(-1, torch.tensor(result.tokens)[:, None]).squeeze(-1)


@pytest.mark.parametrize("decode", ["dynamic", "static"])
def test_sampler_logprobs_are_the_sampling_distribution_at_each_token(tiny_model, decode):
    prompts = tiny_prompts(len(MIXED_BUDGETS), seed=3)
    config = tiny_settings(temperature=0.7, decode=decode, batch_size=6)
    results = generate(tiny_model, prompts, settings=config, budgets=MIXED_BUDGETS, reasoning=MIXED_REASONING, seed=1)
    assert any(any(r.forced_mask) for r in results)
    for prompt, result in zip(prompts, results):
        assert len(result.logprobs) == len(result.tokens)
        sampled = torch.tensor([not f for f in result.forced_mask])
        got = torch.tensor(result.logprobs)
        assert torch.isnan(got[~sampled]).all(), "forced tokens were not sampled: no sampler log-prob"
        want = full_forward_logprobs(tiny_model, prompt, result, temperature=0.7)
        torch.testing.assert_close(got[sampled], want[sampled], atol=1e-4, rtol=0)


def test_sampler_logprobs_under_top_p_are_of_the_renormalised_nucleus(tiny_model):
    prompts = tiny_prompts(6, seed=4)
    results = generate(tiny_model, prompts, settings=tiny_settings(temperature=1.0, top_p=0.5), seed=2)
    raised = 0
    for prompt, result in zip(prompts, results):
        full = full_forward_logprobs(tiny_model, prompt, result, temperature=1.0)
        got = torch.tensor(result.logprobs)
        # p / (nucleus mass): the mass is in [0.5, 1], so the log-prob rises by at most ln 2 and never falls.
        assert (got >= full - 1e-5).all() and (got <= full + math.log(2) + 1e-4).all()
        raised += int((got > full + 1e-3).sum())
    assert raised > 0, "renormalised over the nucleus, not the full softmax's probability"
    one = generate(tiny_model, prompts, settings=tiny_settings(temperature=1.0, top_p=1e-6), seed=2)
    assert all(lp == 0.0 for r in one for lp in r.logprobs)  # a nucleus of one token has probability 1


def test_decoding_on_cuda_leaves_cudnn_attention_out_and_restores_it():
    # cuDNN plans every new key length (one per decode step); generation must not pick it, and must not change the
    # caller's backend choice for the rest of the program.
    before = torch.backends.cuda.cudnn_sdp_enabled()
    with decode_attention_backends(torch.device("cuda")):
        assert not torch.backends.cuda.cudnn_sdp_enabled()
        assert torch.backends.cuda.flash_sdp_enabled() and torch.backends.cuda.mem_efficient_sdp_enabled()
    assert torch.backends.cuda.cudnn_sdp_enabled() == before
    with decode_attention_backends(torch.device("cpu")):
        assert torch.backends.cuda.cudnn_sdp_enabled() == before


# --- the static decode path (preallocated caches; a CUDA graph on GPU) -------------------------------------------


@pytest.mark.parametrize("groups", [1, 2])
def test_static_steps_match_transformers_dynamic_cache_logits(tiny_model, groups):
    """Step by step from one left-padded prefill, both paths fed the same tokens, rows leaving on the way (a middle
    row, then the first), with one and with two Mamba groups."""
    from alignment.rollout.generation import _DynamicDecoder
    from alignment.rollout.static_decode import StaticDecoder, static_max_len

    model = tiny_model
    if groups > 1:
        torch.manual_seed(0)
        model = NemotronHForCausalLM(NemotronHConfig(**{**tiny_model.config.to_dict(), "n_groups": groups})).eval()
        assert model.model.layers[0].mixer.n_groups == groups
    prompts = tiny_prompts(5, seed=4)
    width = max(map(len, prompts))
    input_ids = torch.zeros(5, width, dtype=torch.long)
    mask = torch.zeros(5, width, dtype=torch.long)
    for row, prompt in enumerate(prompts):
        input_ids[row, width - len(prompt) :], mask[row, width - len(prompt) :] = torch.tensor(prompt), 1
    positions = (mask.cumsum(-1) - 1).clamp(min=0)

    def prefill():
        return model(input_ids=input_ids, attention_mask=mask, position_ids=positions, use_cache=True)

    with torch.no_grad():
        dynamic = _DynamicDecoder(model, prefill().past_key_values, mask, positions)
        static = StaticDecoder(model, 5, static_max_len(width, 30), use_graph=False)
        static.start(prefill().past_key_values, mask)
        g = torch.Generator().manual_seed(0)
        rows = 5
        for step in range(30):
            keep = list(range(rows))
            if step == 10:
                keep.remove(2)  # indices are into the rows still decoding, not the original batch
            if step == 20:
                keep.remove(0)
            rows = len(keep)
            tokens = torch.randint(5, 100, (rows,), generator=g).tolist()
            expected, got = dynamic.next(tokens, keep), static.next(tokens, keep)
            assert got.shape == expected.shape == (rows, 100)
            torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5,
                                       msg=lambda text, step=step: f"step {step}: {text}")


def test_static_decoding_with_sampling_consumes_the_generator_like_dynamic(tiny_model):
    prompts, sampled = tiny_prompts(6, seed=5), dict(temperature=1.0, top_p=0.95)
    dynamic = generate(tiny_model, prompts, settings=tiny_settings(**sampled), budgets=[4] * 6, seed=11)
    static = generate(tiny_model, prompts, settings=tiny_settings(decode="static", **sampled), budgets=[4] * 6, seed=11)
    assert static == dynamic


def test_static_decoding_is_refused_where_it_cannot_run(tiny_model):
    with pytest.raises(ValueError, match="no NemotronH blocks"):
        generate(ScriptedModel({}), [on_prompt(10)], settings=settings(decode="static"))
    with pytest.raises(ValueError, match="CUDA device"):
        generate(tiny_model, tiny_prompts(1), settings=tiny_settings(decode="cuda-graph"))
    with pytest.raises(ValueError, match="decode must be one of"):
        tiny_settings(decode="fast")


def test_static_buffers_leave_room_for_every_new_token_and_the_warm_up(tiny_model):
    from alignment.rollout.static_decode import WARMUP_STEPS, StaticDecoder, static_max_len

    for width in range(1, 130):  # around the rounding to 64 positions
        assert static_max_len(width, 1) >= width + 1 + WARMUP_STEPS
    mask = torch.ones(2, 10, dtype=torch.long)
    with torch.no_grad():
        cache = tiny_model(input_ids=torch.full((2, 10), 7), attention_mask=mask, use_cache=True).past_key_values
    with pytest.raises(ValueError, match="does not fit"):  # warm-up steps would write past the buffers
        StaticDecoder(tiny_model, 2, 10 + WARMUP_STEPS, use_graph=False).start(cache, mask)


def cuda_tiny_model() -> NemotronHForCausalLM:
    """A float32 tiny hybrid on the GPU whose widths the CUDA kernels accept."""
    torch.manual_seed(0)
    config = NemotronHConfig(  # the causal-conv1d kernels want the projection width a multiple of 8: 128 + 160 + 8
        vocab_size=100, hidden_size=64, hybrid_override_pattern="M-M*-M-", num_attention_heads=4, num_key_value_heads=2,
        head_dim=16, intermediate_size=128, mamba_num_heads=8, mamba_head_dim=16, n_groups=1, ssm_state_size=16,
        chunk_size=8, conv_kernel=4, pad_token_id=0, eos_token_id=TINY_EOS[0],
    )  # fmt: skip
    return NemotronHForCausalLM(config).float().eval().to("cuda")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_graph_decoding_matches_dynamic_on_gpu():
    """The captured step replays the eager static step: same greedy tokens as transformers' dynamic cache path,
    with the kernels the device has (mamba-ssm / causal-conv1d when installed), over two batch shapes."""
    model = cuda_tiny_model()
    prompts = tiny_prompts(len(MIXED_BUDGETS))
    runs = {
        decode: generate(model, prompts, settings=tiny_settings(decode=decode, batch_size=5),
                         budgets=MIXED_BUDGETS, reasoning=MIXED_REASONING)
        for decode in ("dynamic", "static", "cuda-graph", "continuous")  # continuous: slots refilled, graph replayed
    }
    assert runs["cuda-graph"] == runs["dynamic"]
    assert runs["static"] == runs["dynamic"]
    assert runs["continuous"] == runs["dynamic"]
    assert {r.finished for r in runs["dynamic"]} == {True, False}  # rows left the batch on the way


def test_static_decoding_runs_the_lora_adapters(tiny_model):
    """Under peft the static step calls the adapted projections: same tokens as the dynamic path, not the base's."""
    import copy

    from alignment.lora import LoraConfig, apply_lora

    adapted = apply_lora(copy.deepcopy(tiny_model), LoraConfig(enabled=True, r=4))
    torch.manual_seed(1)
    with torch.no_grad():
        for name, param in adapted.named_parameters():
            if "lora_B" in name:  # zero at init: make the adapters change the outputs
                param.normal_(std=0.5)
    prompts = tiny_prompts(6, seed=6)
    dynamic = generate(adapted, prompts, settings=tiny_settings(decode="dynamic"), budgets=[4] * 6)
    assert generate(adapted, prompts, settings=tiny_settings(decode="static"), budgets=[4] * 6) == dynamic
    assert generate(tiny_model, prompts, settings=tiny_settings(decode="static"), budgets=[4] * 6) != dynamic
