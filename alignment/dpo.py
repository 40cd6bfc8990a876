"""DPO stage: preference optimisation from an SFT checkpoint, on a preference file or on pairs mined on-policy.

Reads top to bottom: build model and tokenizer, then for each of `rounds` rounds: get pairs (read a preference file,
or sample K completions per training prompt from the current policy, grade them with the reward plugins and keep
the clearest contrasts), score them under the reference, train on the DPO loss plus an SFT term on the chosen side,
measure preference accuracy on held-out pairs and task accuracy on the test split. Then keep the best round by
validation score (the start included; `selection`), and write the checkpoint.

    align dpo configs/tiny/dpo.yaml rounds=3 loss.beta=0.1 lora.enabled=true

The reference. Each round's reference is the policy the round starts from (iterative on-policy DPO: round r+1
samples from and is anchored to the result of round r). Its log-probs are computed once per round, before the first
update, so no second copy of the model is ever held: with full fine-tuning the weights are still the round-start
weights at that point; with LoRA they are taken with the adapters disabled (the base), and the adapters are merged
into the base at the end of each round so that the next round's base is this round's result.

The loss. TRL 1.16's `DPOTrainer` computes its losses inline in `DPOTrainer._compute_loss` (there is no standalone
loss function to call), batches pairs with its own padding collator (its `padding_free` mode is switched off in that
release) and patches a fused LM head into the model. None of that fits chosen/rejected rows packed with `seq_idx`
for the Mamba layers, nor pairs mined between rounds, so this stage computes the loss itself in `preference_loss`:
TRL's formulas for `sigmoid`, `ipo` (with TRL's per-token normalisation) and `hinge`, and TRL's `sft` term (mean
NLL of the chosen tokens) weighted by `sft_weight`. It is tested against a hand-computed example, and it is the one
place to change if the formulas are taken from TRL again.

Sequences. Chosen and rejected of a step go through the model together, packed into rows by
`SampleCollator(mode="packed")` after `enable_packed_sequences` (padded batches when the model has no correct packed
path); `per_sample_sums` of `model_token_logps` gives every sequence's summed log-prob, the LM head applied
`train.loss_chunk_tokens` tokens at a time so the full logits never exist. Mined completions are trained on exactly
the tokens that were sampled; tokens forced by the thinking-budget rule carry no loss, because the policy did not
choose them.
"""

from __future__ import annotations

import contextlib
import dataclasses
import gc
import json
import logging
import math
import random
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from alignment.activation_checkpointing import activation_checkpointing_status, enable_activation_checkpointing
from alignment.chat_format import (IGNORE_INDEX, STATE_BUDGET_HELP, budget_is_stated, check_state_budget,
                                   completion_text, encode_for_training, encode_prompt, state_budget, stop_token_ids,
                                   with_reasoning)
from alignment.checkpoint import read_manifest, save_model_checkpoint
from alignment.config import check_paths, option, to_dict
from alignment.data import fingerprint_files, read_rows, write_rows
from alignment.evaluate import EvalConfig, evaluate_model, judge, prompt_messages, run_cell, tool_episodes
from alignment.rollout.generation import (DECODE_HELP, SSM_STATE_HELP, GenerationSettings, check_decode_keys,
                                  decode_for_workers, generate, line_end_token_ids)
from alignment.modeling import ModelConfig, load_model, load_tokenizer
from alignment.packed_model import PackingNotSupportedError, enable_packed_sequences
from alignment.packing import SampleCollator, per_sample_sums
from alignment.distributed import all_reduce_max, broadcast_parameters, gather_objects, sum_gradients
from alignment.resume import (TrainState, resume_sharded_training, resume_training, run_fingerprint,
                              save_sharded_training_state, save_training_state)
from alignment.runtime import distributed_rank_world, pick_device, seed_everything, setup_logging
from alignment.lora import LoraConfig, apply_lora
from alignment.sft import learning_rate
from alignment.split_guard import guard_splits
from alignment.tool_mining import mine_tool_pairs
from alignment.token_logprobs import MismatchMeter, describe_loss_path, disable_dropout, model_token_logps
from alignment.trackers import TrackingConfig
from alignment.tracking import MetricsLogger
from alignment.zero import ZeroEngine, full_weight_settings
from data_recipes.preference import pair_to_row, read_pairs
from envs.answers import THINK_CLOSE, split_thinking
from rewards import RewardsConfig, close_scorers, score_batch
from rewards.scoring import check_reward_names

log = logging.getLogger(__name__)

LOSS_TYPES = ("sigmoid", "ipo", "hinge")


# ---------------------------------------------------------------------------------------------------------------
# Config
# ---------------------------------------------------------------------------------------------------------------


@dataclass
class PairsConfig:
    """Where preference pairs come from."""

    source: Literal["mined", "dataset"] = option(
        "mined", "mined: sample and grade completions from the current policy each round; dataset: a preference file."
    )
    dataset_path: str = option(
        "", "Preference JSONL for source=dataset, in any schema of data_recipes/preference.py.", path="file"
    )
    schema: Literal["auto", "prompt_messages", "conversations", "text", "hh"] = option(
        "auto", "Schema of dataset_path; auto recognises each row by its columns."
    )
    max_bad_fraction: float = option(0.01, "Stop when more than this fraction of the preference file is malformed.")
    heldout_fraction: float = option(0.2, "Fraction of prompts whose pairs are held out to measure preference accuracy.")
    max_seq_len: int = option(512, "Pairs with a side longer than this (tokens, prompt included) are dropped.")

    def validate(self) -> None:
        if self.source == "dataset" and not self.dataset_path:
            raise ValueError("dataset_path must be set when source is `dataset`")
        if not 0 <= self.heldout_fraction < 1:
            raise ValueError("heldout_fraction must be in [0, 1)")


