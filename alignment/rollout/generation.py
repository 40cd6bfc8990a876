"""Budget-controlled batched generation for reasoning models.

Used by evaluation, preference mining and RL rollouts. Prompts arrive rendered and tokenized by the chat template:
a reasoning-on prompt ends with the `<think>\\n` prefill, a reasoning-off prompt with `<think></think>`.

The thinking budget rule (the model card's rule, with a configurable grace window):

- A reasoning-on sample with budget B thinks freely until it has written B trace tokens. From then on the trace is
  closed as soon as the last trace token ends a line (that can be the B-th token itself), and at the latest after
  B + grace trace tokens. Closing means feeding `settings.think_end_ids` to the model as forced tokens; the model
  then writes the answer until an end-of-turn token or `max_new_tokens`.
- A sample that writes `think_end_ids` on its own before that is in answer mode; nothing is forced.
- Budget None means unlimited. Budget 0 forces the close before any trace token: the output starts with the forced
  `think_end_ids`, `thinking_tokens` is 0, and the full text reads `<think>\\n</think>` + answer, the format of a
  reasoning-off answer (`<think></think>` + answer) with an empty trace.
- Reasoning-off samples are never forced; their budget is ignored.
- An end-of-turn token ends a sample wherever it comes, also inside the trace (the sample then has no answer).

Forced tokens go through the model like sampled ones, so the cache (attention KV and Mamba conv/SSM states) always
matches the returned tokens. `forced_mask` marks them: they were not sampled by the policy, and RL must not train on
them as if they were.

Each sampled token's log-prob under the distribution it was drawn from (temperature applied, renormalised over the
nucleus when `top_p` < 1; at temperature 0 the plain softmax) is returned in `logprobs`, so a learner can measure how
far its own recomputed log-probs are from the sampler's (different kernels, a CUDA graph, bf16 decode numerics).
"""

from __future__ import annotations

import contextlib
import inspect
import logging
import math
from collections.abc import Collection
from dataclasses import dataclass, field

import torch
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel
from tqdm.auto import tqdm

from alignment.rollout.static_decode import StaticDecoder, static_decode_unsupported, static_max_len

log = logging.getLogger(__name__)


DECODE_PATHS = {
    "auto": "cuda-graph on CUDA when the model supports it, dynamic otherwise",
    "dynamic": "transformers' forward and growing cache per step; finished rows leave the batch",
    "static": "preallocated caches, the step written against the model's modules (alignment/rollout/static_decode.py)",
    "cuda-graph": "the static step captured once per batch shape and replayed (CUDA only)",
    "continuous": "continuous batching: batch_size slots refilled as samples finish, one prefill per distinct prompt, "
                  "the static step (a CUDA graph on CUDA); sampling keyed per sample (alignment/rollout/continuous.py)",
}
DECODE_HELP = (
    "Decode path: auto (a CUDA graph on GPU where the model allows), dynamic, static, cuda-graph, or continuous "
    "(slots refilled as samples finish, one prefill per prompt; alignment/rollout/continuous.py)."
)
SSM_STATE_HELP = (
    "Mamba SSM state between decode steps: float32 (what transformers' cache holds and NVIDIA recommends) or model "
    "(the model's dtype, bf16 on GPU: half the state bytes a decode step reads and writes; a static decode path)."
)
SSM_STATE_DTYPES = ("float32", "model")


def check_decode_keys(decode: str, ssm_state_dtype: str) -> None:
    """Refuse an unknown decode path or SSM state dtype (a config's loader adds the section to the key)."""
    if decode not in DECODE_PATHS:
        raise ValueError(f"decode must be one of {list(DECODE_PATHS)}, got {decode!r}")
    if ssm_state_dtype not in SSM_STATE_DTYPES:
        raise ValueError(f"ssm_state_dtype must be one of {list(SSM_STATE_DTYPES)}, got {ssm_state_dtype!r}")


