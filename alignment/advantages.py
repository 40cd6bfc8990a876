"""GRPO numerics: group-relative advantages and the clipped token-level policy loss.

Plain tensor code, shapes in the comments. `tests/test_grpo.py` checks each function against a hand-computed
example and a slow per-element loop. The per-token log-probs the loss takes are in `alignment.token_logprobs`.

Conventions: P prompts, G completions per prompt, N completion tokens that carry loss in a (micro-)batch.
"""

from __future__ import annotations

import torch

IGNORE_INDEX = -100


def group_advantages(
    rewards: torch.Tensor, std_normalize: bool = True, leave_one_out: bool = True, eps: float = 1e-6
) -> torch.Tensor:
    """Advantage of each completion relative to the other completions of its prompt. [P, G] -> [P, G]

    leave_one_out: the baseline of completion i is the mean reward of the other G-1 completions (an unbiased
        baseline: it does not depend on the sample it scores), instead of the group mean including i. For 0/1
        rewards this only rescales the advantages by G / (G-1); it matters with std normalisation off.
    std_normalize: divide by the group's reward std (Bessel-corrected). This up-weights groups with rewards close
        together (almost all right or all wrong); off, an advantage is in reward units (Dr. GRPO's argument).
    A group whose rewards are all equal gets advantage 0 for every completion: it carries no learning signal,
    which is why dynamic sampling drops such groups before they cost a learner pass.
    """
    P, G = rewards.shape
    if G < 2:
        raise ValueError(f"group-relative advantages need at least 2 completions per prompt, got {G}")
    rewards = rewards.float()
    if leave_one_out:
        baseline = (rewards.sum(dim=1, keepdim=True) - rewards) / (G - 1)  # [P, G] mean of the others
    else:
        baseline = rewards.mean(dim=1, keepdim=True)  # [P, 1]
    advantages = rewards - baseline  # [P, G]
    if std_normalize:
        advantages = advantages / (rewards.std(dim=1, keepdim=True) + eps)  # [P, G]
    return advantages


def clipped_policy_loss(
    logps: torch.Tensor,
    old_logps: torch.Tensor,
    advantages: torch.Tensor,
    clip_low: float = 0.2,
    clip_high: float = 0.28,
    ref_logps: torch.Tensor | None = None,
    kl_coef: float = 0.0,
    is_weights: torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Per-token PPO-clip loss with asymmetric clipping, and an optional k3 KL penalty to a reference. [N] -> [N]

    All inputs are flat over the N loss tokens: `logps` under the current policy (with grad), `old_logps` under the
    policy that sampled the rollout batch, `advantages` of each token's completion, `ref_logps` under the reference.
    The caller sums the returned per-token losses and divides by the token count of the optimizer step: the
    token-level (DAPO) aggregation, where a long completion weighs by its length instead of being averaged first.

    `is_weights` [N] (no grad) multiply each token's policy loss: truncated importance sampling, the learner's old
    probability over the sampler's, capped, for a sampler whose numerics differ from the learner's.

    The ratio is clipped to [1 - clip_low, 1 + clip_high]. The higher upper bound ("clip-higher") leaves room to
    raise the probability of unlikely tokens that turned out good, which keeps exploration (entropy) from collapsing.

    Returns (loss [N], stats) with stats: `clipped_low` / `clipped_high` (tokens where the clip bound is active),
    `approx_kl_old` (k3 estimate of KL(old || new) from the old policy's samples, how far the updates moved), `kl_ref` (k3 KL to the reference).
    """
    log_ratio = logps - old_logps  # [N]
    ratio = torch.exp(log_ratio)  # [N]
    unclipped = ratio * advantages  # [N]
    clipped = torch.clamp(ratio, 1 - clip_low, 1 + clip_high) * advantages  # [N]
    loss = -torch.minimum(unclipped, clipped)  # [N] pessimistic bound
    if is_weights is not None:
        loss = loss * is_weights
    with torch.no_grad():
        stats = {
            # The bound is active where it changed the minimum: below 1 - low for A < 0, above 1 + high for A > 0.
            "clipped_low": ((ratio < 1 - clip_low) & (advantages < 0)).float(),
            "clipped_high": ((ratio > 1 + clip_high) & (advantages > 0)).float(),
            # k3 of KL(old || new) for tokens sampled from old: E_old[ratio - 1 - log ratio], >= 0 per token.
            "approx_kl_old": ratio - 1 - log_ratio,
        }
        if is_weights is not None:
            stats["tis_weight"] = is_weights
    if ref_logps is not None and kl_coef:
        # k3 estimator of KL(policy || ref): unbiased, always >= 0, low variance (Schulman's "approximating KL").
        log_ref_ratio = ref_logps - logps  # [N]
        kl = torch.exp(log_ref_ratio) - log_ref_ratio - 1  # [N]
        loss = loss + kl_coef * kl
        stats["kl_ref"] = kl.detach()
    return loss, stats
