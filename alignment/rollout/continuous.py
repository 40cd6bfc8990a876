"""Continuous batching for long, long-tailed rollouts: decode slots refilled as samples finish, one prefill per prompt.

`generate(..., settings=GenerationSettings(decode="continuous"))` comes here. The static decoder's step
(alignment/rollout/static_decode.py, a CUDA graph on CUDA) runs over `settings.batch_size` slots. The loop, per step:

1. every occupied slot draws its next token from its logits (the prefill's for a slot filled since the last step)
   and applies the budget rule (`_Sample.step`, the same code as every other path);
2. slots whose sample is done are parked;
3. one decode step feeds every slot its token (a filler for parked ones);
4. parked slots are filled from the waiting samples: their distinct prompts are prefilled together by the model's
   own forward, and each prompt's states are copied into the slots of all its samples. A prompt's prefill is kept
   until its last sample is admitted, so a GRPO group or a DPO mining set costs one prefill instead of G, however
   its samples are spread over refills;
5. once nothing waits and at most half the slots hold a sample, the samples left move to a decoder of fewer slots
   (the next power of two that holds them, at least `MIN_SLOTS`; `StaticDecoder.moved_to`). Long-tailed lengths
   leave a few long samples running after the rest, and a step's cost grows with its rows (every slot's Mamba
   states are read and written), so the tail runs on a smaller step instead of one of mostly parked slots.

Step 4 comes after step 3, so a fresh slot's states are never advanced by a filler token.

Sampling is keyed per sample: `generate` gives sample i of a call with seed s its own uniforms,
`sample_uniforms(s, i, max_new_tokens)`, and the token at position t is drawn with the t-th, so a sample's tokens do
not depend on which samples share the slots or when it was admitted. `tests/test_rollout_engine.py` checks every
sample against the same sample generated alone on transformers' dynamic cache.
"""

from __future__ import annotations

import logging
from collections import Counter, deque
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from alignment.rollout.generation import GenerationSettings, _Sample, draw, prefill, ssm_state_dtype
from alignment.rollout.static_decode import StaticDecoder

log = logging.getLogger(__name__)

FILLER_TOKEN = 0  # fed to parked slots; their outputs are never read
MIN_SLOTS = 4  # the tail's decoders shrink no further (each size is one more graph to capture)


@dataclass
class EngineStats:
    """What one call did: how much prefill forking saved and how full the slots were."""

    samples: int = 0
    prefills: int = 0  # model forwards that prefilled prompts
    prompts_prefilled: int = 0  # distinct prompts run through those forwards (samples - this: prefills saved)
    decode_steps: int = 0
    slot_steps: int = 0  # sum over decode steps of the step's slots (rows computed)
    occupied_slot_steps: int = 0  # sum over decode steps of slots holding an unfinished sample
    moves: int = 0  # times the samples left moved to a decoder of fewer slots

    def occupancy(self) -> float:
        return self.occupied_slot_steps / max(1, self.slot_steps)


def smaller_slots(live: int, slots: int) -> int | None:
    """Slots for the `live` samples left once nothing waits: a power of two at most half of `slots`, or None."""
    size = max(MIN_SLOTS, 1 << max(0, live - 1).bit_length())
    return size if size <= slots // 2 else None