@dataclass
class GenerationSettings:
    """How to decode. Token ids come from the tokenizer of the model being sampled."""

    max_new_tokens: int = 256  # most tokens generated per sample, forced tokens included
    temperature: float = 0.0  # 0 means greedy
    top_p: float = 1.0  # nucleus sampling mass; 1.0 keeps the whole distribution
    eos_token_ids: list[int] = field(default_factory=list)  # tokens that end a sample (end of turn)
    pad_token_id: int = 0  # fills the left padding of a batch; never attended to
    think_end_ids: list[int] = field(default_factory=list)  # forced to close a trace, e.g. the ids of `</think>`
    line_end_ids: Collection[int] = field(default_factory=frozenset)  # tokens that end a line: see line_end_token_ids
    grace_tokens: int | None = None  # grace window after the budget, in tokens; overrides grace_fraction when set
    grace_fraction: float | None = 0.1  # grace window as a fraction of the budget, rounded down; None: no grace
    batch_size: int = 32  # samples decoded together
    progress: bool = False  # show a progress bar over samples
    decode: str = "auto"  # decode path, see DECODE_PATHS; auto: cuda-graph on CUDA where the model allows, else dynamic
    # Mamba SSM state between decode steps: "float32" as transformers' cache holds it (NVIDIA's recommendation for
    # these models), or "model", the model's dtype (bf16 on GPU: a step reads and writes half the state bytes).
    ssm_state_dtype: str = "float32"

    def __post_init__(self) -> None:
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be at least 1, got {self.max_new_tokens}")
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if (self.grace_tokens or 0) < 0 or (self.grace_fraction or 0) < 0:
            raise ValueError("the grace window must not be negative")
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, got {self.batch_size}")
        check_decode_keys(self.decode, self.ssm_state_dtype)
        self.line_end_ids = frozenset(self.line_end_ids)

    def grace_window(self, budget: int) -> int:
        """Trace tokens allowed after `budget` while waiting for a line to end."""
        if self.grace_tokens is not None:
            return self.grace_tokens
        if self.grace_fraction is not None:
            return int(self.grace_fraction * budget)
        return 0


@dataclass
class GenerationResult:
    """One generated sample. `tokens` excludes the prompt and ends with the end-of-turn token when `finished`."""

    tokens: list[int]
    forced_mask: list[bool]  # aligned with `tokens`: True where the token was forced, not sampled
    # Aligned with `tokens`: the sampler's log-prob of each sampled token, NaN where forced. Not part of equality:
    # the same tokens decoded in another batch agree in their last bits only.
    logprobs: list[float] = field(compare=False)
    thinking_tokens: int  # trace tokens written before the close; the close marker and an EOS are not counted
    forced_close: bool  # the trace was closed by the budget rule
    finished: bool  # ended with an end-of-turn token; False when cut by max_new_tokens


def line_end_token_ids(tokenizer) -> frozenset[int]:
    """Ids of the tokens whose text contains a newline: the tokens that end a line for the grace rule.

    Works for byte-level BPE tokenizers, where a newline is often merged with other whitespace (`"\\n\\n"`, `".\\n"`).
    """
    return frozenset(i for i in range(len(tokenizer)) if "\n" in tokenizer.decode([i]))