@dataclass
class MiningConfig:
    """On-policy pair mining: K samples per prompt, graded by the reward plugins."""

    prompts_path: str = option(
        "runs/data/tiny/train.jsonl", "Prompt rows with reference answers; the train split, never the test split.",
        path="file",
    )
    prompts_per_round: int = option(128, "Prompts sampled per round (fresh prompts every round).")
    samples_per_prompt: int = option(4, "K: completions sampled per prompt.")
    temperature: float = option(1.0, "Sampling temperature (> 0: pairs need different completions).")
    top_p: float = option(1.0, "Nucleus sampling mass.")
    reasoning_off_fraction: float = option(
        0.1, "Fraction of prompts mined with reasoning off; the K samples of a prompt share its mode."
    )
    budgets: list = option(
        [None], "Thinking budgets (tokens) drawn per reasoning-on prompt; null means unlimited. Repeat to weight."
    )
    max_new_tokens: int = option(192, "Most tokens per completion.")
    max_answer_tokens: int = option(48, "A longer answer part is not well-formed (the tie-break prefers well-formed).")
    min_margin: float = option(0.5, "Keep a pair only when the chosen score beats the rejected one by at least this.")
    max_pairs_per_prompt: int = option(2, "Disjoint pairs per prompt: i-th best with i-th worst, while the margin holds.")
    batch_size: int = option(128, "Samples generated together (continuous: decode slots).")
    decode: str = option("auto", DECODE_HELP)
    ssm_state_dtype: str = option("float32", SSM_STATE_HELP)
    state_budget: str = option("auto", STATE_BUDGET_HELP)
    mismatch_warn_kl: float = option(
        0.01, "Warn when the k3 KL between the sampler's and the reference pass's log-probs of the mined tokens exceeds "
              "this (measured at temperature 1, top_p 1).",
    )
    rewards: RewardsConfig = option(
        RewardsConfig(mode="inprocess"), "Reward plugins that grade the samples (see rewards/config.py)."
    )
    tool_prompts_path: str = option(
        "", "Tool tasks (envs/tool_tasks.py rows) mined as K multi-turn episodes each in the tool environment: a "
            "successful episode paired with a failed one at the first turn where they differ "
            "(alignment/tool_mining.py). Empty: none.", path="file")
    tool_prompts_per_round: int = option(0, "Tool tasks mined per round, beside prompts_per_round math prompts.")
    tool_max_turns: int = option(4, "Most assistant turns of a mined tool episode.")

    def validate(self) -> None:
        if self.samples_per_prompt < 2:
            raise ValueError("samples_per_prompt must be at least 2 to form a pair")
        if self.temperature <= 0:
            raise ValueError("temperature must be > 0: greedy samples of one prompt are all the same")
        check_state_budget(self.state_budget)
        check_decode_keys(self.decode, self.ssm_state_dtype)
        if self.prompts_per_round < 1 or self.max_pairs_per_prompt < 1:
            raise ValueError("prompts_per_round and max_pairs_per_prompt must be at least 1")
        if not 0 <= self.reasoning_off_fraction <= 1:
            raise ValueError("reasoning_off_fraction must be in [0, 1]")
        if not self.budgets or any(b is not None and (not isinstance(b, int) or b < 0) for b in self.budgets):
            raise ValueError(f"budgets must be a non-empty list of non-negative integers or null, got {self.budgets}")


@dataclass
class LossConfig:
    """The preference loss."""

    loss_type: Literal["sigmoid", "ipo", "hinge"] = option("sigmoid", "sigmoid (DPO), ipo or hinge, as TRL defines them.")
    beta: float = option(0.05, "Strength of the pull towards the reference (Nemotron 3 DPO: 0.05).")
    sft_weight: float = option(0.2, "Weight of the NLL of the chosen side added to the loss (Nemotron 3 DPO: 0.2).")
    score_until: Literal["end", "divergent_line", "divergent_token"] = option(
        "end", "How much of each side the loss scores: all of it, or only up to the end of the line (step-level DPO) "
               "or the token where the two sides first differ. For reasoning pairs sampled from one policy: after a "
               "wrong step the rest of the rejected trace is often right given that step, and pushing it down "
               "teaches wrong steps. Keep `end` for pairs that differ throughout."
    )

    def validate(self) -> None:
        if self.beta <= 0 or self.sft_weight < 0:
            raise ValueError("beta must be > 0 and sft_weight >= 0")


@dataclass
class DPOTrainConfig:
    """Optimisation, per round."""

    max_steps: int = option(10, "Optimizer steps per round (about 3 passes over the tiny setup's mined pairs).")
    pairs_per_step: int = option(16, "Pairs per optimizer step (chosen and rejected go through the model together).")
    pairs_per_micro_batch: int = option(
        0, "Pairs per forward/backward (gradients accumulate over a step's micro-batches; with workers, per worker); "
           "0: a worker's whole share of the step in one.",
    )
    # A fresh AdamW moves every weight by about `lr` on its first steps whatever the gradient, so DPO needs a far
    # smaller rate than SFT: on the tiny model 1e-4 already broke the arithmetic (accuracy 0.27 -> 0.03 in a round).
    lr: float = option(2e-5, "Peak learning rate (real models: ~3e-6 full as Nemotron 3 DPO, ~5e-5 LoRA).")
    schedule: Literal["cosine", "wsd", "constant"] = option("cosine", "Learning-rate schedule after warmup.")
    warmup_steps: int = option(2, "Linear warmup steps (each round).")
    decay_fraction: float = option(0.2, "WSD: fraction of steps spent decaying at the end.")
    min_lr_ratio: float = option(0.1, "Final learning rate as a fraction of the peak (cosine and WSD).")
    weight_decay: float = option(0.0, "AdamW weight decay.")
    max_grad_norm: float = option(1.0, "Gradient clipping norm.")
    packing: bool = option(True, "Pack sequences into rows (falls back to padding when the model cannot pack).")
    max_tokens_per_row: int = option(1024, "Token budget of one packed row.")
    seed: int = option(0, "Seed for prompt choice, sampling and pair order.")
    log_every: int = option(5, "Log training metrics every this many steps.")
    loss_chunk_tokens: int = option(
        0,
        "Apply the LM head and the log-softmax this many tokens at a time, each chunk recomputed in backward, so the "
        "full [tokens, vocabulary] logits never exist (~1.3 MB per token at a 131k vocabulary). 0 (default): "
        "full logits, which a small vocabulary wants.",
    )
    activation_checkpointing: bool = option(
        False, "Recompute each decoder block's activations in backward instead of keeping them (long rows).",
    )
    deepspeed: str = option(
        "",
        "DeepSpeed JSON config (e.g. configs/deepspeed/zero3.json): shard full weights, gradients and AdamW states "
        "with ZeRO over the workers; mining, reference log-probs and evaluation gather the weights. Full weights "
        "only (LoRA trains data parallel). Empty: every worker holds the whole model.",
        path="file",
    )

    def validate(self) -> None:
        if self.max_steps < 1 or self.pairs_per_step < 1:
            raise ValueError("max_steps and pairs_per_step must be at least 1")
        if self.pairs_per_micro_batch < 0:
            raise ValueError("pairs_per_micro_batch must be >= 0 (0: a worker's whole share of a step)")
        if self.lr <= 0:
            raise ValueError("lr must be positive")
        if self.loss_chunk_tokens < 0:
            raise ValueError("loss_chunk_tokens must be >= 0 (0: full logits)")


@dataclass
class SelectionConfig:
    """Which round's policy the stage keeps."""

    validation_path: str = option(
        "", "Prompt rows (the validation split, never the test split) on which every round's policy and the start "
            "are scored (accuracy, reasoning on); the best is kept. Empty: keep the last round.",
        path="file",
    )
    max_samples: int = option(200, "Score on at most this many validation rows.")
    tool_validation_path: str = option(
        "", "Tool tasks of the validation split (tools_validation.jsonl), run as episodes with reasoning on: a "
            "policy's score is then the mean of its accuracy and its final-state success (the success alone when "
            "validation_path is empty), so a round that trades the tools for math, or math for the tools, can lose.",
        path="file",
    )
    min_gain: float = option(0.0, "A round replaces the best so far only when its score is higher by more than this.")


