"""GRPO stage: RL with verifiable rewards from an SFT or DPO checkpoint, with thinking modes and budgets in rollouts.

One step of `run_grpo`, top to bottom:

1. Rollout. Draw prompts from the pool; give each prompt a reasoning mode (on/off, `rollout.reasoning_off_fraction`)
   and, optionally, a thinking budget (`rollout.budget_fraction`); generate G completions per prompt with
   `alignment.rollout.generation.generate` (batched, with the hybrid cache, applying the budget rule). Every completion is
   scored by the reward plugins (`rewards`), routed by its row's `task`, on the Ray reward pool or in process; the
   completions of one generation batch are scored while the next batch is generated. A tool task (`task: tool`)
   rolls out as a multi-turn episode instead (`alignment.rollout.episodes`): its calls run in the tool world, the
   results go back as tool turns, and `tool_state` scores the whole episode.
2. Filter. A group whose completions all got the same reward has advantage 0 everywhere and teaches nothing:
   dynamic sampling drops it and refills from more prompts (a bounded number of rounds). Completions cut by
   `max_new_tokens` before they finished leave their group (`loss.overlong=exclude`): their reward says nothing
   about the answer they never wrote, and kept in the baseline it would pay the others for finishing sooner.
   Prompts every completion solved leave the pool (pass-rate curriculum).
3. Learn. Group-relative advantages (`alignment.advantages`); log-probs of the sampling policy (and of the reference
   when KL is on) computed once; then `loss.epochs * loss.minibatches` optimizer steps of the token-level clipped
   loss over packed rows (`SampleCollator(mode="packed")`, exact for the Mamba layers through `seq_idx`). Tokens the
   budget rule forced (the `</think>` of a cut trace) are not in the loss: the policy did not sample them. Each turn
   of an episode is a sample of its own (its prompt the conversation before it, tool results included and not in
   the loss), and every turn carries its episode's advantage: the reward is the episode's.

Every step logs rewards, filter counts, loss statistics and the time of each phase (generate, reward, learn).
The run directory gets `metrics.jsonl`, `tensorboard/`, `samples.jsonl` (sample completions), `reward_curve.png`,
`eval.json` (held-out accuracy before and after, with a thinking-budget sweep) and `checkpoint/`.

Why this loop rather than TRL's GRPOTrainer: the rollout is where this stage differs. TRL generates through
`model.generate` or vLLM, neither of which applies a thinking budget nor reports which tokens were forced, so the
forced `</think>` would be trained on as if sampled; per-prompt reasoning modes, reward routing on our Ray pool with
failure isolation, rewards overlapped with generation, and dynamic sampling with refill are not there either. TRL's
learner pads or packs without `seq_idx`, which mixes samples in the Mamba layers (`guard_trl_config` refuses it).
What is left of GRPO, the advantages and the clipped loss, is a few dozen lines of tensor code in
`alignment/advantages.py`, tested against hand-computed values. TRL's GRPOTrainer stays the baseline that `bench/bench_grpo.py` measures against.

    align grpo configs/tiny/grpo.yaml
    align grpo configs/tiny/grpo.yaml rollout.budget_fraction=0 train.seed=1 output_dir=runs/tiny/grpo-seed1
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import gc
import json
import logging
import math
import random
import shutil
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Literal

import torch
from tqdm.auto import tqdm

from alignment.activation_checkpointing import activation_checkpointing_status, enable_activation_checkpointing
from alignment.advantages import IGNORE_INDEX, clipped_policy_loss, group_advantages
from alignment.chat_format import (
    STATE_BUDGET_HELP, budget_is_stated, check_state_budget, completion_text, encode_prompt, state_budget,
)
from alignment.checkpoint import read_manifest, save_model_checkpoint
from alignment.config import check_paths, option, to_dict
from alignment.data import fingerprint_files, read_rows
from alignment.distributed import all_reduce_max, all_reduce_sum, gather_objects, sum_gradients
from alignment.evaluate import DEFAULT_SWEEP, EvalConfig, evaluate_model, generation_settings, prompt_messages
from alignment.rollout.episodes import EpisodeTurn, episode_prompt, run_episodes
from alignment.rollout.generation import (DECODE_HELP, SSM_STATE_HELP, GenerationResult, GenerationSettings,
                                  check_decode_keys, decode_for_workers, generate)
from alignment.modeling import ModelConfig, load_model, load_tokenizer
from alignment.packed_model import enable_packed_sequences
from alignment.packing import SampleCollator, plan_packed_batches
from alignment.runtime import distributed_rank_world, pick_device, seed_everything, setup_logging
from alignment.split_guard import guard_splits
from alignment.lora import LoraConfig, apply_lora
from alignment.token_logprobs import MismatchMeter, describe_loss_path, disable_dropout, model_token_logps
from alignment.resume import (TrainState, resume_sharded_training, resume_training, run_fingerprint,
                              save_sharded_training_state, save_training_state)
from alignment.trackers import TrackingConfig
from alignment.tracking import MetricsLogger
from alignment.zero import ZeroEngine, full_weight_settings
from envs import task_environments
from envs.code_tasks import generate_code_tasks
from rewards import RewardScorer, RewardsConfig, RewardSpec
from rewards.scoring import check_reward_names

log = logging.getLogger(__name__)

# ---------------------------------------------------------------------------------------------------------------
# Config


@dataclass
class GRPODataConfig:
    """Prompts to train on."""

    train_path: str = option(
        "runs/data/tiny/train.jsonl", "JSONL prompt rows; `task` routes each to its rewards.", path="file"
    )
    max_prompts: int = option(0, "Use at most this many rows of train_path (the first ones); 0 means all.")
    code_tasks: int = option(0, "Synthetic code tasks (envs.code_tasks) mixed into the pool; `task: code` rows.")
    tool_prompts_path: str = option(
        "", "Tool task rows (`align data` writes runs/data/tiny/tools_rl.jsonl) mixed into the pool; each rolls out "
            "as a multi-turn episode in the tool world. Empty: none (tool rows of train_path still run as episodes).",
        path="file",
    )
    max_bad_fraction: float = option(0.01, "Stop when more than this fraction of rows is malformed.")


@dataclass
class RolloutConfig:
    """How completions are sampled."""

    prompts_per_step: int = option(16, "Prompt groups per rollout batch (after dynamic sampling).")
    group_size: int = option(8, "Completions per prompt (G).")
    temperature: float = option(1.0, "Sampling temperature (the log-probs of the loss use the same one).")
    top_p: float = option(1.0, "Nucleus sampling mass; must stay 1.0 (the loss's ratios use the full softmax).")
    max_new_tokens: int = option(160, "Most tokens per completion; a completion cut here is overlong.")
    reasoning_off_fraction: float = option(0.0, "Fraction of prompts rolled out with reasoning off (/no_think).")
    budget_fraction: float = option(0.0, "Fraction of reasoning-on prompts rolled out with a thinking budget.")
    budget_min: int = option(0, "Smallest sampled thinking budget (tokens).")
    budget_max: int = option(64, "Largest sampled thinking budget (tokens); budgets are uniform in [min, max].")
    grace_fraction: float = option(0.1, "Grace window after the budget to finish the line, as a fraction of it.")
    state_budget: str = option("auto", STATE_BUDGET_HELP)
    batch_size: int = option(
        64, "Samples generated together; a batch's rewards are scored while the next one runs. With decode "
            "continuous: decode slots, refilled over the whole step's samples in one call (scored after it).",
    )
    decode: str = option("auto", DECODE_HELP)
    ssm_state_dtype: str = option("float32", SSM_STATE_HELP)
    max_turns: int = option(4, "Most assistant turns of a tool episode; one still calling tools then ends unscored "
                               "as such (`tool_state` grades the world it left). max_new_tokens applies per turn.")

    def validate(self) -> None:
        check_decode_keys(self.decode, self.ssm_state_dtype)
        if self.max_turns < 1:
            raise ValueError("rollout.max_turns must be at least 1")
        if self.group_size < 2:
            raise ValueError("rollout.group_size must be at least 2 (advantages are relative to the group)")
        if self.prompts_per_step < 1 or self.batch_size < 1 or self.max_new_tokens < 1:
            raise ValueError("rollout.prompts_per_step, batch_size and max_new_tokens must be at least 1")
        for key in ("reasoning_off_fraction", "budget_fraction"):
            if not 0.0 <= getattr(self, key) <= 1.0:
                raise ValueError(f"rollout.{key} must be in [0, 1], got {getattr(self, key)}")
        if not 0 <= self.budget_min <= self.budget_max:
            raise ValueError("rollout.budget_min must be >= 0 and <= budget_max")
        check_state_budget(self.state_budget)
        if self.temperature <= 0:
            raise ValueError("rollout.temperature must be > 0 (GRPO needs different completions per prompt)")
        if self.top_p != 1.0:
            raise ValueError(
                f"rollout.top_p={self.top_p}: GRPO's ratios compare log-probs of the full softmax, so tokens sampled "
                "from a nucleus would be trained as if drawn from a distribution they were not drawn from; set "
                "rollout.top_p=1.0 (lower rollout.temperature to sample closer to greedy)"
            )


@dataclass
class PolicyLossConfig:
    """Advantages and the clipped policy loss."""

    std_normalize: bool = option(True, "Divide advantages by the group's reward std.")
    leave_one_out: bool = option(True, "Baseline = mean reward of the other G-1 completions (else the group mean).")
    clip_low: float = option(0.2, "Lower clip of the ratio: 1 - clip_low.")
    clip_high: float = option(0.28, "Upper clip of the ratio: 1 + clip_high (clip-higher keeps exploration).")
    kl_coef: float = option(0.0, "Weight of the k3 KL to the reference (the start checkpoint; with LoRA the base).")
    epochs: int = option(1, "Passes over each rollout batch.")
    minibatches: int = option(2, "Optimizer steps per pass: the rollout batch is split into this many parts.")
    overlong: Literal["mask", "exclude", "soft_penalty", "keep"] = option(
        "exclude",
        "Completions cut by rollout.max_new_tokens (default exclude, chosen on the validation split). mask: no loss, "
        "their reward stays in the group's baseline. "
        "exclude: they leave their group (no loss, not in the baseline); a group whose finished completions all "
        "score alike is dropped. soft_penalty: DAPO's length penalty, 0 up to max_new_tokens - overlong_window, "
        "then falling linearly to -1, and -1 for a cut completion; all are trained. keep: trained like any other.",
    )
    overlong_window: int = option(0, "soft_penalty: the ramp's length in tokens (DAPO's L_cache); 0: a quarter of "
                                     "rollout.max_new_tokens.")
    tis_cap: float = option(
        0.0,
        "Truncated importance sampling: weight each token's loss by min(learner old prob / sampler prob, tis_cap), "
        "correcting for a sampler whose numerics differ from the learner's (veRL's and TRL's TIS; 2.0 is common). "
        "0: off.",
    )
    mismatch_warn_kl: float = option(
        0.01, "Warn when the k3 KL between the sampler's and the learner's log-probs of the sampled tokens exceeds this."
    )

    def validate(self) -> None:
        if not 0 <= self.clip_low < 1 or self.clip_high < 0:
            raise ValueError("loss.clip_low must be in [0, 1) and loss.clip_high >= 0")
        if self.tis_cap < 0 or (0 < self.tis_cap < 1):
            raise ValueError("loss.tis_cap must be 0 (off) or >= 1")
        if self.overlong_window < 0:
            raise ValueError("loss.overlong_window must be >= 0")
        if self.kl_coef < 0:
            raise ValueError("loss.kl_coef must be >= 0")
        if self.epochs < 1 or self.minibatches < 1:
            raise ValueError("loss.epochs and loss.minibatches must be at least 1")


@dataclass
class SamplingConfig:
    """Which groups and prompts are kept."""

    dynamic_sampling: bool = option(True, "Drop groups whose rewards are all equal and refill from more prompts.")
    max_refill_rounds: int = option(2, "Most extra rollout rounds per step to refill dropped groups.")
    drop_solved: bool = option(True, "Curriculum: a prompt whose last group all passed leaves the pool.")
    pass_threshold: float = option(1.0, "A completion passes when its total reward is at least this.")

    def validate(self) -> None:
        if self.max_refill_rounds < 0:
            raise ValueError("sampling.max_refill_rounds must be >= 0")


@dataclass
class GRPOTrainConfig:
    """Optimisation."""

    max_steps: int = option(30, "Rollout batches (each gives loss.epochs * loss.minibatches optimizer steps).")
    lr: float = option(1e-4, "Learning rate, constant after warmup (real models: ~3e-6 full, ~1e-5 LoRA).")
    warmup_steps: int = option(0, "Linear warmup of the learning rate, in rollout steps.")
    weight_decay: float = option(0.0, "AdamW weight decay.")
    max_grad_norm: float = option(1.0, "Gradient clipping norm.")
    max_tokens_per_row: int = option(2048, "Token budget of one packed row of the learner pass.")
    rows_per_micro_batch: int = option(4, "Packed rows per forward/backward; bounds activation memory.")
    seed: int = option(0, "Seed for prompt order, reasoning modes, budgets and sampling.")
    sample_every: int = option(5, "Write sample completions to samples.jsonl every this many steps.")
    save_every: int = option(
        0, "Save a resumable state (trainable weights, optimizer, prompt pool and curriculum, RNG) every this many "
           "steps; a rerun of the same config continues from it (0: never).",
    )
    samples_logged: int = option(4, "Completions written each time.")
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
        "with ZeRO over the workers; rollouts gather the weights once per call. Full weights only (LoRA trains "
        "data parallel). Empty: every worker holds the whole model.",
        path="file",
    )

    def validate(self) -> None:
        if self.max_steps < 1 or self.rows_per_micro_batch < 1 or self.sample_every < 1:
            raise ValueError("train.max_steps, rows_per_micro_batch and sample_every must be at least 1")
        if self.save_every < 0:
            raise ValueError("train.save_every must be >= 0 (0: never)")
        if self.lr <= 0:
            raise ValueError("train.lr must be positive")
        if self.loss_chunk_tokens < 0:
            raise ValueError("train.loss_chunk_tokens must be >= 0 (0: full logits)")


@dataclass
class GRPOConfig:
    """GRPO with verifiable rewards."""

    model: ModelConfig = option(ModelConfig(name_or_path="runs/tiny/sft/checkpoint"), "Checkpoint to start from.")
    data: GRPODataConfig = option(GRPODataConfig(), "Prompts.")
    rollout: RolloutConfig = option(RolloutConfig(), "Sampling of completions.")
    loss: PolicyLossConfig = option(PolicyLossConfig(), "Advantages and policy loss.")
    sampling: SamplingConfig = option(SamplingConfig(), "Dynamic sampling and curriculum.")
    train: GRPOTrainConfig = option(GRPOTrainConfig(), "Optimisation.")
    lora: LoraConfig = option(LoraConfig(), "LoRA (the KL reference is then the adapters-disabled base).")
    rewards: RewardsConfig = option(
        RewardsConfig(rewards=[RewardSpec("math")],
                      routes={"code": [RewardSpec("code_tests")], "tool": [RewardSpec("tool_state")]}),
        "Reward plugins per task, failure score, timeout, Ray pool or in-process.",
    )
    eval: EvalConfig = option(EvalConfig(budgets=list(DEFAULT_SWEEP)), "Held-out evaluation (with budget sweep).")
    evaluate_before: bool = option(True, "Also evaluate the start checkpoint, so eval.json holds before and after.")
    output_dir: str = option("runs/tiny/grpo", "Run directory: checkpoint/, metrics.jsonl, reward_curve.png, ...")
    device: str = option("auto", "cpu, cuda, cuda:N or auto.")
    tracking: TrackingConfig = option(TrackingConfig(), "Experiment trackers: tensorboard, wandb, mlflow, trackio.")
    cpu_threads: int = option(
        0, "Torch CPU threads; 0 keeps one per core. Small models on a shared machine run much faster with 1."
    )

    def validate(self) -> None:
        if self.cpu_threads < 0:
            raise ValueError("cpu_threads must be >= 0")
        if self.rollout.max_new_tokens >= self.train.max_tokens_per_row:
            raise ValueError("train.max_tokens_per_row must exceed rollout.max_new_tokens so no sample is cut")
        if self.loss.minibatches > self.rollout.prompts_per_step * self.rollout.group_size:
            raise ValueError("loss.minibatches must not exceed rollout.prompts_per_step * rollout.group_size")
        if self.train.deepspeed and self.lora.enabled:
            raise ValueError("train.deepspeed shards full weights; with lora.enabled the adapters train data "
                             "parallel (leave train.deepspeed empty)")
        if self.train.deepspeed and self.loss.kl_coef:
            raise ValueError("train.deepspeed with loss.kl_coef > 0: the KL reference would be a second, unsharded "
                             "copy of the model on every worker; set loss.kl_coef=0")


# ---------------------------------------------------------------------------------------------------------------
# Prompts and the curriculum


def prompt_for(row: dict) -> list[dict]:
    """The conversation to complete, without any reasoning switch (the rollout sets the mode)."""
    if "messages" in row:
        return prompt_messages(row)
    task, environments = row.get("task", "math"), task_environments()  # rows without chat `messages`
    if task not in environments:
        raise ValueError(f"row {row.get('id')}: no `messages` and no environment for task {task!r}")
    return environments[task].prompt_messages({k: v for k, v in row.items() if k != "reasoning"})


class PromptPool:
    """Training rows drawn in shuffled passes. The curriculum retires rows whose last group all passed."""

    def __init__(self, rows: list[dict], seed: int):
        self.rows = rows
        self.rng = random.Random(seed)
        self.order: list[int] = []
        self.retired: set[int] = set()
        self.passes = 0

    def draw(self, n: int) -> list[int]:
        drawn: list[int] = []
        while len(drawn) < n:
            if not self.order:
                live = [i for i in range(len(self.rows)) if i not in self.retired]
                if not live:
                    raise RuntimeError("every training prompt was solved and retired; add prompts or sampling.drop_solved=false")
                self.rng.shuffle(live)
                self.order = live
                self.passes += 1
            i = self.order.pop()
            if i not in self.retired:
                drawn.append(i)
        return drawn

    def record(self, index: int, pass_rate: float, drop_solved: bool) -> None:
        """The curriculum hook: called with each group's pass rate after scoring."""
        if drop_solved and pass_rate >= 1.0:
            self.retired.add(index)

    def state(self) -> dict:
        return {"order": list(self.order), "retired": sorted(self.retired), "passes": self.passes,
                "rng": self.rng.getstate()}

    def load_state(self, saved: dict) -> None:
        self.order, self.retired, self.passes = list(saved["order"]), set(saved["retired"]), saved["passes"]
        self.rng.setstate(saved["rng"])