class _Sample:
    """Decoding state of one sample: the tokens so far and the budget rule."""

    def __init__(self, prompt: list[int], budget: int | None, reasoning: bool, settings: GenerationSettings):
        if not prompt:
            raise ValueError("empty prompt")
        if budget is not None and budget < 0:
            raise ValueError(f"thinking budget must be >= 0 or None, got {budget}")
        self.prompt = prompt
        self.settings = settings
        self.in_trace = reasoning
        self.budget = budget if reasoning else None
        self.grace = settings.grace_window(budget) if self.budget is not None else 0
        self.tokens: list[int] = []
        self.forced_mask: list[bool] = []
        self.logprobs: list[float] = []
        self.pending: list[int] = []  # forced tokens still to feed
        self.thinking_tokens = 0
        self.forced_close = False
        self.finished = False
        self.done = False
        self.uniforms: torch.Tensor | None = None  # per-position draws when sampling is keyed per sample
        if self.budget is not None and not settings.think_end_ids:
            raise ValueError("a thinking budget needs settings.think_end_ids")
        if self.budget == 0:
            self.pending = list(settings.think_end_ids)

    def step(self, model_choice: int, choice_logprob: float) -> int:
        """Append the next token, the forced one if the budget rule demands it, else `model_choice` (sampled with
        log-prob `choice_logprob`); return it."""
        if self.pending:  # closing the trace: feed the forced marker
            token = self.pending.pop(0)
            self.tokens.append(token)
            self.forced_mask.append(True)
            self.logprobs.append(math.nan)
            self.forced_close = True
            self.in_trace = bool(self.pending)
        else:
            token = model_choice
            self.tokens.append(token)
            self.forced_mask.append(False)
            self.logprobs.append(choice_logprob)
            if token in self.settings.eos_token_ids:
                self.finished = True
            elif self.in_trace:
                self._trace_token(token)
        self.done = self.finished or len(self.tokens) >= self.settings.max_new_tokens
        return token

    def _trace_token(self, token: int) -> None:
        """Count a sampled trace token; schedule the forced close when the budget rule says so."""
        close = self.settings.think_end_ids
        self.thinking_tokens += 1
        if close and self.tokens[-len(close) :] == close:  # the model closed its trace itself
            self.in_trace = False
            self.thinking_tokens -= len(close)
        elif self.budget is not None and self.thinking_tokens >= self.budget:
            grace_over = self.thinking_tokens >= self.budget + self.grace
            if token in self.settings.line_end_ids or grace_over:
                self.pending = list(close)

    def result(self) -> GenerationResult:
        return GenerationResult(
            tokens=self.tokens,
            forced_mask=self.forced_mask,
            logprobs=self.logprobs,
            thinking_tokens=self.thinking_tokens,
            forced_close=self.forced_close,
            finished=self.finished,
        )