@dataclass
class DPOConfig:
    """Preference optimisation (DPO / IPO) from an SFT checkpoint."""

    model: ModelConfig = option(ModelConfig(name_or_path="runs/tiny/sft/checkpoint"), "SFT checkpoint to start from.")
    pairs: PairsConfig = option(PairsConfig(), "Pair source.")
    mining: MiningConfig = option(MiningConfig(), "On-policy mining (pairs.source=mined).")
    loss: LossConfig = option(LossConfig(), "Loss.")
    train: DPOTrainConfig = option(DPOTrainConfig(), "Optimisation.")
    lora: LoraConfig = option(LoraConfig(), "LoRA; the reference is then the base with adapters disabled.")
    eval: EvalConfig = option(
        EvalConfig(max_samples=100, budgets=[16, None]), "Task evaluation after every round (and at the start)."
    )
    rounds: int = option(2, "Rounds of get-pairs-then-train, each from the last policy.")
    save_rounds: bool = option(
        True, "Save a resumable state after every round but the last (the policy, round selection, RNG, records): "
              "a rerun of the same config continues with the next round.",
    )
    selection: SelectionConfig = option(SelectionConfig(), "Keep the best round (or the start) by its validation score.")
    evaluate_start: bool = option(True, "Evaluate the starting checkpoint too, so one run reports before and after.")
    output_dir: str = option("runs/tiny/dpo", "Run directory: checkpoint/, pairs/, metrics.jsonl, eval.json.")
    device: str = option("auto", "cpu, cuda, cuda:N or auto.")
    tracking: TrackingConfig = option(TrackingConfig(), "Experiment trackers: tensorboard, wandb, mlflow, trackio.")

    def validate(self) -> None:
        if self.rounds < 1:
            raise ValueError("rounds must be at least 1")
        if self.train.packing and self.train.max_tokens_per_row < self.pairs.max_seq_len:
            raise ValueError("train.max_tokens_per_row must be >= pairs.max_seq_len so no sequence is cut")
        test = Path(self.eval.test_path).resolve()
        if self.pairs.source == "mined" and Path(self.mining.prompts_path).resolve() == test:
            raise ValueError("mining.prompts_path is the evaluation's test split; mine from the train split")
        if self.selection.validation_path and Path(self.selection.validation_path).resolve() == test:
            raise ValueError("selection.validation_path is the evaluation's test split; select on the validation split")
        tool_test = self.eval.tool_test_path and Path(self.eval.tool_test_path).resolve()
        if self.selection.tool_validation_path and Path(self.selection.tool_validation_path).resolve() == tool_test:
            raise ValueError("selection.tool_validation_path is eval.tool_test_path; select on the validation split")
        if self.train.deepspeed and self.lora.enabled:
            raise ValueError("train.deepspeed shards full weights; with lora.enabled the adapters train data "
                             "parallel (leave train.deepspeed empty)")

    def unused_paths(self) -> tuple[str, ...]:
        """The input file the pair source leaves unread (`check_paths` skips it)."""
        return ("mining.prompts_path",) if self.pairs.source == "dataset" else ("pairs.dataset_path",)


# ---------------------------------------------------------------------------------------------------------------
# The loss
# ---------------------------------------------------------------------------------------------------------------