@torch.inference_mode()
def generate_continuous(
    model: nn.Module,
    samples: list[_Sample],
    settings: GenerationSettings,
    *,
    max_len: int,
    use_graph: bool,
    on_done: Callable[[int], object] | None = None,
) -> EngineStats:
    """Decode `samples` (in this order of admission) over `settings.batch_size` slots. Fills each sample's state.

    `max_len`: positions of a slot's KV buffer (longest prompt + max_new_tokens, see static_max_len). `on_done(k)` is
    told when k more samples have finished (a progress bar).
    """
    slots = min(settings.batch_size, len(samples))
    stats = EngineStats(samples=len(samples))
    if not samples:
        return stats
    if any(sample.uniforms is None for sample in samples):
        raise ValueError("every sample needs its own draws (sample_uniforms) before continuous batching")
    decoder = StaticDecoder(model, slots, max_len, use_graph=use_graph,
                            ssm_state_dtype=ssm_state_dtype(settings, model))
    waiting = deque(samples)
    holder: list[_Sample | None] = [None] * slots  # slot -> its sample
    fresh: dict[int, torch.Tensor] = {}  # slot -> the prefill's logits [V], for a slot filled since the last step
    step_logits: torch.Tensor | None = None  # [slots, V] of the last decode step

    # A prompt's prefill is kept while samples of it still wait, so a group admitted over several refills still
    # runs its prompt through the model once. prefix: prompt -> (prefill id, row, logits [V]); prefills: id -> output.
    waiting_of = Counter(tuple(sample.prompt) for sample in samples)
    prefix: dict[tuple[int, ...], tuple[int, int, torch.Tensor]] = {}
    prefills: dict[int, tuple[object, torch.Tensor]] = {}  # id -> (cache, mask)

    def fill(free: list[int]) -> None:
        admitted = [waiting.popleft() for _ in range(min(len(free), len(waiting)))]
        if not admitted:
            return
        keys = [tuple(sample.prompt) for sample in admitted]
        new = list(dict.fromkeys(k for k in keys if k not in prefix))  # distinct, in order
        if new:
            logits, cache, mask = prefill(model, [list(k) for k in new], settings.pad_token_id)
            prefills[stats.prefills] = (cache, mask)
            prefix.update({key: (stats.prefills, row, logits[row]) for row, key in enumerate(new)})
            stats.prefills += 1
            stats.prompts_prefilled += len(new)
        loads: dict[int, tuple[list[int], list[int]]] = {}  # prefill id -> (its rows, their slots)
        for sample, key in zip(admitted, keys):
            source, row, logits_row = prefix[key]
            slot = free.pop(0)
            holder[slot], fresh[slot] = sample, logits_row
            rows, targets = loads.setdefault(source, ([], []))
            rows.append(row)
            targets.append(slot)
            waiting_of[key] -= 1
        for source, (rows, targets) in loads.items():
            decoder.load_slots(*prefills[source], rows, targets)
        for key in [k for k in prefix if waiting_of[k] == 0]:  # no sample of it left to admit
            del prefix[key]
        for source in set(prefills) - {source for source, _, _ in prefix.values()}:
            del prefills[source]

    fill(list(range(slots)))
    while True:
        occupied = [slot for slot in range(slots) if holder[slot] is not None]
        if not occupied:
            return stats
        if fresh:
            logits = torch.stack([fresh.pop(slot) if slot in fresh else step_logits[slot] for slot in occupied])
        elif len(occupied) == slots:
            logits = step_logits
        else:
            logits = step_logits[torch.tensor(occupied, device=step_logits.device)]
        choice, choice_logprob = draw(logits, [holder[slot] for slot in occupied], settings, None)
        fed = [FILLER_TOKEN] * slots
        parked = []
        for slot, token, logprob in zip(occupied, choice.tolist(), choice_logprob.tolist()):
            sample = holder[slot]
            fed[slot] = sample.step(token, logprob)
            if sample.done:
                holder[slot] = None
                parked.append(slot)
        if parked:
            decoder.free_slots(parked)
            if on_done is not None:
                on_done(len(parked))
        if any(sample is not None for sample in holder):
            step_logits = decoder.step_slots(fed)
            stats.decode_steps += 1
            stats.slot_steps += slots
            stats.occupied_slot_steps += sum(sample is not None for sample in holder)
        free = [slot for slot in range(slots) if holder[slot] is None]
        if free and waiting:
            fill(free)
        elif not waiting and not fresh and step_logits is not None:
            live = [slot for slot in range(slots) if holder[slot] is not None]
            size = smaller_slots(len(live), slots) if live else None
            if size is not None:  # the tail: the samples left move to a smaller step
                decoder = decoder.moved_to(live, size)
                step_logits = step_logits[torch.tensor(live, device=step_logits.device)]
                holder = [holder[slot] for slot in live] + [None] * (size - len(live))
                slots = size
                stats.moves += 1