def draw(
    logits: torch.Tensor, samples: list[_Sample], settings: GenerationSettings, generator: torch.Generator | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """The next token of each sample (row of `logits`): from its own draws when it has them, else from `generator`."""
    if samples and samples[0].uniforms is not None:
        return next_tokens_from_uniforms(logits, settings, torch.stack([s.uniforms[len(s.tokens)] for s in samples]))
    return _next_tokens(logits, settings, generator)


def _greedy(logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    choice = logits.argmax(dim=-1)  # [B]
    return choice, torch.log_softmax(logits.float(), dim=-1).gather(-1, choice[:, None]).squeeze(-1)


def _sampling_distribution(logits: torch.Tensor, settings: GenerationSettings) -> torch.Tensor:
    """What a token is drawn from: softmax at the temperature, renormalised over the nucleus when top_p < 1. [B, V]"""
    probs = torch.softmax(logits.float() / settings.temperature, dim=-1)  # [B, V]
    if settings.top_p < 1:
        sorted_probs, order = probs.sort(dim=-1, descending=True)  # [B, V]
        # Keep the smallest prefix whose mass reaches top_p (the most likely token always stays).
        outside = sorted_probs.cumsum(dim=-1) - sorted_probs >= settings.top_p
        probs = torch.zeros_like(probs).scatter(-1, order, sorted_probs.masked_fill(outside, 0.0))
        probs = probs / probs.sum(dim=-1, keepdim=True)  # the nucleus, renormalised: what is sampled from
    return probs


def _next_tokens(
    logits: torch.Tensor, settings: GenerationSettings, generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """Pick one token per row and its log-prob under the distribution it was drawn from. [B, V] -> [B], [B]

    Greedy at temperature 0 (the log-prob is then the plain softmax's), else temperature + top-p sampling.
    """
    if settings.temperature == 0:
        return _greedy(logits)
    probs = _sampling_distribution(logits, settings)
    choice = torch.multinomial(probs, 1, generator=generator)  # [B, 1]
    return choice.squeeze(-1), probs.gather(-1, choice).log().squeeze(-1)


def next_tokens_from_uniforms(
    logits: torch.Tensor, settings: GenerationSettings, uniforms: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """`_next_tokens` with each row's draw given: the token where the row's CDF first exceeds its uniform in [0, 1).

    The same distribution as `torch.multinomial`, but a row's token depends on its own uniform only, not on which
    rows share the batch. [B, V], [B] float64 -> [B], [B]
    """
    if settings.temperature == 0:
        return _greedy(logits)
    probs = _sampling_distribution(logits, settings)
    cdf = probs.double().cumsum(dim=-1)  # [B, V]
    target = uniforms.to(cdf.device, torch.float64)[:, None] * cdf[:, -1:]
    choice = torch.searchsorted(cdf, target, right=True).clamp(max=probs.shape[-1] - 1)  # zero-mass tokens skipped
    return choice.squeeze(-1), probs.gather(-1, choice).log().squeeze(-1)


def sample_uniforms(seed: int, index: int, length: int) -> torch.Tensor:
    """The uniform draws of sample `index` of a call with `seed`: one per token position, float64 [length]."""
    mixed = (seed * 6364136223846793005 + (index + 1) * 1442695040888963407) % 2**64  # distinct streams per sample
    return torch.rand(length, generator=torch.Generator().manual_seed(mixed), dtype=torch.float64)


# cuDNN's SDPA builds an execution plan for every new key length, and decoding makes a new one every step: on an H200
# a [128, 16, 1, 64] bf16 masked call took 46 ms with a new length against 0.1 ms once planned, 0.16 ms with the other
# backends; our GRPO rollouts spent most of their time there. Decoding therefore leaves cuDNN out.
DECODE_SDPA_BACKENDS = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]


def decode_attention_backends(device: torch.device) -> contextlib.AbstractContextManager:
    """The SDPA backends generation may use on `device` (all but cuDNN on CUDA; unchanged elsewhere)."""
    return sdpa_kernel(DECODE_SDPA_BACKENDS) if device.type == "cuda" else contextlib.nullcontext()


class _DynamicDecoder:
    """Decode steps through transformers' forward and its cache (which grows each step); finished rows leave."""

    def __init__(self, model: nn.Module, cache, attention_mask: torch.Tensor, position_ids: torch.Tensor):
        self.model, self.cache, self.attention_mask = model, cache, attention_mask
        self.next_position = position_ids[:, -1] + 1  # [B]
        self.cache_keyword = cache_keyword(model)

    def next(self, tokens: list[int], keep: list[int]) -> torch.Tensor:
        """Feed `tokens` to the rows `keep` (indices into the rows still decoding); return their logits [len(keep), V]."""
        device = self.attention_mask.device
        if len(keep) < len(self.next_position):  # the others' states are untouched
            rows = torch.tensor(keep, device=device)
            self.cache.reorder_cache(rows)
            self.attention_mask, self.next_position = self.attention_mask[rows], self.next_position[rows]
        self.attention_mask = torch.cat([self.attention_mask, self.attention_mask.new_ones((len(keep), 1))], dim=-1)
        out = self.model(
            input_ids=torch.tensor(tokens, device=device)[:, None],  # [B, 1]
            attention_mask=self.attention_mask,  # [B, T+1]
            position_ids=self.next_position[:, None],  # [B, 1]
            **{self.cache_keyword: self.cache},
            use_cache=True,
            logits_to_keep=1,
        )
        self.next_position = self.next_position + 1
        return out.logits[:, -1, :]


def cache_keyword(model: nn.Module) -> str:
    """The forward argument that takes the cache: `cache` from transformers 5.2x on (where `past_key_values` is
    deprecated, with a warning per call), `past_key_values` before."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model  # a peft model forwards **kwargs
    return "cache" if "cache" in inspect.signature(type(base).forward).parameters else "past_key_values"


def prefill(model: nn.Module, prompts: list[list[int]], pad_token_id: int) -> tuple[torch.Tensor, object, torch.Tensor]:
    """Run `prompts` through the model together, left-padded: (last-position logits [n, V], cache, mask [n, width]).

    With use_cache and no cache given, the model builds its own: for NemotronH a DynamicCache(config) holding the
    attention KV and the Mamba conv/SSM states. The 2D mask zeroes the left padding before the Mamba mixers, so a
    padded row's states equal those of its prompt alone; attention masks the padding out.
    """
    device = next(model.parameters()).device
    width = max(len(p) for p in prompts)
    input_ids = torch.full((len(prompts), width), pad_token_id, dtype=torch.long)  # [n, T]
    attention_mask = torch.zeros((len(prompts), width), dtype=torch.long)  # [n, T]
    for row, prompt in enumerate(prompts):  # left padding: every row's next token lands in the last column
        input_ids[row, width - len(prompt) :] = torch.tensor(prompt)
        attention_mask[row, width - len(prompt) :] = 1
    input_ids, attention_mask = input_ids.to(device), attention_mask.to(device)
    position_ids = (attention_mask.cumsum(dim=-1) - 1).clamp(min=0)  # [n, T]
    out = model(
        input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, use_cache=True, logits_to_keep=1
    )
    return out.logits[:, -1, :], out.past_key_values, attention_mask


@torch.inference_mode()
def _generate_batch(
    model: nn.Module,
    samples: list[_Sample],
    settings: GenerationSettings,
    generator: torch.Generator,
    static: StaticDecoder | None = None,
) -> None:
    """Decode `samples` together, one token per step, with the model's cache. Fills each sample's state.

    `static`: a decoder for exactly this many rows, else transformers' dynamic cache is used.
    """
    logits, cache, attention_mask = prefill(model, [s.prompt for s in samples], settings.pad_token_id)  # [B, V]
    if static is not None:
        static.start(cache, attention_mask)  # copied into the decoder's buffers: the prefill cache can go
        decoder, cache = static, None
    else:
        position_ids = (attention_mask.cumsum(dim=-1) - 1).clamp(min=0)
        decoder = _DynamicDecoder(model, cache, attention_mask, position_ids)
    active = list(range(len(samples)))  # decoding row -> index into samples
    while True:
        choice, choice_logprob = draw(logits, [samples[i] for i in active], settings, generator)  # [B], [B]
        fed = [samples[i].step(c, lp) for i, c, lp in zip(active, choice.tolist(), choice_logprob.tolist())]
        keep = [row for row, i in enumerate(active) if not samples[i].done]
        if not keep:
            return
        active = [active[r] for r in keep]
        logits = decoder.next([fed[r] for r in keep], keep)


def ssm_state_dtype(settings: GenerationSettings, model: nn.Module) -> torch.dtype:
    """The static decoder's SSM state dtype for these settings and this model."""
    return torch.float32 if settings.ssm_state_dtype == "float32" else next(model.parameters()).dtype


def _decode_path(model: nn.Module, requested: str, device: torch.device, static_state: bool = False) -> str:
    """The decode path to use: `requested`, or for auto the fastest one this model and device allow (a static one
    when `static_state` asks for an SSM state that transformers' dynamic cache does not keep)."""
    if requested == "dynamic":  # works for every model: no need to walk its modules
        return requested
    unsupported = static_decode_unsupported(model)
    if requested == "auto" and static_state and device.type != "cuda" and unsupported is None:
        return "static"  # transformers' dynamic cache keeps the state in float32
    if requested == "auto":
        if device.type == "cuda" and unsupported:
            log.info("no CUDA-graph decoding for this model (%s): transformers' dynamic cache", unsupported)
        return "cuda-graph" if device.type == "cuda" and unsupported is None else "dynamic"
    if requested in ("static", "cuda-graph", "continuous") and unsupported:
        raise ValueError(f"decode={requested!r}: {unsupported}")
    if requested == "cuda-graph" and device.type != "cuda":
        raise ValueError(f"decode='cuda-graph' needs a CUDA device, the model is on {device}")
    return requested


def decode_for_workers(decode: str, key: str) -> str:
    """The decode path of a stage split over several workers: the continuous engine, whose per-sample random streams
    make every sample independent of the split. `auto` becomes it; another explicit path is refused, naming `key`."""
    if decode not in ("auto", "continuous"):
        raise ValueError(f"{key}={decode!r}: several workers sample with the continuous engine, whose per-sample "
                         "random streams make the samples independent of the split (auto or continuous)")
    return "continuous"


def generate(
    model: nn.Module,
    prompts: list[list[int]],
    *,
    settings: GenerationSettings,
    budgets: list[int | None] | None = None,
    reasoning: list[bool] | None = None,
    seed: int | None = None,
    stream_ids: list[int] | None = None,
) -> list[GenerationResult]:
    """Generate one completion per prompt, applying each sample's thinking budget (see the module docstring).

    `budgets[i]` is the thinking budget of prompt i (None: unlimited; default: all unlimited). `reasoning[i]` says
    whether prompt i ends with the reasoning-on prefill (default: all on). Samples are decoded in batches of
    `settings.batch_size`, grouped by prompt length; greedy results do not depend on the batching. With sampling,
    `seed` makes a call reproducible (same prompts, settings and batching). The continuous path draws sample i's
    tokens from its own random stream, number `stream_ids[i]` of the seed (default: i), whatever its slot: a caller
    that splits one batch over workers passes each sample's place in the whole batch, and the split changes nothing.
    """
    n = len(prompts)
    budgets = [None] * n if budgets is None else budgets
    reasoning = [True] * n if reasoning is None else reasoning
    stream_ids = list(range(n)) if stream_ids is None else stream_ids
    if len(budgets) != n or len(reasoning) != n or len(stream_ids) != n:
        raise ValueError(f"{n} prompts but {len(budgets)} budgets, {len(reasoning)} reasoning flags and "
                         f"{len(stream_ids)} stream ids")
    samples = [_Sample(p, b, r, settings) for p, b, r in zip(prompts, budgets, reasoning)]

    device = next(model.parameters()).device
    static_state = ssm_state_dtype(settings, model) != torch.float32  # the dynamic cache keeps float32
    path = _decode_path(model, settings.decode, device, static_state)
    if static_state and path == "dynamic":
        raise ValueError("ssm_state_dtype='model' needs a static decode path (static, cuda-graph or continuous) for "
                         "a model that is not float32: transformers' dynamic cache keeps the SSM state in float32")
    log.info("generating %d samples on %s (batch size %d, decode: %s%s)", n, device, settings.batch_size, path,
             ", SDPA without cuDNN" if device.type == "cuda" else "")
    max_len = static_max_len(max(map(len, prompts), default=0), settings.max_new_tokens)
    # One static decoder (buffers and graph) per call, rebuilt only for the smaller last batch. Not kept across calls:
    # a graph reads the parameters at their addresses, which a caller may replace between calls.
    static: StaticDecoder | None = None
    generator = torch.Generator(device=device)
    if seed is None:
        generator.seed()
    else:
        generator.manual_seed(seed)

    was_training = model.training
    model.eval()
    keys = [tuple(prompt) for prompt in prompts]
    first_seen = {}
    for i, key in enumerate(keys):
        first_seen.setdefault(key, i)
    # Similar lengths together (less padding), the samples of one prompt next to each other (one prefill for them).
    order = sorted(range(n), key=lambda i: (len(keys[i]), first_seen[keys[i]]))
    try:
        with decode_attention_backends(device), \
                tqdm(total=n, desc="generate", unit="sample", disable=not settings.progress) as bar:
            if path == "continuous":
                from alignment.rollout.continuous import generate_continuous  # it builds on this module

                base_seed = torch.Generator().seed() if seed is None else seed
                for sample, stream in zip(samples, stream_ids):  # keyed by the sample, not by its slot
                    sample.uniforms = sample_uniforms(base_seed, stream, settings.max_new_tokens)
                stats = generate_continuous(model, [samples[i] for i in order], settings, max_len=max_len,
                                            use_graph=device.type == "cuda", on_done=bar.update)
                log.info("continuous batching: %d samples, %d distinct prompts prefilled in %d forwards, %d decode "
                         "steps at %.0f%% slot occupancy, the tail moved to fewer slots %d times", stats.samples,
                         stats.prompts_prefilled, stats.prefills, stats.decode_steps, 100 * stats.occupancy(),
                         stats.moves)
                return [s.result() for s in samples]
            for start in range(0, n, settings.batch_size):
                batch = [samples[i] for i in order[start : start + settings.batch_size]]
                if path in ("static", "cuda-graph") and (static is None or static.batch_size != len(batch)):
                    static = None  # free the previous buffers and graph first
                    static = StaticDecoder(model, len(batch), max_len, use_graph=path == "cuda-graph",
                                           ssm_state_dtype=ssm_state_dtype(settings, model))
                _generate_batch(model, batch, settings, generator, static)
                bar.update(len(batch))
    finally:
        model.train(was_training)
    return [s.result() for s in samples]