def preference_loss(
    chosen_logps: torch.Tensor,
    rejected_logps: torch.Tensor,
    ref_chosen_logps: torch.Tensor,
    ref_rejected_logps: torch.Tensor,
    chosen_tokens: torch.Tensor,
    rejected_tokens: torch.Tensor,
    loss_type: str = "sigmoid",
    beta: float = 0.05,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-pair loss and the implicit rewards beta * log(pi / ref) of both sides. All tensors [B].

    Log-probs are summed over each completion's target tokens; `*_tokens` are those token counts (IPO only).
        sigmoid: -log sigmoid(beta * delta),  delta = (logp_c - ref_c) - (logp_r - ref_r)
        hinge:   relu(1 - beta * delta)
        ipo:     (delta_per_token - 1 / (2 beta))^2, each side's log-ratio divided by its token count (TRL's form)
    At the start of a round policy == reference, so delta = 0 and the sigmoid loss is ln 2 for every pair.
    """
    chosen_logratios = chosen_logps - ref_chosen_logps  # [B]
    rejected_logratios = rejected_logps - ref_rejected_logps  # [B]
    if loss_type == "sigmoid":
        losses = -F.logsigmoid(beta * (chosen_logratios - rejected_logratios))
    elif loss_type == "hinge":
        losses = torch.relu(1 - beta * (chosen_logratios - rejected_logratios))
    elif loss_type == "ipo":
        delta = chosen_logratios / chosen_tokens.clamp(min=1) - rejected_logratios / rejected_tokens.clamp(min=1)
        losses = (delta - 1 / (2 * beta)) ** 2
    else:
        raise ValueError(f"loss_type must be one of {LOSS_TYPES}, got {loss_type!r}")
    return losses, beta * chosen_logratios.detach(), beta * rejected_logratios.detach()


# ---------------------------------------------------------------------------------------------------------------
# Pairs: from a file, or mined on-policy
# ---------------------------------------------------------------------------------------------------------------


def encode_pair(tokenizer, pair: dict) -> dict:
    """Token ids and labels of both sides of a message-form pair, through the chat template."""
    return {side: encode_for_training(tokenizer, pair["prompt"] + [pair[side]]) for side in ("chosen", "rejected")}


def until_divergence(encoded: dict, line_end_ids: frozenset[int] | None) -> dict:
    """Both sides' labels cut after the token where the two token sequences first differ, or after the end of that
    line when `line_end_ids` is given (see `LossConfig.score_until`). The shared prefix cancels in the preference
    margin, so what is left is each side's first differing token or step. Sides that never differ (one a prefix of
    the other) are kept whole."""
    chosen, rejected = encoded["chosen"]["input_ids"], encoded["rejected"]["input_ids"]
    first = next((t for t, (a, b) in enumerate(zip(chosen, rejected)) if a != b), None)
    if first is None:
        return encoded
    cut = {}
    for side, sample in encoded.items():
        ids = sample["input_ids"]
        end = first if line_end_ids is None else \
            next((t for t in range(first, len(ids)) if ids[t] in line_end_ids), len(ids) - 1)
        cut[side] = dict(sample, labels=sample["labels"][: end + 1] + [IGNORE_INDEX] * (len(ids) - end - 1))
    return cut


def select_pairs(candidates: list[dict], min_margin: float, max_pairs: int) -> list[tuple[int, int]]:
    """(chosen, rejected) indices among one prompt's samples, each {"score", "well_formed", "tokens", "text"}.

    Samples are ranked best first by score, then well-formed before ill-formed, then shorter before longer. The i-th
    best is paired with the i-th worst while the two are distinct and the score margin holds, so pairs are disjoint
    and the first pair has the widest margin. A prompt whose samples all score alike gives no pair.
    """
    order = sorted(range(len(candidates)),
                   key=lambda i: (-candidates[i]["score"], not candidates[i]["well_formed"], candidates[i]["tokens"], i))
    pairs = []
    for k in range(min(max_pairs, len(order) // 2)):
        best, worst = candidates[order[k]], candidates[order[-1 - k]]
        if best["score"] - worst["score"] < min_margin or best["text"] == worst["text"]:
            break
        pairs.append((order[k], order[-1 - k]))
    return pairs


def completion_message(text: str, reasoning: bool) -> dict:
    """A sampled completion as an assistant message: the trace in `reasoning_content` when it was closed once."""
    thinking, answer = split_thinking(text)
    if reasoning and thinking is not None and THINK_CLOSE not in answer:
        return {"role": "assistant", "content": answer.strip(), "reasoning_content": thinking}
    return {"role": "assistant", "content": text}


def mining_settings(tokenizer, config: MiningConfig) -> GenerationSettings:
    """How mining samples: the config's temperature, top-p, length and decode path, the format's stop tokens."""
    return GenerationSettings(
        max_new_tokens=config.max_new_tokens, temperature=config.temperature, top_p=config.top_p,
        eos_token_ids=stop_token_ids(tokenizer), pad_token_id=tokenizer.pad_token_id,
        think_end_ids=tokenizer(THINK_CLOSE, add_special_tokens=False)["input_ids"],
        line_end_ids=line_end_token_ids(tokenizer), batch_size=config.batch_size, decode=config.decode,
        ssm_state_dtype=config.ssm_state_dtype,
    )


def mine_pairs(model, tokenizer, rows: list[dict], config: MiningConfig, seed: int, tag: str, rank: int = 0,
               world: int = 1) -> tuple[list[dict], dict]:
    """Sample K completions per prompt from `model`, grade them, keep the clearest pairs.

    Returns pairs (message form for the record, plus `encoded`: the exact sampled tokens for training) and counts.
    With `world` workers, worker `rank` mines prompts rank, rank + world, ...; sample j of prompt i draws from the
    random stream i * K + j whatever the split, and every worker returns every pair, in prompt order.
    """
    rng = random.Random(seed)
    k = config.samples_per_prompt
    # One reasoning mode and budget per prompt: the two sides of a pair must share everything the model saw.
    plans = []
    stated = budget_is_stated(tokenizer, config.state_budget)
    for row in rows:
        reasoning = rng.random() >= config.reasoning_off_fraction
        budget = rng.choice(config.budgets) if reasoning else None
        prompt = state_budget(with_reasoning(prompt_messages(row), reasoning), budget if stated else None)
        plans.append({"row": row, "reasoning": reasoning, "budget": budget, "prompt": prompt,
                      "ids": encode_prompt(tokenizer, prompt)})
    settings = mining_settings(tokenizer, config)
    mine = [i for i in range(len(plans)) if i % world == rank]
    results = generate(
        model, [plans[i]["ids"] for i in mine for _ in range(k)], settings=settings,
        budgets=[plans[i]["budget"] for i in mine for _ in range(k)],
        reasoning=[plans[i]["reasoning"] for i in mine for _ in range(k)], seed=seed,
        stream_ids=[i * k + j for i in mine for j in range(k)],
    )
    texts = [completion_text(tokenizer, r.tokens) for r in results]
    score_rows = [
        dict(plans[i]["row"], messages=plans[i]["prompt"], reasoning="on" if plans[i]["reasoning"] else "off",
             thinking_budget=plans[i]["budget"], thinking_tokens=results[local * k + j].thinking_tokens)
        for local, i in enumerate(mine) for j in range(k)
    ]
    scored = score_batch(texts, score_rows, config.rewards)

    think_end = set(settings.think_end_ids)
    pairs, stats = [], {"prompts": len(mine), "samples": len(results), "no_contrast": 0, "reward_failures": 0,
                        "score_sum": sum(s.score for s in scored)}
    for local, i in enumerate(mine):
        plan = plans[i]
        candidates = []
        for j in range(local * k, (local + 1) * k):
            result = results[j]
            body = result.tokens[:-1] if result.finished else result.tokens
            close_at = next((t for t, token in enumerate(body) if token in think_end), -1)
            verdict = judge(texts[j], plan["reasoning"], result.finished, len(body) - close_at - 1,
                            config.max_answer_tokens)
            candidates.append({"score": scored[j].score, "well_formed": verdict["well_formed"],
                               "tokens": len(result.tokens), "text": texts[j], "result": result})
            stats["reward_failures"] += scored[j].failed
        chosen_rejected = select_pairs(candidates, config.min_margin, config.max_pairs_per_prompt)
        stats["no_contrast"] += not chosen_rejected
        for n, (c, r) in enumerate(chosen_rejected):
            chosen, rejected = candidates[c], candidates[r]
            pairs.append({
                "id": f"{plan['row'].get('id', i)}-{tag}-{n}",
                "prompt": plan["prompt"],
                "chosen": completion_message(chosen["text"], plan["reasoning"]),
                "rejected": completion_message(rejected["text"], plan["reasoning"]),
                "metadata": {
                    "source": "mined", "prompt_id": plan["row"].get("id"), "round": tag,
                    "reasoning": "on" if plan["reasoning"] else "off", "thinking_budget": plan["budget"],
                    "chosen_score": chosen["score"], "rejected_score": rejected["score"],
                    "chosen_well_formed": chosen["well_formed"], "rejected_well_formed": rejected["well_formed"],
                    "chosen_text": chosen["text"], "rejected_text": rejected["text"],
                    "plan": (i, n),  # the pair's place in prompt order (dropped before returning)
                },
                "encoded": {side: sampled_sample(plan["ids"], cand["result"])
                            for side, cand in (("chosen", chosen), ("rejected", rejected))},
            })
    if world > 1:  # every worker gets every pair (in prompt order) and the counts over all prompts
        everyone = gather_objects((pairs, stats))
        pairs = sorted((p for part, _ in everyone for p in part), key=lambda p: p["metadata"]["plan"])
        stats = {key: sum(part[key] for _, part in everyone) for key in stats}
    for pair in pairs:
        del pair["metadata"]["plan"]
    stats["mean_score"] = stats.pop("score_sum") / max(1, stats["samples"])
    stats["pairs"] = len(pairs)
    return pairs, stats


def sampled_sample(prompt_ids: list[int], result) -> dict:
    """The exact sampled tokens as a training sample; prompt and forced tokens carry no loss. `sampler_logps` are
    the sampler's log-probs of its tokens (NaN on the prompt and forced tokens)."""
    labels = [IGNORE_INDEX if forced else token for token, forced in zip(result.tokens, result.forced_mask)]
    return {"input_ids": prompt_ids + result.tokens, "labels": [IGNORE_INDEX] * len(prompt_ids) + labels,
            "sampler_logps": [math.nan] * len(prompt_ids) + list(result.logprobs)}


def split_heldout(pairs: list[dict], fraction: float, seed: int) -> tuple[list[dict], list[dict]]:
    """(train, held-out) with all pairs of one prompt on the same side, so held-out prompts are unseen."""
    keys = sorted({json.dumps(p["prompt"], sort_keys=True) for p in pairs})
    random.Random(seed).shuffle(keys)
    n_heldout = math.ceil(fraction * len(keys)) if fraction > 0 and len(keys) > 1 else 0
    heldout_keys = set(keys[:n_heldout])
    heldout = [p for p in pairs if json.dumps(p["prompt"], sort_keys=True) in heldout_keys]
    return [p for p in pairs if json.dumps(p["prompt"], sort_keys=True) not in heldout_keys], heldout


# ---------------------------------------------------------------------------------------------------------------
# Log-probs of pairs
# ---------------------------------------------------------------------------------------------------------------


