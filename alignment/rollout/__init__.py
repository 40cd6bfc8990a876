"""The rollout engine: budget-aware generation for evaluation, DPO pair mining and GRPO rollouts.

Every stage calls `generate(model, tokenizer, prompts, settings)` and gets a `GenerationResult` per sample; which
engine runs behind it is `settings.decode`:

- `generation`: the interface, the thinking-budget rule per sample, sampling and its log-probs, the dynamic-cache
  path (transformers' forward and cache, the slow obvious reference);
- `static_decode`: the decode step on caches at fixed addresses, replayed as a CUDA graph on GPU;
- `continuous`: continuous batching over that step, slots refilled as samples finish, one prefill per prompt.
"""

from alignment.rollout.generation import GenerationResult, GenerationSettings, generate

__all__ = ["GenerationResult", "GenerationSettings", "generate"]