# ---------------------------------------------------------------------------------------------------------------
# Rollout


@dataclass
class Completion:
    """One sample of a group: a single completion, or a tool episode whose last turn is `result` / `text`."""

    result: GenerationResult
    text: str
    reward: float = 0.0
    scores: dict = field(default_factory=dict)
    reward_failed: bool = False
    turns: list[EpisodeTurn] = field(default_factory=list)  # every turn of a tool episode; empty otherwise

    @property
    def generated_tokens(self) -> int:
        return sum(len(t.result.tokens) for t in self.turns) if self.turns else len(self.result.tokens)


def is_episode_row(row: dict) -> bool:
    """A tool task, rolled out as a multi-turn episode in the tool world rather than as one completion."""
    return row.get("task") == "tool" and bool(row.get("tools"))


@dataclass
class Group:
    """G completions of one prompt, rolled out in one reasoning mode and with one thinking budget."""

    row_index: int
    row: dict
    prompt_ids: list[int]
    reasoning: bool
    budget: int | None
    completions: list[Completion] = field(default_factory=list)

    @property
    def rewards(self) -> list[float]:
        return [c.reward for c in self.completions]

    def members(self, overlong: str) -> list[int]:
        """Indices of the completions that form the group for advantages: all but the cut ones with `exclude`."""
        return [k for k, c in enumerate(self.completions) if overlong != "exclude" or c.result.finished]

    def has_signal(self, overlong: str) -> bool:
        """Rewards differ inside the group (its members), so some advantage is non-zero."""
        rewards = [self.completions[k].reward for k in self.members(overlong)]
        return len(rewards) >= 2 and max(rewards) - min(rewards) > 1e-6

    def pass_rate(self, threshold: float) -> float:
        return sum(r >= threshold for r in self.rewards) / len(self.rewards)


