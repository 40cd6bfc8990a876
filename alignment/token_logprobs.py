"""Log-probs of target tokens: the numerics that SFT's loss, DPO's sequence log-probs and GRPO's ratios share.

Position t is scored against labels[t + 1] (the causal-LM shift); positions without a target (label -100) get 0.
SFT's loss is minus their sum, DPO sums them per sample, GRPO takes them per token at the sampling temperature.

Two paths give the same numbers:

- `token_logps(logits, labels)`: from the model's full logits [R, T, V]. The obvious reference, and the path of
  `loss_chunk_tokens: 0`. At a 131k-token vocabulary the logits, their float32 copy for the loss and its gradient
  cost ~1.3 MB per token: a 6144-token row needs ~8 GB for them alone.
- `chunked_token_logps(hidden, head, labels)`: from the final hidden states [R, T, H]. The LM head, the float32 cast
  and the log-softmax run on `chunk_tokens` tokens at a time, and backward recomputes each chunk
  (`torch.utils.checkpoint`), so one chunk's vocabulary-wide tensors are alive at a time, forward and backward.

`model_token_logps(model, batch, chunk_tokens)` runs a model on a collated batch and takes one path or the other.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from alignment.distributed import gather_objects
from alignment.packing import IGNORE_INDEX, model_inputs, per_sample_sums


def disable_dropout(model: torch.nn.Module) -> int:
    """Set every dropout of `model` (LoRA's included) to p=0; returns how many there were with p > 0.

    DPO and GRPO compare log-probs of one policy taken at different times (policy against reference, new against
    old): with dropout on, a pass with gradients and one without differ before any update, and the DPO loss at a
    round's start or GRPO's ratio at lr=0 would not be exact.
    """
    changed = 0
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout) and module.p > 0:
            module.p = 0.0
            changed += 1
    return changed


def describe_loss_path(chunk_tokens: int) -> str:
    """What the logs say about the path `chunk_tokens` selects."""
    return f"chunked log-softmax, {chunk_tokens} tokens per chunk" if chunk_tokens else "full logits"


def token_logps(logits: torch.Tensor, labels: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """Log-prob of every target token from full logits, at `temperature`. [R, T, V], [R, T] -> [R, T-1]

    Dividing by the temperature makes GRPO's ratio compare the distributions the completions were actually drawn
    from (top-p truncation aside, as everywhere else).
    """
    R, T, V = logits.shape
    targets = labels[:, 1:]  # [R, T-1]
    logits = logits[:, :-1].float() / temperature  # [R, T-1, V]
    # cross_entropy is the memory-light log_softmax + gather: it never materialises [R, T-1, V] log-probs twice.
    nll = F.cross_entropy(logits.reshape(-1, V), targets.reshape(-1), ignore_index=IGNORE_INDEX, reduction="none")
    return -nll.view(R, T - 1)  # [R, T-1]; 0 where there is no target


def per_sample_logps(logits: torch.Tensor, labels: torch.Tensor, sample_ids: torch.Tensor,
                     num_samples: int) -> tuple[torch.Tensor, torch.Tensor]:
    """`per_sample_sums` of `token_logps`: (logp_sum [N], num_targets [N]) of each collated sample from [R, T, V]."""
    return per_sample_sums(token_logps(logits, labels), labels, sample_ids, num_samples)


def _chunk_logps(head: torch.nn.Module, hidden: torch.Tensor, targets: torch.Tensor,
                 temperature: float) -> torch.Tensor:
    """[C, H], [C] -> [C]: the only place where vocabulary-wide tensors ([C, V]) exist on the chunked path."""
    logits = head(hidden).float()  # [C, V]
    if temperature != 1.0:
        logits = logits / temperature
    return -F.cross_entropy(logits, targets, ignore_index=IGNORE_INDEX, reduction="none")


def chunked_token_logps(hidden: torch.Tensor, head: torch.nn.Module, labels: torch.Tensor, temperature: float = 1.0,
                        chunk_tokens: int = 2048) -> torch.Tensor:
    """`token_logps(head(hidden), labels, temperature)` without the full logits. [R, T, H], [R, T] -> [R, T-1]

    `head` is called as a module, so LoRA on the LM head and ZeRO-3's parameter gathering apply as in the model's
    own forward. Under no_grad (old and reference log-probs) chunks are simply computed one after the other.
    """
    R, T, H = hidden.shape
    # Every position is scored against the label after it, the last one of a row against nothing: scoring all R * T
    # positions keeps `hidden` a view instead of copying hidden[:, :-1], at the price of one position per row.
    targets = F.pad(labels[:, 1:], (0, 1), value=IGNORE_INDEX).reshape(-1)  # [R * T]
    flat = hidden.reshape(-1, H)  # [R * T, H]
    parts = []
    for start in range(0, R * T, chunk_tokens):
        h, y = flat[start : start + chunk_tokens], targets[start : start + chunk_tokens]  # [C, H], [C]
        if torch.is_grad_enabled():
            parts.append(checkpoint(_chunk_logps, head, h, y, temperature, use_reentrant=False))
        else:
            parts.append(_chunk_logps(head, h, y, temperature))
    return torch.cat(parts).view(R, T)[:, :-1]  # [R, T-1]


def final_hidden_states(model, inputs: dict) -> tuple[torch.Tensor, torch.nn.Module]:
    """The final (normed) hidden states [R, T, H] of `model(**inputs)`, and the LM head that maps them to logits.

    The call goes through `model` itself, whatever wraps it (DDP, DeepSpeed, peft): a wrapper's forward does work
    the backward relies on (DDP arms its gradient all-reduce there), and the packed-sequence pre-hook of the
    backbone (`enable_packed_sequences`) runs as usual. Only an empty set of positions reaches the head
    (`logits_to_keep`); a forward hook on the decoder keeps its output.
    """
    inner = model
    while not hasattr(inner, "get_output_embeddings"):  # DDP and the ZeRO engine hold the model as `.module`
        inner = inner.module
    kept: list[torch.Tensor] = []
    hook = inner.get_decoder().register_forward_hook(lambda module, args, output: kept.append(output.last_hidden_state))
    try:
        model(**inputs, logits_to_keep=torch.zeros(0, dtype=torch.long, device=inputs["input_ids"].device))
    finally:
        hook.remove()
    return kept[-1], inner.get_output_embeddings()


def model_token_logps(model, batch: dict, chunk_tokens: int = 0, temperature: float = 1.0) -> torch.Tensor:
    """Log-prob of every target token of a collated batch under `model`. -> [R, T-1], 0 where there is no target.

    chunk_tokens: 0 takes the model's full logits; N > 0 applies the head and the log-softmax N tokens at a time.
    Labels stay out of the model call (transformers would compute a second, unused cross-entropy over the logits).
    """
    inputs = {k: v for k, v in model_inputs(batch).items() if k != "labels"}
    if not chunk_tokens:
        return token_logps(model(**inputs).logits, batch["labels"], temperature)
    hidden, head = final_hidden_states(model, inputs)
    return chunked_token_logps(hidden, head, batch["labels"], temperature, chunk_tokens)


def sampler_mismatch(learner: torch.Tensor, sampler: torch.Tensor) -> dict[str, float]:
    """How far the learner's log-probs of sampled tokens are from the sampler's own. [N], [N] -> statistics

    The two should agree up to float noise: the sampler is the policy before any update. A gap means the decode
    path (its kernels, a CUDA graph, bf16 numerics) is not the distribution the learner optimises, and every
    importance ratio is off by it. `kl_k3` is the k3 estimate of KL(sampler || learner) from the sampler's tokens.
    """
    if learner.numel() == 0:
        return {"mismatch_abs_mean": 0.0, "mismatch_abs_max": 0.0, "mismatch_kl_k3": 0.0}
    delta = (learner.float() - sampler.float())  # [N] log(learner / sampler)
    return {
        "mismatch_abs_mean": float(delta.abs().mean()),
        "mismatch_abs_max": float(delta.abs().max()),
        "mismatch_kl_k3": float((delta.exp() - 1 - delta).mean()),
    }


class MismatchMeter:
    """Collects learner and sampler log-probs of sampled tokens over batches; `stats()` summarises them."""

    def __init__(self) -> None:
        self.learner: list[torch.Tensor] = []
        self.sampler: list[torch.Tensor] = []

    def add(self, learner: torch.Tensor, sampler: torch.Tensor) -> None:
        """[N], [N] at the same tokens; tokens without a sampler log-prob (NaN: forced or not sampled) are skipped."""
        sampled = ~torch.isnan(sampler)
        self.learner.append(learner.detach()[sampled].float().cpu())
        self.sampler.append(sampler[sampled].float().cpu())

    def gather(self) -> None:
        """Collect every worker's tokens (a distributed run), so that `stats()` describes the whole batch."""
        empty = torch.zeros(0)
        everyone = gather_objects((torch.cat(self.learner or [empty]), torch.cat(self.sampler or [empty])))
        self.learner, self.sampler = [l for l, _ in everyone], [s for _, s in everyone]

    def stats(self) -> dict[str, float]:
        empty = torch.zeros(0)
        return sampler_mismatch(torch.cat(self.learner or [empty]), torch.cat(self.sampler or [empty]))