def pair_logps(model, pairs: list[dict], collator: SampleCollator, device, loss_chunk_tokens: int = 0,
               mismatch: MismatchMeter | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed log-probs [B, 2] and target-token counts [B, 2] (columns: chosen, rejected), in one forward.

    Both sides of every pair are collated together, so a packed step fills its rows with chosen and rejected alike.
    `loss_chunk_tokens` > 0 applies the LM head that many tokens at a time (`alignment.token_logprobs`).
    `mismatch` collects the per-token log-probs next to the sampler's, for mined pairs.
    """
    samples = [p["encoded"]["chosen"] for p in pairs] + [p["encoded"]["rejected"] for p in pairs]
    batch = {k: v.to(device) if torch.is_tensor(v) else v for k, v in collator(samples).items()}
    token_logps = model_token_logps(model, batch, loss_chunk_tokens)  # [R, T-1]
    if mismatch is not None and "sampler_logps" in batch:
        targets = batch["labels"][:, 1:] != IGNORE_INDEX  # [R, T-1]
        mismatch.add(token_logps[targets], batch["sampler_logps"][:, 1:][targets])
    logps, counts = per_sample_sums(token_logps, batch["labels"], batch["sample_ids"], len(samples))
    return logps.view(2, -1).T, counts.view(2, -1).T  # [B, 2]


@torch.no_grad()
def all_pair_logps(model, pairs: list[dict], collator: SampleCollator, device, chunk: int,
                   loss_chunk_tokens: int = 0, mismatch: MismatchMeter | None = None,
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """pair_logps over many pairs, `chunk` pairs per forward, without gradients."""
    if not pairs:
        return torch.zeros(0, 2), torch.zeros(0, 2, dtype=torch.long)
    # Train mode, as in the loss step: NemotronH runs its fused Mamba kernel only there (eval mode takes the unfused
    # path), so reference and policy log-probs go through the same kernels.
    was_training = model.training
    model.train()
    parts = [pair_logps(model, pairs[i : i + chunk], collator, device, loss_chunk_tokens, mismatch)
             for i in range(0, len(pairs), chunk)]
    model.train(was_training)
    return torch.cat([p[0] for p in parts]).cpu(), torch.cat([p[1] for p in parts]).cpu()


def preference_accuracy(chosen_rewards: torch.Tensor, rejected_rewards: torch.Tensor) -> float:
    """TRL's preference accuracy: the fraction of pairs whose chosen implicit reward beats the rejected one.

    A margin within float noise does not count: the same pair packed into a different row gives log-probs that differ
    in the last bits, so at the round start (policy == reference) a strict `>` would report a coin flip, not 0.
    """
    return ((chosen_rewards - rejected_rewards) > 1e-6).float().mean().item()


def reference(model):
    """The reference policy: with LoRA the base with adapters disabled; otherwise the model as it is now."""
    from peft import PeftModel

    return model.disable_adapter() if isinstance(model, PeftModel) else contextlib.nullcontext()


def heldout_metrics(model, pairs: list[dict], collator, device, config: DPOConfig) -> dict:
    """Preference metrics on held-out pairs (their reference log-probs in `pair["ref"]`)."""
    if not pairs:
        return {}
    logps, counts = all_pair_logps(model, pairs, collator, device, config.train.pairs_per_step,
                                   config.train.loss_chunk_tokens)
    ref = torch.stack([p["ref"] for p in pairs])  # [B, 2]
    losses, chosen_rewards, rejected_rewards = preference_loss(
        logps[:, 0], logps[:, 1], ref[:, 0], ref[:, 1], counts[:, 0], counts[:, 1],
        config.loss.loss_type, config.loss.beta,
    )
    per_token = logps / counts.clamp(min=1)  # [B, 2]
    return {
        "pairs": len(pairs),
        "loss": losses.mean().item(),
        "reward_accuracy": preference_accuracy(chosen_rewards, rejected_rewards),
        "reward_margin": (chosen_rewards - rejected_rewards).mean().item(),
        # The policy's own preference, length-normalised; meaningful before training too.
        "logp_accuracy": (per_token[:, 0] > per_token[:, 1]).float().mean().item(),
        "chosen_logps": logps[:, 0].mean().item(),
        "rejected_logps": logps[:, 1].mean().item(),
    }


# ---------------------------------------------------------------------------------------------------------------
# The stage
# ---------------------------------------------------------------------------------------------------------------


def run_dpo(config: DPOConfig) -> dict:
    setup_logging()
    check_paths(config)  # a mistyped path fails here, naming its key, before the output folder exists
    if config.pairs.source == "mined":
        check_reward_names(config.mining.rewards, "mining.rewards")
    out = Path(config.output_dir)
    (out / "pairs").mkdir(parents=True, exist_ok=True)
    device = pick_device(config.device)
    seed_everything(config.train.seed)
    rng = random.Random(config.train.seed)  # the same draws on every worker: prompts, modes, batches
    rank, world = distributed_rank_world()
    mining = config.mining
    if world > 1:
        mining = dataclasses.replace(mining, decode=decode_for_workers(mining.decode, "mining.decode"))
    zero_settings = full_weight_settings(config.train, world, bf16=config.model.dtype == "bfloat16")

    # Model and tokenizer: the SFT checkpoint. Checkpointed blocks stay so through every round's LoRA and merge.
    # Pair sources: one preference file for every round, or fresh training prompts per round for mining. No prompt
    # may be in two splits: refused before anything loads.
    mined = config.pairs.source == "mined"
    file_pairs, file_report = [], None
    if not mined:
        file_pairs, file_report = read_pairs(config.pairs.dataset_path, config.pairs.schema,
                                             config.pairs.max_bad_fraction)
    splits = guard_splits("dpo", rl=config.mining.prompts_path if mined else None, pairs=None if mined else file_pairs,
                          validation=config.selection.validation_path, test=config.eval.test_path,
                          tool_rl=config.mining.tool_prompts_path if mined else None,
                          tool_validation=config.selection.tool_validation_path, tool_test=config.eval.tool_test_path)
    tokenizer = load_tokenizer(config.model)
    model = load_model(config.model, device)
    if config.train.activation_checkpointing:
        enable_activation_checkpointing(model)
    log.info("loss: %s; activation checkpointing: %s", describe_loss_path(config.train.loss_chunk_tokens),
             activation_checkpointing_status(model))
    test_rows, _ = read_rows(config.eval.test_path, "prompt", config.eval.max_bad_fraction)
    # Decoding the whole vocabulary takes a while for real tokenizers: only when the loss needs line ends.
    line_ends = line_end_token_ids(tokenizer) if config.loss.score_until == "divergent_line" else None

    if not mined:
        for pair in file_pairs:
            pair["encoded"] = encode_pair(tokenizer, pair)
    else:
        prompt_rows, _ = read_rows(config.mining.prompts_path, "prompt")
        needed = config.mining.prompts_per_round * config.rounds
        if needed > len(prompt_rows):
            raise ValueError(f"{config.mining.prompts_path} has {len(prompt_rows)} prompt rows; "
                             f"{config.rounds} rounds x {config.mining.prompts_per_round} prompts need {needed}")
        mining_order = rng.sample(range(len(prompt_rows)), needed)
        tool_rows: list[dict] = []
        if config.mining.tool_prompts_path and config.mining.tool_prompts_per_round:
            tool_rows, _ = read_rows(config.mining.tool_prompts_path, "prompt")
            needed = config.mining.tool_prompts_per_round * config.rounds
            if needed > len(tool_rows):
                raise ValueError(f"mining.tool_prompts_path {config.mining.tool_prompts_path} has {len(tool_rows)} "
                                 f"rows; {config.rounds} rounds x {config.mining.tool_prompts_per_round} need {needed}")
            tool_rows = [tool_rows[i] for i in rng.sample(range(len(tool_rows)), needed)]

    # Under ZeRO one engine holds this worker's shard of the weights and AdamW for the whole stage (the optimizer
    # starts afresh each round); whatever reads the whole model (mining, reference log-probs, held-out metrics,
    # evaluation) gathers it, every worker together. The model packs and drops dropout once, before it is sharded.
    zero = packing_once = None
    if zero_settings:
        disable_dropout(model)
        packing_once = _packing_mode(model, config)
        optimizer = torch.optim.AdamW(model.parameters(), lr=config.train.lr, weight_decay=config.train.weight_decay,
                                      betas=(0.9, 0.95))
        zero = ZeroEngine(model, optimizer, zero_settings, device)
    gathered = zero.gathered_for_generation if zero is not None else contextlib.nullcontext

    # Resume: a state saved after a finished round, for this config, these prompts or pairs and this start.
    inputs = config.mining.prompts_path if mined else config.pairs.dataset_path
    fingerprint = run_fingerprint(config, inputs, salt=str(_parent(config.model.name_or_path).get("created", "")) +
                                  (f" world={world}" if zero is not None else ""))
    state = TrainState(rng=rng)  # state.step counts finished rounds
    if zero is not None:
        resumed = resume_sharded_training(out / "last", fingerprint, zero, state)
    else:
        resumed = resume_training(out / "last", fingerprint, model, None, state)
    done = state.step
    if resumed:
        log.info("resumed after round %d (%s)", done, out / "last")

    # Evaluation, selection and the record are rank 0's; the other workers mine and train beside it.
    metrics = MetricsLogger(out, "dpo", resume_step=state.extra["step"] + 1 if resumed else None,
                            keep=lambda record: record.get("round", 0) <= done, tracking=config.tracking,
                            run_config=to_dict(config)) if rank == 0 else None
    selection = RoundSelection(config if rank == 0 else dataclasses.replace(
        config, selection=dataclasses.replace(config.selection, validation_path="", tool_validation_path="")), tokenizer)
    if resumed:
        history, start_eval, selection.best = state.extra["history"], state.extra["start_eval"], state.extra["best"]
        step, packed_path = state.extra["step"], state.extra["packed_path"]
    else:
        history, start_eval, step, packed_path = [], None, 0, "padded batches"
        with gathered():
            if config.evaluate_start and rank == 0:
                start_eval = evaluate_model(model, tokenizer, test_rows, config.eval)
                metrics.log(0, round=0, **_scalars(start_eval))
            selection.offer(model, 0, start_eval)
    started = time.time() - state.seconds
    for round_index in range(done + 1, config.rounds + 1):
        timings = {}
        # 1. Pairs for this round.
        t0 = time.time()
        if config.pairs.source == "dataset":
            pairs, pair_stats = list(file_pairs), {"pairs": len(file_pairs), **file_report.summary()}
        else:
            chunk = mining_order[(round_index - 1) * config.mining.prompts_per_round :][: config.mining.prompts_per_round]
            with gathered():
                pairs, pair_stats = mine_pairs(model, tokenizer, [prompt_rows[i] for i in chunk], mining,
                                               seed=config.train.seed + round_index, tag=f"r{round_index}",
                                               rank=rank, world=world)
                if tool_rows:  # every worker mines the same episodes (seeded): they need the same pairs
                    per_round = config.mining.tool_prompts_per_round
                    tool_pairs, tool_stats = mine_tool_pairs(
                        model, tokenizer, tool_rows[(round_index - 1) * per_round:][:per_round], mining,
                        seed=config.train.seed + round_index, tag=f"r{round_index}")
                    pairs += tool_pairs
                    pair_stats |= tool_stats
            if rank == 0:
                write_rows(out / "pairs" / f"round{round_index}.jsonl", [pair_to_row(p) for p in pairs])
        if config.loss.score_until != "end":
            for pair in pairs:
                pair["encoded"] = until_divergence(pair["encoded"], line_ends)
        fits = [max(len(s["input_ids"]) for s in p["encoded"].values()) <= config.pairs.max_seq_len for p in pairs]
        too_long = len(pairs) - sum(fits)
        pairs = [p for p, ok in zip(pairs, fits) if ok]
        train_pairs, heldout_pairs = split_heldout(pairs, config.pairs.heldout_fraction, config.train.seed + round_index)
        pair_stats |= {"dropped_too_long": too_long, "train_pairs": len(train_pairs),
                       "heldout_pairs": len(heldout_pairs)}
        timings["pairs_s"] = time.time() - t0
        log.info("round %d: %d train / %d held-out pairs (%s)", round_index, len(train_pairs), len(heldout_pairs),
                 {k: v for k, v in pair_stats.items() if isinstance(v, (int, float))})

        # 2. The round's policy (fresh adapters on the last result with LoRA) and its batch layout.
        if config.lora.enabled:
            model = apply_lora(model, config.lora)
            if world > 1:  # every worker starts the round from rank 0's adapters
                broadcast_parameters([p for p in model.parameters() if p.requires_grad])
        if zero is not None:
            mode, packed_path = packing_once
        else:
            if dropped := disable_dropout(model):
                log.info("dropout off in %d modules: policy and reference log-probs must agree at the round start",
                         dropped)
            mode, packed_path = _packing_mode(model, config)
        collator = SampleCollator(mode=mode, pad_token_id=tokenizer.pad_token_id,
                                  max_tokens_per_row=config.train.max_tokens_per_row if mode == "packed"
                                  else config.pairs.max_seq_len)

        # 3. Reference log-probs, once, before the first update (see the module docstring). Held-out pairs are
        # batched as `heldout_metrics` batches them, so at the round start their margins are exactly zero. The
        # reference is the policy that mined the pairs: next to the sampler's own log-probs it shows whether the
        # decode path samples the distribution that is trained (comparable at temperature 1 and top_p 1 only).
        mismatch = MismatchMeter() if mined and config.mining.temperature == 1.0 and config.mining.top_p == 1.0 \
            else None
        for group in (train_pairs, heldout_pairs):  # each worker computes every world-th pair's, then they swap
            with gathered(), reference(model):
                ref_logps, _ = all_pair_logps(model, group[rank::world], collator, device, config.train.pairs_per_step,
                                              config.train.loss_chunk_tokens, mismatch)
            for r, share in enumerate(gather_objects(ref_logps)):
                for pair, ref in zip(group[r::world], share):
                    pair["ref"] = ref
        if mismatch is not None:
            if world > 1:
                mismatch.gather()
            pair_stats |= mismatch.stats()
            log.info("round %d: sampler vs reference log-probs of the mined tokens: mean |dlogp| %.4f, max %.3f, "
                     "k3 KL %.5f", round_index, pair_stats["mismatch_abs_mean"], pair_stats["mismatch_abs_max"],
                     pair_stats["mismatch_kl_k3"])
            if pair_stats["mismatch_kl_k3"] > config.mining.mismatch_warn_kl:
                log.warning("round %d: the sampler's log-probs differ from the learner's (k3 KL %.4f): the decode "
                            "path is not the distribution being trained", round_index, pair_stats["mismatch_kl_k3"])
        with gathered():
            heldout_before = heldout_metrics(model, heldout_pairs, collator, device, config) if rank == 0 else {}

        # 4. Train.
        t0 = time.time()
        train_log = train_round(model, train_pairs, collator, device, config, metrics, step, rng, round_index,
                                rank, world, zero)
        step += train_log.pop("steps")
        timings["train_s"] = time.time() - t0
        if config.lora.enabled:  # the next round's base (and reference) is this round's result
            heldout_after = heldout_metrics(model, heldout_pairs, collator, device, config) if rank == 0 else {}
            model = model.merge_and_unload()

        # 5. Task accuracy of the result, on rank 0 (under ZeRO every worker takes part in the gather).
        with gathered():
            if rank == 0:
                if not config.lora.enabled:
                    heldout_after = heldout_metrics(model, heldout_pairs, collator, device, config)
                t0 = time.time()
                results = evaluate_model(model, tokenizer, test_rows, config.eval)
                timings["eval_s"] = time.time() - t0
                validation = selection.offer(model, round_index, results)
        if rank == 0:
            record = {"round": round_index, "pairs": pair_stats, "train": train_log,
                      "heldout_before": heldout_before, "heldout_after": heldout_after,
                      "eval": {k: v for k, v in results.items() if k != "examples"},
                      "validation_score": validation, "seconds": {k: round(v, 1) for k, v in timings.items()}}
            history.append(record)
            metrics.log(step, round=round_index, **_scalars(results),
                        **{f"heldout_{k}": v for k, v in heldout_after.items()}, pairs=len(pairs))
            log.info("round %d: accuracy think %.3f, held-out reward accuracy %s", round_index,
                     results["accuracy_think"], heldout_after.get("reward_accuracy"))
        if config.save_rounds and round_index < config.rounds:  # rank 0's record is the one written
            state.step, state.seconds = round_index, time.time() - started
            state.extra = {"history": history, "start_eval": start_eval, "best": selection.best, "step": step,
                           "packed_path": packed_path}
            if zero is not None:  # every worker writes its shard
                save_sharded_training_state(out / "last", fingerprint, zero, state, rank)
            elif rank == 0:  # the policy is the same on every worker
                save_training_state(out / "last", fingerprint, model, None, state)
    train_seconds = time.time() - started
    close_scorers()  # ends the reward actors when mode is `ray`
    if zero is not None:  # the shards gathered into a plain model on rank 0, for selection and the checkpoint
        weights = zero.full_state_dict(rank)
        zero.close()
        model = zero = None
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
        if rank == 0:
            model = load_model(config.model, device)
            model.load_state_dict(weights)
    if rank != 0:
        return {}
    selected_round, results = selection.restore_best(model, config.rounds, results)
    if results is None:  # the start was kept and was not evaluated on the test split yet
        results = evaluate_model(model, tokenizer, test_rows, config.eval)

    # Checkpoint (atomic) with its manifest; eval.json holds the final evaluation and the per-round history.
    summary = {k: v for k, v in results.items() if k != "examples"}
    report = dict(results, start={k: v for k, v in (start_eval or {}).items() if k != "examples"} or None,
                  rounds=history, selected_round=selected_round)
    (out / "eval.json").write_text(json.dumps(report, indent=2))
    metrics.log_file(out / "eval.json")
    metrics.close()
    manifest = {
        "stage": "dpo",
        "config": to_dict(config),
        "parent": _parent(config.model.name_or_path),
        "data_fingerprint": fingerprint_files(
            config.pairs.dataset_path if config.pairs.source == "dataset" else config.mining.prompts_path),
        "packing": packed_path,
        "splits": splits,
        "train_seconds": round(train_seconds, 1),
        "rounds": history,
        "selected_round": selected_round,
        "metrics": summary,
    }
    checkpoint = save_model_checkpoint(out / "checkpoint", model, tokenizer, manifest)
    shutil.rmtree(out / "last", ignore_errors=True)  # the finished checkpoint supersedes the resumable state
    print(f"checkpoint: {checkpoint}\nmetrics:    {out / 'metrics.jsonl'}\neval:       {out / 'eval.json'}")
    print(_before_after(start_eval, summary, train_seconds))
    return summary | {"start": report["start"], "rounds": history, "selected_round": selected_round}


class RoundSelection:
    """Keeps the policy (start or a round's result) with the best validation score, as a CPU copy of its weights.

    A DPO round can make a small model worse (a learning rate or a pair set too aggressive for it); scoring each
    round on the validation split and keeping the best means the stage never hands on a model worse than its start,
    by that measure. The score is the accuracy on `selection.validation_path`, or with
    `selection.tool_validation_path` too the mean of it and the tool episodes' final-state success. Off (the last
    round is kept, nothing is copied) when both are empty.
    """

    def __init__(self, config: DPOConfig, tokenizer):
        self.config, self.tokenizer = config, tokenizer
        self.rows, self.tool_rows = [], []
        limit = config.selection.max_samples or None
        if config.selection.validation_path:
            self.rows = read_rows(config.selection.validation_path, "prompt")[0][:limit]
        if config.selection.tool_validation_path:
            self.tool_rows = read_rows(config.selection.tool_validation_path, "prompt")[0][:limit]
        self.best: dict | None = None

    def offer(self, model, round_index: int, test_results: dict | None) -> float | None:
        """Score the current policy; remember it when it beats the best so far. Returns its validation score."""
        scores = {}
        if self.rows:
            scores["accuracy"] = run_cell(model, self.tokenizer, self.rows, True, None, self.config.eval)["accuracy"]
        if self.tool_rows:
            episodes = tool_episodes(model, self.tokenizer, self.tool_rows, self.config.eval, reasoning=True)
            scores["tool_success"] = sum(e.outcome().success for e in episodes) / len(episodes)
        if not scores:
            return None
        score = sum(scores.values()) / len(scores)
        log.info("round %d: validation score %.3f (%s)", round_index, score,
                 ", ".join(f"{name} {value:.3f}" for name, value in scores.items()))
        if self.best is None or score > self.best["score"] + self.config.selection.min_gain:
            state = {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()}
            self.best = {"round": round_index, "score": score, "state": state, "results": test_results}
        return score

    def restore_best(self, model, last_round: int, last_results: dict) -> tuple[int, dict | None]:
        """Load the best policy into `model` if it is not the last one. Returns (its round, its test results)."""
        if self.best is None or self.best["round"] == last_round:
            return last_round, last_results
        log.warning("keeping round %d (validation score %.3f): no later round beat it", self.best["round"],
                    self.best["score"])
        model.load_state_dict(self.best["state"])
        return self.best["round"], self.best["results"]


def train_round(model, pairs: list[dict], collator, device, config: DPOConfig, metrics: MetricsLogger | None,
                first_step: int, rng: random.Random, round_index: int, rank: int = 0, world: int = 1,
                zero: ZeroEngine | None = None) -> dict:
    """`train.max_steps` optimizer steps on `pairs` (each with its reference log-probs in `pair["ref"]`).

    With `world` workers all draw the same batch; each computes the loss of every world-th pair of it, normalised
    over the whole batch, and the gradients are summed across workers before the identical updates. Under ZeRO
    (`zero`) the engine runs the forwards, reduces and steps; its layer gathers are collectives, so a worker with
    fewer micro-batches in a step than another adds loss-free ones.
    """
    if not pairs:
        log.warning("round %d: no training pairs (no prompt had a contrast); the policy is left as it is", round_index)
        return {"steps": 0}
    if zero is not None:
        zero.reset_optimizer_state()  # a fresh AdamW each round, as below
        optimizer = zero.optimizer
    else:
        optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=config.train.lr,
                                      weight_decay=config.train.weight_decay, betas=(0.9, 0.95))
    learner = zero if zero is not None else model  # what runs the forwards
    model.train()
    queue: list[int] = []
    window: list[dict] = []
    trainable = [p for p in model.parameters() if p.requires_grad]
    progress = tqdm(range(config.train.max_steps), desc=f"dpo round {round_index}", unit="step", dynamic_ncols=True,
                    disable=rank != 0)
    for local_step in progress:
        lr = learning_rate(local_step, config.train)
        for group in optimizer.param_groups:
            group["lr"] = lr
        if len(queue) < min(config.train.pairs_per_step, len(pairs)):  # epochs over the pairs, reshuffled each time
            order = list(range(len(pairs)))
            rng.shuffle(order)
            queue += order
        batch = [pairs[i] for i in queue[: config.train.pairs_per_step]]
        del queue[: config.train.pairs_per_step]
        mine = batch[rank::world]

        # TRL's `sft` term is the mean NLL per chosen token of the batch; it keeps the chosen side likely while the
        # margin grows. Both terms are normalised over the whole batch, so micro-batches and workers add up.
        chosen_tokens = max(1, sum(sum(label != IGNORE_INDEX for label in p["encoded"]["chosen"]["labels"][1:])
                                   for p in batch))
        size = config.train.pairs_per_micro_batch or max(1, len(mine))
        micros = [mine[start : start + size] for start in range(0, len(mine), size)]
        if zero is not None and world > 1:  # loss-free fillers (None) up to the busiest worker's count
            micros += [None] * (all_reduce_max(len(micros)) - len(micros))
        per_pair = [torch.zeros(0, 5)]  # per pair: loss, chosen and rejected rewards, chosen and rejected log-probs
        for i, micro in enumerate(micros):
            filler = micro is None
            micro = batch[:1] if filler else micro
            logps, counts = pair_logps(learner, micro, collator, device, config.train.loss_chunk_tokens)  # [b, 2]
            ref = torch.stack([p["ref"] for p in micro]).to(device)  # [b, 2]
            losses, chosen_rewards, rejected_rewards = preference_loss(
                logps[:, 0], logps[:, 1], ref[:, 0], ref[:, 1], counts[:, 0], counts[:, 1],
                config.loss.loss_type, config.loss.beta,
            )
            loss = losses.sum() / len(batch) - config.loss.sft_weight * logps[:, 0].sum() / chosen_tokens
            if zero is not None:  # ZeRO averages the workers' gradients, the plain path sums them
                zero.backward(loss * (0.0 if filler else world), last=i == len(micros) - 1)
            else:
                loss.backward()
            if not filler:
                per_pair.append(torch.stack([losses, chosen_rewards, rejected_rewards, logps[:, 0], logps[:, 1]], 1)
                                .detach().cpu())
        per_pair = torch.cat(per_pair)  # [B_mine, 5]
        if world > 1:
            if zero is None:
                sum_gradients(trainable)
            per_pair = torch.cat(gather_objects(per_pair))
        if zero is not None:
            grad_norm = zero.grad_norm()  # the engine clipped and stepped after the last micro-batch
        else:
            grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), config.train.max_grad_norm)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

        dpo_loss, chosen_rewards, rejected_rewards, chosen_logps, rejected_logps = per_pair.double().unbind(1)
        sft_loss = -chosen_logps.sum().item() / chosen_tokens
        window.append({
            "loss": dpo_loss.mean().item() + config.loss.sft_weight * sft_loss, "dpo_loss": dpo_loss.mean().item(),
            "sft_loss": sft_loss, "reward_accuracy": preference_accuracy(chosen_rewards, rejected_rewards),
            "reward_margin": (chosen_rewards - rejected_rewards).mean().item(),
            "chosen_logps": chosen_logps.mean().item(), "rejected_logps": rejected_logps.mean().item(),
            "grad_norm": float(grad_norm), "lr": lr,
        })
        progress.set_postfix(loss=f"{window[-1]['dpo_loss']:.3f}", acc=f"{window[-1]['reward_accuracy']:.2f}")
        if local_step % config.train.log_every == 0 or local_step == config.train.max_steps - 1:
            if metrics:
                metrics.log(first_step + local_step, round=round_index, **_mean(window))
            last, window = _mean(window), []
    return {"steps": config.train.max_steps, **last}


def _packing_mode(model, config: DPOConfig) -> tuple[str, str]:
    """The collator mode and how the model keeps packed samples apart: packed rows when it can, else padding."""
    if config.train.packing:
        try:
            return "packed", f"packed ({enable_packed_sequences(model)})"
        except PackingNotSupportedError as exc:
            log.warning("packing not supported, using padded batches: %s", exc)
    return "padded", "padded batches"


def _mean(records: list[dict]) -> dict:
    return {k: sum(r[k] for r in records) / len(records) for k in records[0]}


def _scalars(results: dict) -> dict:
    flat = {k: v for k, v in results.items() if isinstance(v, float)}
    for cell in results.get("budget_sweep", []):
        if cell["budget"] is not None:
            flat[f"accuracy_budget{cell['budget']}"] = cell["accuracy"]
            flat[f"well_formed_budget{cell['budget']}"] = cell["well_formed"]
    return flat


def _parent(path: str) -> dict:
    try:
        manifest = read_manifest(path)
    except Exception:  # a hub id or a bare model directory has no manifest; the path alone is the record
        return {"path": path}
    return {"path": path, "stage": manifest.get("stage"), "created": manifest.get("created"),
            "metrics": manifest.get("metrics")}


def _before_after(start: dict | None, end: dict, seconds: float) -> str:
    lines = []
    for key in ("accuracy_think", "accuracy_no_think", "well_formed_think"):
        before = f"{start[key]:.3f} -> " if start else ""
        lines.append(f"{key} {before}{end[key]:.3f}")
    for i, cell in enumerate(end["budget_sweep"]):
        if cell["budget"] is not None:
            old = start["budget_sweep"][i] if start else None
            before = f"{old['accuracy']:.3f}/{old['well_formed']:.3f} -> " if old else ""
            lines.append(f"budget {cell['budget']} accuracy/well-formed {before}{cell['accuracy']:.3f}/"
                         f"{cell['well_formed']:.3f}")
    return " | ".join(lines) + f" | {seconds:.0f}s"