def reward_row(group: Group, completion: Completion) -> dict:
    """The row as the rewards see it: its own fields plus what the rollout decided and measured."""
    row = {
        **group.row,
        "reasoning": "on" if group.reasoning else "off",
        "thinking_budget": group.budget,
        "thinking_tokens": completion.result.thinking_tokens,
    }
    if completion.turns:
        row["episode_turns"] = [turn.text for turn in completion.turns]
    return row


def overlong_penalty(result: GenerationResult, max_new_tokens: int, window: int) -> float:
    """DAPO's soft overlong punishment: 0 up to `max_new_tokens - window` tokens, then linear down to -1 at
    `max_new_tokens`; -1 for a completion cut there before it finished."""
    if not result.finished:
        return -1.0
    return min(0.0, (max_new_tokens - window - len(result.tokens)) / max(window, 1))


def apply_overlong_penalty(groups: list[Group], config: PolicyLossConfig, max_new_tokens: int) -> None:
    """Add the soft overlong penalty to every completion's reward (loss.overlong=soft_penalty), in place."""
    window = config.overlong_window or max_new_tokens // 4
    for group in groups:
        for c in group.completions:
            penalty = overlong_penalty(c.result, max_new_tokens, window)
            c.reward += penalty
            c.scores["overlong_penalty"] = penalty


def score_completions(scorer: RewardScorer, items: list[tuple[Group, Completion]]) -> float:
    """Score completions in place (routed by each row's task); returns the seconds spent. Never raises for a
    failing reward: the scorer gives that sample `failure_score` and counts it."""
    started = time.perf_counter()
    scored = scorer.score_batch([c.text for _, c in items], [reward_row(g, c) for g, c in items])
    for (_, completion), sample in zip(items, scored):
        completion.reward, completion.scores, completion.reward_failed = sample.score, sample.scores, sample.failed
    return time.perf_counter() - started


def rollout(
    model, tokenizer, rows: list[tuple[int, dict]], config: RolloutConfig, settings: GenerationSettings,
    scorer: RewardScorer, rng: random.Random, seed: int, rank: int = 0, world: int = 1,
) -> tuple[list[Group], dict[str, float]]:
    """Generate and score G completions for each (index, row). Returns the groups and phase timings.

    With `world` workers, worker `rank` generates and scores groups rank, rank + world, ... and the workers then
    exchange their groups' completions, so every worker returns every group. Modes and budgets come from `rng` (the
    same on every worker) and each sample draws from the random stream of its place in the whole batch, so the
    rollouts do not depend on the number of workers.
    """
    groups = []
    stated = budget_is_stated(tokenizer, config.state_budget)
    for index, row in rows:
        # Mode and budget are per prompt, shared by its G completions, so their rewards compare like with like.
        reasoning = rng.random() >= config.reasoning_off_fraction
        budget = None
        if reasoning and rng.random() < config.budget_fraction:
            budget = rng.randint(config.budget_min, config.budget_max)
        if is_episode_row(row):  # an episode's turns are not budgeted; its prompt_ids are the first turn's
            budget = None
            prompt_ids = encode_prompt(tokenizer, episode_prompt(row), reasoning, row["tools"])
        else:
            prompt_ids = encode_prompt(tokenizer, state_budget(prompt_for(row), budget if stated else None), reasoning)
        groups.append(Group(index, row, prompt_ids, reasoning, budget))
    G = config.group_size
    # (place in the whole batch, group) of each sample this worker generates
    mine = [(k * G + s, group) for k, group in enumerate(groups) if k % world == rank for s in range(G)]
    flat = [(place, group) for place, group in mine if not is_episode_row(group.row)]
    episodic = [(place, group) for place, group in mine if is_episode_row(group.row)]

    timings = {"generate": 0.0, "reward_wait": 0.0, "reward_busy": 0.0}
    # One worker thread: scoring batch k (Ray actors or reward threads) runs while batch k+1 is generated here. The
    # continuous engine takes the whole step in one call instead (its slots refill across groups), scored after it.
    per_call = max(1, len(flat)) if settings.decode == "continuous" else config.batch_size
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="score") as executor:
        pending = []
        for start in range(0, len(flat), per_call):
            places, chunk = zip(*flat[start : start + per_call])
            t0 = time.perf_counter()
            results = generate(
                model, [g.prompt_ids for g in chunk], settings=settings, budgets=[g.budget for g in chunk],
                reasoning=[g.reasoning for g in chunk], seed=seed + start, stream_ids=list(places),
            )
            timings["generate"] += time.perf_counter() - t0
            items = []
            for group, result in zip(chunk, results):
                text = completion_text(tokenizer, result.tokens)
                group.completions.append(Completion(result, text))
                items.append((group, group.completions[-1]))
            pending.append(executor.submit(score_completions, scorer, items))
        if episodic:  # all episodes advance together: turn t of every live one is one generate call
            places, chunk = zip(*episodic)
            t0 = time.perf_counter()
            # Random streams after every single completion's, by place in the whole batch: the same on any worker.
            episodes = run_episodes(model, tokenizer, [g.row for g in chunk], [g.reasoning for g in chunk], settings,
                                    config.max_turns, seed=seed, stream_offset=len(groups) * G, places=list(places))
            timings["generate"] += time.perf_counter() - t0
            items = []
            for group, episode in zip(chunk, episodes):
                group.completions.append(Completion(episode.turns[-1].result, episode.turns[-1].text,
                                                    turns=episode.turns))
                items.append((group, group.completions[-1]))
            pending.append(executor.submit(score_completions, scorer, items))
        t0 = time.perf_counter()
        timings["reward_busy"] = sum(f.result() for f in pending)
        timings["reward_wait"] = time.perf_counter() - t0  # the part of reward time generation did not hide
    if world > 1:
        for part in gather_objects([(k, g.completions) for k, g in enumerate(groups) if g.completions]):
            for k, completions in part:
                groups[k].completions = completions
    return groups, timings


def collect_groups(
    rollout_fn: Callable[[int], list[Group]], n_groups: int, config: SamplingConfig, overlong: str,
) -> tuple[list[Group], list[Group], int]:
    """Roll out until `n_groups` groups carry a learning signal (dynamic sampling) or the refill rounds run out.

    `rollout_fn(n)` rolls out n fresh prompts. Returns (kept groups, every group rolled out, refill rounds used).
    With dynamic sampling off every group is kept, signal or not (its advantages are then 0). `overlong` is
    `loss.overlong`: with `exclude`, only the finished completions count towards a group's signal.
    """
    kept: list[Group] = []
    seen: list[Group] = []
    rounds = 0
    need = n_groups
    while True:
        groups = rollout_fn(need)
        seen += groups
        kept += [g for g in groups if g.has_signal(overlong) or not config.dynamic_sampling]
        if len(kept) >= n_groups or not config.dynamic_sampling or rounds >= config.max_refill_rounds:
            return kept[:n_groups], seen, rounds
        rounds += 1
        need = n_groups - len(kept)


# ---------------------------------------------------------------------------------------------------------------
# Learner


def learner_samples(
    groups: list[Group], config: PolicyLossConfig, max_tokens_per_row: int | None = None,
) -> tuple[list[dict], torch.Tensor, dict[str, int]]:
    """Token samples for the loss and each one's advantage. [S] advantages for S samples.

    Labels hold the completion tokens the policy sampled; the prompt and forced tokens are IGNORE_INDEX; each
    sample carries the sampler's log-probs (`sampler_logps`, NaN where no token was sampled). Completions cut by
    max_new_tokens are left out with `loss.overlong` mask (they still count in their group's baseline) and exclude
    (they do not). So is a prompt plus completion longer than a learner row (`too_long_dropped`): cut to fit, it
    would lose its answer and end of turn while its trace kept the whole completion's advantage.
    """
    counts = {"overlong_filtered": 0, "too_long_dropped": 0, "forced_tokens_masked": 0, "loss_tokens": 0}
    samples, sample_adv = [], []
    for group in groups:
        if config.overlong in ("mask", "exclude"):  # the cut completions that get no loss
            counts["overlong_filtered"] += sum(not c.result.finished for c in group.completions)
        members = group.members(config.overlong)
        if len(members) < 2:  # every completion but one was cut (exclude): no baseline to compare with
            continue
        rewards = torch.tensor([[group.completions[k].reward for k in members]])  # [1, G']
        advantages = group_advantages(rewards, config.std_normalize, config.leave_one_out)[0]  # [G']
        for k, advantage in zip(members, advantages):
            completion = group.completions[k]
            if config.overlong == "mask" and not completion.result.finished:
                continue
            # An episode trains each of its turns on the prompt it was sampled from, all with the episode's advantage.
            turns = [(t.prompt_ids, t.result) for t in completion.turns] or [(group.prompt_ids, completion.result)]
            for prompt_ids, result in turns:
                if max_tokens_per_row is not None and len(prompt_ids) + len(result.tokens) > max_tokens_per_row:
                    counts["too_long_dropped"] += 1
                    continue
                labels = [IGNORE_INDEX if forced else t for t, forced in zip(result.tokens, result.forced_mask)]
                counts["forced_tokens_masked"] += sum(result.forced_mask)
                n_loss = sum(label != IGNORE_INDEX for label in labels)
                if n_loss == 0:
                    continue
                counts["loss_tokens"] += n_loss
                samples.append({
                    "input_ids": prompt_ids + result.tokens,
                    "labels": [IGNORE_INDEX] * len(prompt_ids) + labels,
                    "sampler_logps": [math.nan] * len(prompt_ids) + list(result.logprobs),
                })
                sample_adv.append(advantage)
    return samples, torch.stack(sample_adv) if sample_adv else torch.zeros(0), counts


def policy_update(
    model, samples: list[dict], advantages: torch.Tensor, config: GRPOConfig, collator: SampleCollator,
    optimizer: torch.optim.Optimizer, reference: Callable | None, rng: random.Random, rank: int = 0, world: int = 1,
    zero: ZeroEngine | None = None,
) -> dict[str, float]:
    """`epochs * minibatches` optimizer steps of the clipped loss on one rollout batch. Returns mean statistics.

    With `world` workers every worker holds the whole batch and splits it into the same minibatches (`rng` is the
    same on all); each trains on its share of every minibatch, with the loss normalised by the minibatch's tokens
    over all workers, and the gradients are summed across workers before the update: N workers take the step one
    worker takes on the whole minibatch.

    Under ZeRO (`zero`) the engine runs the forwards, reduces the gradients and steps. ZeRO-3 gathers each layer's
    weights in every forward, a collective, so every worker runs as many micro-batches as the busiest one: the
    others add micro-batches with no loss token (a zero loss that still takes part in the gathers and reductions).
    """
    device = next(model.parameters()).device
    learner = zero if zero is not None else model  # what runs the forwards
    temperature, chunk_tokens = config.rollout.temperature, config.train.loss_chunk_tokens
    order = list(range(len(samples)))
    rng.shuffle(order)
    parts = [order[m :: config.loss.minibatches] for m in range(config.loss.minibatches)]
    parts = [p[rank::world] for p in parts if p]

    # Each minibatch -> micro-batches of packed rows, collated once and reused by every epoch.
    minibatches = []
    for part in parts:
        if not part:  # a worker without samples in this minibatch still takes part in the gradient sum
            minibatches.append([])
            continue
        lengths = [len(samples[i]["input_ids"]) for i in part]
        plan = plan_packed_batches(lengths, config.train.max_tokens_per_row, config.train.rows_per_micro_batch, seed=None)
        micro = []
        for local in plan:
            indices = [part[j] for j in local]
            batch = collator([samples[i] for i in indices])
            batch = {k: v.to(device) if torch.is_tensor(v) else v for k, v in batch.items()}
            owner = batch["sample_ids"][:, 1:]  # [R, T-1] sample of each target token, -1 on the tail
            adv = advantages[indices].to(device)  # [S_micro]
            batch["token_adv"] = torch.where(owner >= 0, adv[owner.clamp(min=0)], 0.0)  # [R, T-1]
            batch["loss_mask"] = batch["labels"][:, 1:] != IGNORE_INDEX  # [R, T-1]
            micro.append(batch)
        minibatches.append(micro)
    fillers = 0
    if zero is not None and world > 1:
        filler = collator([samples[0]])  # every worker holds every sample
        filler = {k: v.to(device) if torch.is_tensor(v) else v for k, v in filler.items()}
        filler["token_adv"] = torch.zeros(filler["labels"][:, 1:].shape, device=device)
        filler["loss_mask"] = torch.zeros_like(filler["token_adv"], dtype=torch.bool)
        filler["filler"] = True
        for micro in minibatches:
            added = all_reduce_max(len(micro)) - len(micro)
            micro.extend(dict(filler) for _ in range(added))
            fillers += added

    # Log-probs of the sampling policy, computed once before any update. The first minibatch of the first epoch
    # is still on-policy when it is trained, so its own forward gives them (logps.detach()) and one pass is saved.
    # Train mode, as in the updates: NemotronH runs its fused Mamba kernel only there (eval mode, which generation
    # leaves the model in, takes the unfused path).
    model.train()
    with torch.no_grad():
        for m, micro in enumerate(minibatches):
            for batch in micro:
                batch["old_logps"] = None
                if m > 0:
                    batch["old_logps"] = model_token_logps(learner, batch, chunk_tokens, temperature)
                if reference is not None:
                    batch["ref_logps"] = reference(batch)

    totals: dict[str, float] = {"loss": 0.0, "clipped_low": 0.0, "clipped_high": 0.0, "approx_kl_old": 0.0,
                                "kl_ref": 0.0, "tis_weight": 0.0, "grad_norm": 0.0}
    tokens_total, updates, tokens_trained = 0, 0, 0
    mismatch = MismatchMeter()
    model.train()
    trainable = [p for p in model.parameters() if p.requires_grad]
    for epoch in range(config.loss.epochs):
        for micro in minibatches:
            n_tokens = sum(int(b["loss_mask"].sum()) for b in micro)  # token-level: normalise by the step's tokens
            if world > 1:
                n_tokens = int(all_reduce_sum(torch.tensor([n_tokens], dtype=torch.float64))[0])
            for i, batch in enumerate(micro):
                logps = model_token_logps(learner, batch, chunk_tokens, temperature)  # [R, T-1]
                if batch["old_logps"] is None:
                    batch["old_logps"] = logps.detach()
                mask = batch["loss_mask"]
                old_logps = batch["old_logps"][mask]  # [N]
                sampler_logps = batch["sampler_logps"][:, 1:].to(device)[mask] if "sampler_logps" in batch \
                    else torch.full_like(old_logps, math.nan)  # [N]; NaN: not sampled here (no comparison)
                if epoch == 0:
                    mismatch.add(old_logps, sampler_logps)
                ref_logps = batch["ref_logps"][mask] if reference is not None else None
                is_weights = None
                if config.loss.tis_cap:  # old (learner) / sampler, capped; a token without sampler log-prob: 1
                    is_weights = torch.exp(old_logps - sampler_logps).nan_to_num(1.0).clamp(max=config.loss.tis_cap)
                loss, stats = clipped_policy_loss(
                    logps[mask], old_logps, batch["token_adv"][mask],  # [N] each
                    config.loss.clip_low, config.loss.clip_high, ref_logps, config.loss.kl_coef, is_weights,
                )
                if zero is not None:  # ZeRO averages the workers' gradients, the plain path sums them
                    zero.backward(loss.sum() * world / max(n_tokens, 1), last=i == len(micro) - 1)
                else:
                    (loss.sum() / n_tokens).backward()
                totals["loss"] += float(loss.detach().sum())
                for key, value in stats.items():
                    totals[key] += float(value.sum())
                if not batch.get("filler"):
                    tokens_trained += int((batch["sample_ids"] >= 0).sum())  # real tokens, row tails excluded
            tokens_total += n_tokens
            if zero is not None:
                grad_norm = zero.grad_norm()  # the engine clipped and stepped after the last micro-batch
            else:
                if world > 1:
                    sum_gradients(trainable)
                grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), config.train.max_grad_norm)
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
            totals["grad_norm"] += float(grad_norm)
            updates += 1
    if world > 1:  # the sums over every worker's tokens (the gradient norm is already global)
        summed = all_reduce_sum(torch.tensor([totals[k] for k in totals if k != "grad_norm"] +
                                             [tokens_trained, fillers], dtype=torch.float64))
        totals.update(zip([k for k in totals if k != "grad_norm"], summed.tolist()))
        tokens_trained, fillers = int(summed[-2]), int(summed[-1])
        mismatch.gather()
    out = {k: v / max(tokens_total, 1) for k, v in totals.items() if k != "grad_norm"}
    out["grad_norm"] = totals["grad_norm"] / max(updates, 1)
    if reference is None:
        out.pop("kl_ref")
    if not config.loss.tis_cap:
        out.pop("tis_weight")
    out |= mismatch.stats()
    out["updates"] = updates
    out["tokens_trained"] = tokens_trained
    if zero is not None:
        out["filler_micro_batches"] = fillers  # added so that every worker ran as many as the busiest
    return out


def make_reference(model, config: GRPOConfig) -> Callable | None:
    """Reference log-probs for the KL term, or None when KL is off.

    With LoRA the reference is the same model with its adapters disabled (no second copy of the weights);
    otherwise a frozen copy of the start checkpoint.
    """
    if not config.loss.kl_coef:
        return None
    temperature, chunk_tokens = config.rollout.temperature, config.train.loss_chunk_tokens
    if config.lora.enabled:
        def reference(batch: dict) -> torch.Tensor:
            with model.disable_adapter():
                return model_token_logps(model, batch, chunk_tokens, temperature)
        return reference
    frozen = copy.deepcopy(model).train().requires_grad_(False)  # train mode: the policy's kernels (see above)
    enable_packed_sequences(frozen)

    def reference(batch: dict) -> torch.Tensor:
        return model_token_logps(frozen, batch, chunk_tokens, temperature)

    return reference


# ---------------------------------------------------------------------------------------------------------------
# Reporting


def sample_records(groups: list[Group], tokenizer, n: int, step: int) -> list[dict]:
    """A few completions with what decided them, for samples.jsonl: one per group, first groups first."""
    records = []
    for group in groups[:n]:
        c = group.completions[0]
        records.append({
            "step": step, "id": group.row.get("id"), "task": group.row.get("task", "math"),
            "reasoning": group.reasoning, "budget": group.budget,
            "prompt": tokenizer.decode(group.prompt_ids[-48:]), "completion": c.text, "reward": c.reward,
            **({"episode_turns": [t.text for t in c.turns]} if c.turns else {}),
            "scores": c.scores, "group_rewards": group.rewards, "finished": c.result.finished,
            "forced_close": c.result.forced_close, "thinking_tokens": c.result.thinking_tokens,
        })
    return records


def plot_reward_curve(history: list[dict], path: Path) -> None:
    """Mean reward and pass rate of the rollouts per step, and mean completion length."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = [h["step"] for h in history]
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    axes[0].plot(steps, [h["reward_mean"] for h in history], marker=".", label="mean reward (all rollouts)")
    axes[0].plot(steps, [h["pass_rate"] for h in history], marker=".", alpha=0.6, label="pass rate")
    window = 5
    smooth = [sum(h["reward_mean"] for h in history[max(0, i - window + 1) : i + 1]) / min(i + 1, window)
              for i in range(len(history))]
    axes[0].plot(steps, smooth, color="black", label=f"mean reward, {window}-step average")
    axes[0].set_title("reward")
    axes[0].set_ylim(-0.02, 1.02)
    axes[1].plot(steps, [h["completion_tokens_mean"] for h in history], marker=".", label="completion tokens")
    axes[1].plot(steps, [h["thinking_tokens_mean"] for h in history], marker=".", label="thinking tokens")
    axes[1].set_title("length")
    for ax in axes:
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def step_metrics(kept: list[Group], seen: list[Group], threshold: float, overlong: str) -> dict[str, float]:
    completions = [c for g in seen for c in g.completions]
    rewards = [c.reward for c in completions]
    mean = sum(rewards) / len(rewards)
    return {
        "reward_mean": mean,
        "reward_std": math.sqrt(sum((r - mean) ** 2 for r in rewards) / len(rewards)),
        "pass_rate": sum(r >= threshold for r in rewards) / len(rewards),
        "groups_rolled_out": len(seen),
        "groups_kept": len(kept),
        "groups_zero_variance": sum(not g.has_signal(overlong) for g in seen),
        "reward_failures": sum(c.reward_failed for c in completions),
        "completion_tokens_mean": sum(c.generated_tokens for c in completions) / len(completions),
        "thinking_tokens_mean": sum(c.result.thinking_tokens for c in completions) / len(completions),
        "finished_rate": sum(c.result.finished for c in completions) / len(completions),
        "forced_close_rate": sum(c.result.forced_close for c in completions) / len(completions),
        "reasoning_off_rate": sum(not g.reasoning for g in seen) / len(seen),
        "budgeted_rate": sum(g.budget is not None for g in seen) / len(seen),
    }


# ---------------------------------------------------------------------------------------------------------------
# The stage


def run_grpo(config: GRPOConfig) -> dict:
    setup_logging()
    check_paths(config)  # a mistyped path fails here, naming its key, before the output folder exists
    check_reward_names(config.rewards, "rewards")
    out = Path(config.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    device = pick_device(config.device)
    if config.cpu_threads and device.type == "cpu":
        # Tiny matrices gain nothing from a second thread, and on a loaded machine threads that wait for each
        # other are descheduled: one thread ran the tiny model's decoding ~20x faster than two under load.
        torch.set_num_threads(config.cpu_threads)
    seed_everything(config.train.seed)
    rng = random.Random(config.train.seed)  # the same draws on every worker: prompts, modes, budgets, minibatches
    rank, world = distributed_rank_world()
    decode = decode_for_workers(config.rollout.decode, "rollout.decode") if world > 1 else config.rollout.decode
    zero_settings = full_weight_settings(config.train, world, bf16=config.model.dtype == "bfloat16")

    # Model and tokenizer: from an SFT/DPO checkpoint (its manifest is recorded), or anything load_model takes.
    start = Path(config.model.name_or_path)
    parent = read_manifest(start) if (start / "manifest.json").is_file() else {}
    splits = guard_splits("grpo", rl=config.data.train_path, test=config.eval.test_path,  # before anything loads
                          tool_rl=config.data.tool_prompts_path, tool_test=config.eval.tool_test_path)
    prompt_files = [path for path in (config.data.train_path, config.data.tool_prompts_path) if path]
    tokenizer = load_tokenizer(config.model)
    model = load_model(config.model, device)
    if config.lora.enabled:
        model = apply_lora(model, config.lora)
    if dropped := disable_dropout(model):
        log.info("dropout off in %d modules: old and new log-probs must agree before an update", dropped)
    packed_path = enable_packed_sequences(model)
    if config.train.activation_checkpointing:
        enable_activation_checkpointing(model)
    reference = make_reference(model, config)
    log.info("start: %s (stage %s); learner: packed (%s)", start, parent.get("stage", "?"), packed_path)
    log.info("learner loss: %s; activation checkpointing: %s", describe_loss_path(config.train.loss_chunk_tokens),
             activation_checkpointing_status(model))

    # Prompts: the training rows (any task), plus tool tasks and synthetic code tasks when asked.
    rows, report = read_rows(config.data.train_path, "prompt", config.data.max_bad_fraction)
    if config.data.max_prompts:
        rows = rows[: config.data.max_prompts]
    if config.data.tool_prompts_path:
        rows += read_rows(config.data.tool_prompts_path, "prompt", config.data.max_bad_fraction)[0]
    if episodes := sum(is_episode_row(row) for row in rows):
        log.info("%d tool tasks roll out as episodes of up to %d turns (reward: the `tool` route)", episodes,
                 config.rollout.max_turns)
    if config.data.code_tasks:
        rows += generate_code_tasks(config.data.code_tasks, seed=config.train.seed)
    pool = PromptPool(rows, seed=config.train.seed)
    test_rows, _ = read_rows(config.eval.test_path, "prompt", config.eval.max_bad_fraction)
    log.info("%d training prompts; %d held-out rows", len(rows), len(test_rows[: config.eval.max_samples or None]))

    settings = dataclasses.replace(
        generation_settings(tokenizer, config.eval), temperature=config.rollout.temperature,
        top_p=config.rollout.top_p, max_new_tokens=config.rollout.max_new_tokens, batch_size=config.rollout.batch_size,
        grace_tokens=None, grace_fraction=config.rollout.grace_fraction,
        decode=decode, ssm_state_dtype=config.rollout.ssm_state_dtype,
    )
    scorer = RewardScorer(config.rewards)
    collator = SampleCollator(mode="packed", pad_token_id=tokenizer.pad_token_id,
                              max_tokens_per_row=config.train.max_tokens_per_row)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=config.train.lr,
                                  weight_decay=config.train.weight_decay, betas=(0.9, 0.99))
    results: dict[str, dict] = {}
    if config.evaluate_before and rank == 0:
        results["before"] = evaluate_model(model, tokenizer, test_rows, config.eval)

    # Under ZeRO the engine holds this worker's shard of the weights and of AdamW; rollouts gather the weights.
    zero = ZeroEngine(model, optimizer, zero_settings, device) if zero_settings else None
    if zero is not None:
        optimizer = zero.optimizer
    gathered = zero.gathered_for_generation if zero is not None else contextlib.nullcontext

    # Resume: the saved state belongs to this config, these prompts and this start checkpoint (its creation time).
    # A sharded state loads only on as many workers as wrote it.
    fingerprint = run_fingerprint(config, *prompt_files, salt=str(parent.get("created", "")) +
                                  (f" world={world}" if zero is not None else ""))
    state = TrainState(rng=rng)
    if zero is not None:
        resumed = resume_sharded_training(out / "last", fingerprint, zero, state)
    else:
        resumed = resume_training(out / "last", fingerprint, model, optimizer, state)
    history: list[dict] = []
    rollout_calls = [0]
    if resumed:
        pool.load_state(state.extra["pool"])
        rollout_calls[0], history = state.extra["rollout_calls"], state.extra["history"]
        log.info("resumed from step %d (%s)", state.step, out / "last")
    metrics = MetricsLogger(out, "grpo", resume_step=state.step if resumed else None, records=("samples.jsonl",),
                            tracking=config.tracking, run_config=to_dict(config)) if rank == 0 else None
    if world > 1:
        log.info("worker %d of %d: rolls out groups %d, %d, ... of each step and trains on its share of each "
                 "minibatch", rank, world, rank, rank + world)
    samples_path = out / "samples.jsonl"
    started = time.time() - state.seconds
    try:
        progress = tqdm(range(state.step, config.train.max_steps), desc="grpo", unit="step", dynamic_ncols=True,
                        initial=state.step, total=config.train.max_steps, disable=rank != 0)
        for step in progress:
            t_step = time.perf_counter()
            timings = {"generate": 0.0, "reward_wait": 0.0, "reward_busy": 0.0}

            def rollout_fn(n: int) -> list[Group]:
                drawn = [(i, pool.rows[i]) for i in pool.draw(n)]
                rollout_calls[0] += 1
                with gathered():
                    groups, t = rollout(model, tokenizer, drawn, config.rollout, settings, scorer, rng,
                                        seed=config.train.seed * 1_000_003 + rollout_calls[0] * 10_007,
                                        rank=rank, world=world)
                for key in timings:
                    timings[key] += t[key]
                for group in groups:  # curriculum hook, on the task's reward
                    pool.record(group.row_index, group.pass_rate(config.sampling.pass_threshold),
                                config.sampling.drop_solved)
                if config.loss.overlong == "soft_penalty":
                    apply_overlong_penalty(groups, config.loss, config.rollout.max_new_tokens)
                return groups

            # 1-2. Rollout with dynamic sampling.
            kept, seen, refills = collect_groups(rollout_fn, config.rollout.prompts_per_step, config.sampling,
                                                 config.loss.overlong)

            # 3. Learn.
            for group in optimizer.param_groups:  # constant after a linear warmup (the Nemotron RL schedule)
                group["lr"] = config.train.lr * min(1.0, (step + 1) / max(1, config.train.warmup_steps))
            t_learn = time.perf_counter()
            samples, advantages, counts = learner_samples(kept, config.loss, config.train.max_tokens_per_row)
            if counts["too_long_dropped"]:
                log.warning("step %d: %d samples longer than train.max_tokens_per_row (%d) left out of the loss",
                            step, counts["too_long_dropped"], config.train.max_tokens_per_row)
            learn = {}
            if samples:
                learn = policy_update(model, samples, advantages, config, collator, optimizer, reference, rng,
                                      rank=rank, world=world, zero=zero)
                if learn["mismatch_kl_k3"] > config.loss.mismatch_warn_kl:
                    log.warning("step %d: the sampler's log-probs differ from the learner's (k3 KL %.4f, mean |dlogp| "
                                "%.4f, max %.3f): the decode path is not the distribution being trained; check "
                                "rollout decode settings, or set loss.tis_cap", step, learn["mismatch_kl_k3"],
                                learn["mismatch_abs_mean"], learn["mismatch_abs_max"])
            else:
                log.warning("step %d: no group with a learning signal after %d refills; no update", step, refills)
            time_learn = time.perf_counter() - t_learn
            time_step = time.perf_counter() - t_step

            tokens_generated = sum(c.generated_tokens for g in seen for c in g.completions)
            record = {
                **step_metrics(kept, seen, config.sampling.pass_threshold, config.loss.overlong),
                "refill_rounds": refills, "samples_trained": len(samples), **counts, **learn,
                "pool_retired": len(pool.retired), "lr": optimizer.param_groups[0]["lr"],
                "time_generate": timings["generate"], "time_reward": timings["reward_wait"],
                "time_reward_busy": timings["reward_busy"], "time_learn": time_learn, "time_step": time_step,
                "tokens_generated": tokens_generated,
                "generate_tokens_per_s": tokens_generated / max(timings["generate"], 1e-9),
                "train_tokens_per_s": learn.get("tokens_trained", 0) / max(time_learn, 1e-9),
            }
            if metrics:
                metrics.log(step, **record)
            history.append({"step": step, **record})
            progress.set_postfix(reward=f"{record['reward_mean']:.2f}", kept=len(kept),
                                 gen=f"{timings['generate']:.0f}s", learn=f"{time_learn:.0f}s")
            if rank == 0 and (step % config.train.sample_every == 0 or step == config.train.max_steps - 1):
                records = sample_records(seen, tokenizer, config.train.samples_logged, step)
                with samples_path.open("a", encoding="utf-8") as handle:
                    handle.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in records)
                log.info("step %d sample (reward %.2f, reasoning %s, budget %s): %r", step, records[0]["reward"],
                         records[0]["reasoning"], records[0]["budget"], records[0]["completion"][:200])
            state.step = step + 1
            saving = config.train.save_every and state.step % config.train.save_every == 0
            if saving and state.step < config.train.max_steps:
                state.seconds = time.time() - started
                state.extra = {"pool": pool.state(), "rollout_calls": rollout_calls[0], "history": history}
                if zero is not None:  # every worker writes its shard
                    save_sharded_training_state(out / "last", fingerprint, zero, state, rank)
                elif rank == 0:  # the weights are the same on every worker
                    save_training_state(out / "last", fingerprint, model, optimizer, state, trainable_only=True)
    finally:
        scorer.close()
    train_seconds = time.time() - started
    if zero is not None:  # the shards gathered into a plain model on rank 0, for evaluation and the checkpoint
        weights = zero.full_state_dict(rank)
        zero.close()
        model = optimizer = zero = None
        gc.collect()  # the sharded parameters and the optimizer hold each other: free them before rebuilding
        if device.type == "cuda":
            torch.cuda.empty_cache()
        if rank == 0:
            model = load_model(config.model, device)
            model.load_state_dict(weights)
    if rank != 0:
        return {}
    plot_reward_curve(history, out / "reward_curve.png")

    # Evaluate on the held-out split.
    results["after"] = evaluate_model(model, tokenizer, test_rows, config.eval)
    (out / "eval.json").write_text(json.dumps(results, indent=2))
    metrics.log(config.train.max_steps, **{k: v for k, v in results["after"].items() if isinstance(v, float)})
    for record in ("reward_curve.png", "eval.json"):
        metrics.log_file(out / record)
    metrics.close()

    # Checkpoint (atomic) with its manifest.
    summary = {k: v for k, v in results["after"].items() if k != "examples"}
    if "before" in results:
        summary["before"] = {k: v for k, v in results["before"].items() if k != "examples"}
    phase_totals = {f"{k}_s": round(sum(h[f"time_{k}"] for h in history), 1)
                    for k in ("generate", "reward", "reward_busy", "learn", "step")}
    manifest = {
        "stage": "grpo",
        "config": to_dict(config),
        "parent": {"path": str(start), "stage": parent.get("stage"), "created": parent.get("created")},
        "data_fingerprint": fingerprint_files(*prompt_files),
        "data": {"train": report.summary(), "prompts": len(rows), "retired_by_curriculum": len(pool.retired)},
        "packing": str(packed_path),
        "splits": splits,
        "train_seconds": round(train_seconds, 1),
        "phase_seconds": phase_totals,
        "reward_failures": dict(scorer.failure_counts),
        "metrics": summary,
    }
    checkpoint = save_model_checkpoint(out / "checkpoint", model, tokenizer, manifest)
    shutil.rmtree(out / "last", ignore_errors=True)  # the finished checkpoint supersedes the resumable state
    print(f"checkpoint:   {checkpoint}\nmetrics:      {out / 'metrics.jsonl'}\neval:         {out / 'eval.json'}\n"
          f"reward curve: {out / 'reward_curve.png'}\nsamples:      {samples_path}")
    print(_summary_line(results, train_seconds, phase_totals))
    summary["train_seconds"] = round(train_seconds, 1)
    return summary


def _summary_line(results: dict[str, dict], train_seconds: float, phases: dict[str, float]) -> str:
    def cells(s: dict) -> str:
        sweep = " ".join(f"{'inf' if c['budget'] is None else c['budget']}:{c['accuracy']:.3f}" for c in s["budget_sweep"])
        tools = (f" | tool success think {s['tools']['success_think']:.3f} / no-think "
                 f"{s['tools']['success_no_think']:.3f}" if s.get("tools") else "")
        return f"think {s['accuracy_think']:.3f} | no-think {s['accuracy_no_think']:.3f} | budgets {sweep}{tools}"

    lines = [f"{name:>6}: {cells(s)}" for name, s in results.items()]
    lines.append(f"train {train_seconds:.0f}s (generate {phases['generate_s']:.0f}s, reward wait {phases['reward_s']:.0f}s, "
                 f"learn {phases['learn_s']:.0f}s)")
    return "\n".join(lines)
