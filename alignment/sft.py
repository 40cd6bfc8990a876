"""SFT stage: supervised fine-tuning on reasoning-on/off (and truncated-thinking) chat traces.

Reads top to bottom: build model and tokenizer, build data (rows -> tokens + loss mask -> packed rows), train,
evaluate on the held-out split, write the checkpoint. Loss is taken only on assistant tokens; the prompt and the
template's think prefill are masked.

    align sft configs/tiny/sft.yaml train.max_steps=200 lora.enabled=true
"""

from __future__ import annotations

import contextlib
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
from tqdm.auto import tqdm

from alignment.activation_checkpointing import activation_checkpointing_status, enable_activation_checkpointing
from alignment.chat_format import IGNORE_INDEX, encode_for_training, encode_row_for_training, mark_stated_budget
from alignment.checkpoint import save_model_checkpoint
from alignment.config import ConfigError, check_paths, option, relative_to_cwd, to_dict
from alignment.data import fingerprint_files, read_rows
from alignment.evaluate import EvalConfig, evaluate_model
from alignment.graphed_step import GraphedTrainStep, capturable_adamw, set_learning_rate
from alignment.lora import LoraConfig, apply_lora
from alignment.modeling import ModelConfig, load_model, load_tokenizer
from alignment.packed_model import PackedPath, enable_packed_sequences
from alignment.packing import SampleCollator, plan_packed_batches
from alignment.runtime import distributed_rank_world, pick_device, seed_everything, setup_logging, to_device
from alignment.resume import (TrainState, resume_sharded_training, resume_training, run_fingerprint,
                              save_sharded_training_state, save_training_state)
from alignment.split_guard import guard_splits
from alignment.token_logprobs import describe_loss_path, model_token_logps
from alignment.trackers import TrackingConfig
from alignment.tracking import MetricsLogger
from alignment.zero import chunked_loss_unusable
from data_recipes.truncation import TruncationConfig, mask_forced_close, truncate_rows
from envs.answers import THINK_CLOSE

log = logging.getLogger(__name__)


@dataclass
class SFTDataConfig:
    """Training data and how it becomes tokens."""

    train_path: str = option(
        "runs/data/tiny/train.jsonl", "JSONL training rows (see data_recipes/synthetic_math.py).", path="file"
    )
    test_path: str = option(
        "runs/data/tiny/test.jsonl", "Held-out rows for the evaluation after training.", path="file"
    )
    unpacked_paths: list = option(
        [], "More JSONL training rows, each sample in a row of its own (never packed with another), mixed into the "
            "same run: Nano 2 trained tool calling so, packing had hurt it. A tool conversation trains every "
            "assistant turn, calls included. No truncated-thinking rows are made from these.")
    max_seq_len: int = option(512, "Longer conversations are dropped (counted in the manifest).")
    max_bad_fraction: float = option(0.01, "Stop when more than this fraction of rows is malformed.")
    truncation: TruncationConfig = option(TruncationConfig(), "Truncated-thinking rows that teach budget control.")


@dataclass
class TrainConfig:
    """Optimisation."""

    max_steps: int = option(750, "Optimizer steps.")
    batch_size: int = option(32, "Samples per optimizer step (padded) or the token equivalent when packing.")
    grad_accum: int = option(1, "Micro-batches per optimizer step; the loss is normalised over all their tokens.")
    packing: bool = option(True, "Pack samples into rows (correct for Mamba layers via seq_idx); false pads.")
    max_tokens_per_row: int = option(4096, "Token budget of one packed row.")
    lr: float = option(2e-3, "Peak learning rate (real models: ~5e-6 full, ~1e-4 LoRA).")
    schedule: Literal["cosine", "wsd", "constant"] = option("cosine", "Learning-rate schedule after warmup.")
    warmup_steps: int = option(30, "Linear warmup steps.")
    decay_fraction: float = option(0.2, "WSD: fraction of steps spent decaying at the end.")
    min_lr_ratio: float = option(0.05, "Final learning rate as a fraction of the peak (cosine and WSD).")
    weight_decay: float = option(0.0, "AdamW weight decay.")
    max_grad_norm: float = option(1.0, "Gradient clipping norm.")
    seed: int = option(0, "Seed for data order and dropout.")
    save_every: int = option(0, "Save a resumable training state every this many steps (0: only at the end).")
    log_every: int = option(20, "Log metrics every this many steps.")
    deepspeed: str = option(
        "",
        "DeepSpeed JSON config (e.g. configs/deepspeed/zero3.json): shard weights, gradients and AdamW states with "
        "ZeRO over the workers (what full fine-tuning of a 9B model needs). Empty: plain data parallel (DDP).",
        path="file",
    )
    cuda_graphs: bool = option(
        False,
        "Capture the packed training step once as a CUDA graph and replay it (about 2x faster for small models "
        "whose step is host-bound). Needs CUDA, packing, bf16 varlen attention, the Mamba kernels, one worker and "
        "grad_accum 1; otherwise the stage says why and runs eagerly.",
    )
    loss_chunk_tokens: int = option(
        0,
        "Apply the LM head and the loss this many tokens at a time, each chunk recomputed in backward, so the full "
        "[tokens, vocabulary] logits never exist (~1.3 MB per token at a 131k vocabulary). 0 (default): full "
        "logits, which a small vocabulary wants.",
    )
    activation_checkpointing: bool = option(
        False, "Recompute each decoder block's activations in backward instead of keeping them (long rows).",
    )

    def validate(self) -> None:
        if self.max_steps < 1 or self.batch_size < 1 or self.grad_accum < 1:
            raise ValueError("max_steps, batch_size and grad_accum must be at least 1")
        if self.lr <= 0:
            raise ValueError("lr must be positive")
        if self.loss_chunk_tokens < 0:
            raise ValueError("loss_chunk_tokens must be >= 0 (0: full logits)")


@dataclass
class SFTConfig:
    """Supervised fine-tuning."""

    model: ModelConfig = option(ModelConfig(), "Model to start from.")
    data: SFTDataConfig = option(SFTDataConfig(), "Data.")
    train: TrainConfig = option(TrainConfig(), "Optimisation.")
    lora: LoraConfig = option(LoraConfig(), "LoRA.")
    eval: EvalConfig = option(EvalConfig(), "Evaluation after training (on data.test_path; eval.test_path is unused).")
    output_dir: str = option("runs/tiny/sft", "Run directory: checkpoint/, metrics.jsonl, tensorboard/, eval.json.")
    device: str = option("auto", "cpu, cuda, cuda:N or auto.")
    tracking: TrackingConfig = option(TrackingConfig(), "Experiment trackers: tensorboard, wandb, mlflow, trackio.")

    def validate(self) -> None:
        if self.train.packing and self.train.max_tokens_per_row < self.data.max_seq_len:
            raise ValueError("train.max_tokens_per_row must be >= data.max_seq_len so no sample is cut")

    def unused_paths(self) -> tuple[str, ...]:
        """The evaluation after training reads data.test_path (`check_paths` skips eval.test_path)."""
        return ("eval.test_path",)


def learning_rate(step: int, config: TrainConfig) -> float:
    """Warmup, then cosine / warmup-stable-decay / constant."""
    if step < config.warmup_steps:
        return config.lr * (step + 1) / config.warmup_steps
    floor = config.lr * config.min_lr_ratio
    if config.schedule == "constant":
        return config.lr
    if config.schedule == "cosine":
        progress = (step - config.warmup_steps) / max(1, config.max_steps - config.warmup_steps)
        return floor + (config.lr - floor) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
    decay_start = int(config.max_steps * (1 - config.decay_fraction))
    if step < decay_start:
        return config.lr
    progress = (step - decay_start) / max(1, config.max_steps - decay_start)
    return config.lr - (config.lr - floor) * min(1.0, progress)


def token_loss_sum(model, batch: dict, loss_chunk_tokens: int = 0) -> torch.Tensor:
    """Summed next-token NLL over the batch's target tokens; from full logits, or `loss_chunk_tokens` at a time.

    Nothing is read back to the host, so the GPU never waits for Python here.
    """
    return -model_token_logps(model, batch, loss_chunk_tokens).sum()


def micro_batches(samples: list[dict], config: TrainConfig, rng: random.Random, epoch: int) -> list[list[int]]:
    """Index groups for one pass over the data: by sample count when padding, by packed rows when packing."""
    if not config.packing:
        order = list(range(len(samples)))
        rng.shuffle(order)
        return [order[i : i + config.batch_size] for i in range(0, len(order), config.batch_size)]
    lengths = [len(s["input_ids"]) for s in samples]
    return plan_packed_batches(lengths, config.max_tokens_per_row, packed_rows(samples, config), seed=config.seed + epoch,
                               alone=[s.get("pack", True) is False for s in samples])


def packed_rows(samples: list[dict], config: TrainConfig) -> int:
    """Rows per packed micro-batch: about `batch_size` mean-length samples' worth of tokens."""
    mean_len = sum(len(s["input_ids"]) for s in samples) / len(samples)
    return max(1, round(config.batch_size * mean_len / config.max_tokens_per_row))


def cuda_graphs_unusable(config: TrainConfig, device: torch.device, packed: PackedPath | None, world: int) -> str | None:
    """Why the training step cannot be captured as a CUDA graph here, or None when it can."""
    if device.type != "cuda":
        return "not on CUDA"
    if packed is None:
        return "packing is off"
    if packed.attention != "varlen":
        return f"attention path {packed.attention!r} reads sample boundaries back to the host (varlen: bf16 on CUDA)"
    if packed.mamba not in ("cuda-kernels", "none"):
        return f"Mamba path {packed.mamba!r} is not capturable (it needs the mamba-ssm and causal-conv1d kernels)"
    if world > 1:
        return "data-parallel steps are not captured"
    if config.deepspeed:
        return "DeepSpeed runs its own step"
    if config.grad_accum != 1:
        return "grad_accum > 1"
    if config.activation_checkpointing:
        return "activation checkpointing is on (the captured step is not checked with recomputed blocks)"
    return None


def graphed_sft_step(model, optimizer, samples: list[dict], config: TrainConfig) -> GraphedTrainStep:
    """The SFT step as a CUDA graph, shaped for this data's packed micro-batches (larger ones run eagerly)."""
    rows = packed_rows(samples, config)
    plan = micro_batches(samples, config, random.Random(config.seed), 0)
    return GraphedTrainStep(
        model, optimizer, token_loss_sum, rows=rows, tokens_per_row=config.max_tokens_per_row,
        # Room for twice the first pass's fullest micro-batch (later passes group samples differently) plus each
        # row's tail and extension; a batch beyond it runs eagerly.
        max_segments=2 * max(len(g) for g in plan) + 2 * rows, max_grad_norm=config.max_grad_norm,
    )


def eager_step(trained, model, optimizer, mine: list[dict], n_targets: int, world: int, device: torch.device,
               max_grad_norm: float, state: TrainState, loss_chunk_tokens: int) -> tuple[torch.Tensor, torch.Tensor]:
    """One optimizer step over this worker's micro-batches; returns (summed loss of all workers, grad norm)."""
    total = torch.zeros((), device=device)
    for i, batch in enumerate(mine):
        batch = to_device(batch, device)
        # DDP averages gradients over workers; scaling by `world` turns that average back into the global sum.
        sync = contextlib.nullcontext() if world == 1 or i == len(mine) - 1 else trained.no_sync()
        with sync:
            loss_sum = token_loss_sum(trained, batch, loss_chunk_tokens)
            (loss_sum * world / n_targets).backward()
        total += loss_sum.detach()
        state.tokens_seen += int(batch["input_ids"].numel()) * world
    if world > 1:
        torch.distributed.all_reduce(total)
    grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), max_grad_norm)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return total, grad_norm


def zero_step(zero, mine: list[dict], n_targets: int, world: int, device: torch.device,
              state: TrainState, loss_chunk_tokens: int) -> tuple[torch.Tensor, float]:
    """`eager_step` under DeepSpeed ZeRO: the engine reduces (and shards) gradients, clips and steps."""
    total = torch.zeros((), device=device)
    for batch in mine:
        batch = to_device(batch, device)
        loss_sum = token_loss_sum(zero, batch, loss_chunk_tokens)
        zero.backward(loss_sum * world / n_targets)  # ZeRO averages gradients over workers, like DDP
        total += loss_sum.detach()
        state.tokens_seen += int(batch["input_ids"].numel()) * world
    if world > 1:
        torch.distributed.all_reduce(total)
    return total, zero.grad_norm()


class LossOnTheBar:
    """The progress bar's loss on a GPU between log steps, without waiting for the GPU: each step's loss is copied
    to pinned host memory behind the step's kernels and shown once the copy has landed (a step late at most)."""

    def __init__(self, progress):
        self.progress, self.host, self.copied, self.shown = progress, None, None, None

    def show_when_ready(self, total: torch.Tensor, n_targets: int, lr: float) -> None:
        if self.copied is not None and self.copied.query():  # the previous step's copy is done
            self.progress.set_postfix(loss=f"{float(self.host) / self.shown[0]:.3f}", lr=f"{self.shown[1]:.1e}")
        elif self.copied is not None:
            return  # still in flight: keep it, show it next time
        if self.host is None:
            self.host = torch.empty((), dtype=total.dtype, pin_memory=True)
        self.host.copy_(total.detach().reshape(()), non_blocking=True)
        self.copied, self.shown = torch.cuda.Event(), (n_targets, lr)
        self.copied.record()


def build_model(config: SFTConfig, device: torch.device):
    model = load_model(config.model, device)
    return apply_lora(model, config.lora) if config.lora.enabled else model


def run_sft(config: SFTConfig) -> dict:
    setup_logging()
    check_paths(config)  # a mistyped path fails here, naming its key, before the output folder exists
    for i, path in enumerate(config.data.unpacked_paths):
        if not Path(path).is_file():
            raise ConfigError(f"`data.unpacked_paths[{i}]`: no such file: {path}{relative_to_cwd(Path(path))}")
    out = Path(config.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    device = pick_device(config.device)
    seed_everything(config.train.seed)
    rank, world = distributed_rank_world()
    zero_settings = None
    if config.train.deepspeed:  # read before the model loads: a bad file fails in seconds, not after minutes
        from alignment.zero import deepspeed_config

        zero_settings = deepspeed_config(config.train.deepspeed, max_grad_norm=config.train.max_grad_norm,
                                         grad_accum=config.train.grad_accum, world=world,
                                         bf16=config.model.dtype == "bfloat16")

    # Before the model loads, so a held-out prompt in the training rows fails in seconds, not after training.
    splits = guard_splits("sft", train=config.data.train_path, test=config.data.test_path)

    # Model and tokenizer.
    tokenizer = load_tokenizer(config.model)
    model = build_model(config, device)
    packed = enable_packed_sequences(model) if config.train.packing else None
    packed_path = f"packed ({packed})" if packed else "padded batches"
    log.info("device %s; batches: %s", device, packed_path)
    if config.train.activation_checkpointing:
        enable_activation_checkpointing(model)

    # Data: rows -> (truncated-thinking rows) -> tokens + loss mask.
    rows, report = read_rows(config.data.train_path, "train", config.data.max_bad_fraction)
    rows, truncation_stats = truncate_rows(rows, config.data.truncation, tokenizer)
    if truncation_stats["budget_stated"]:  # the model's evaluations and rollouts state their budgets too (auto)
        mark_stated_budget(tokenizer)
    samples = [encode_for_training(tokenizer, row["messages"]) for row in rows]
    if not config.data.truncation.train_close:
        close_ids = tokenizer(THINK_CLOSE, add_special_tokens=False)["input_ids"]
        for i, row in enumerate(rows):
            if "truncated_at" in row.get("metadata", {}):
                samples[i], found = mask_forced_close(samples[i], close_ids)
                truncation_stats["close_masked"] = truncation_stats.get("close_masked", 0) + found
    unpacked_reports = []
    for path in config.data.unpacked_paths:
        unpacked_rows, unpacked_report = read_rows(path, "train", config.data.max_bad_fraction)
        unpacked_reports.append(unpacked_report.summary())
        samples += [dict(sample, pack=False) for row in unpacked_rows
                    for sample in encode_row_for_training(tokenizer, row)]
    if unpacked_reports:
        log.info("unpacked sources: %s", ", ".join(f"{r['path']} ({r['rows']} rows)" for r in unpacked_reports))
    too_long = sum(len(s["input_ids"]) > config.data.max_seq_len for s in samples)
    samples = [s for s in samples if len(s["input_ids"]) <= config.data.max_seq_len]
    log.info("%d training samples (%d too long dropped, %d bad rows, %d truncated-thinking)",
             len(samples), too_long, len(report.bad), truncation_stats["truncated"])
    collator = SampleCollator(
        mode="packed" if config.train.packing else "padded",
        pad_token_id=tokenizer.pad_token_id,
        max_tokens_per_row=config.train.max_tokens_per_row if config.train.packing else config.data.max_seq_len,
    )

    # Train (data parallel when launched by Ray Train: same code for 1 and N workers; sharded with DeepSpeed).
    trained, zero = model, None  # DeepSpeed wraps the model below, together with its optimizer
    if world > 1 and not config.train.deepspeed:
        trained = torch.nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    trainable = [p for p in model.parameters() if p.requires_grad]
    use_graphs = config.train.cuda_graphs
    if use_graphs and (why_not := cuda_graphs_unusable(config.train, device, packed, world)):
        log.warning("cuda_graphs: off, %s", why_not)
        use_graphs = False
    if use_graphs:
        optimizer = capturable_adamw(trainable, config.train.lr, device, weight_decay=config.train.weight_decay,
                                     betas=(0.9, 0.95))
        graphed_step = graphed_sft_step(model, optimizer, samples, config.train)
        log.info("training step: CUDA graph (%d rows x %d tokens)", *graphed_step.shape[:2])
    else:
        optimizer = torch.optim.AdamW(trainable, lr=config.train.lr, weight_decay=config.train.weight_decay,
                                      betas=(0.9, 0.95))
        graphed_step = None
    loss_chunk_tokens = config.train.loss_chunk_tokens
    if loss_chunk_tokens and (why_not := chunked_loss_unusable(zero_settings)):
        log.warning("loss_chunk_tokens: off, %s", why_not)
        loss_chunk_tokens = 0
    # The captured step keeps the full-logits loss (token_loss_sum's default): chunks are not checked under capture.
    loss_path = describe_loss_path(loss_chunk_tokens) if graphed_step is None else "full logits in the CUDA-graph step"
    log.info("loss: %s; activation checkpointing: %s", loss_path, activation_checkpointing_status(model))
    if zero_settings is not None:
        from alignment.zero import ZeroEngine

        zero = ZeroEngine(model, optimizer, zero_settings, device)
        trained, optimizer = zero, zero.optimizer
    state = TrainState(rng=random.Random(config.train.seed))
    if zero is not None:  # a sharded state only loads on the same number of workers with the same DeepSpeed file
        fingerprint = run_fingerprint(config, config.data.train_path, *config.data.unpacked_paths, config.train.deepspeed,
                                      salt=f"world={world}")
        resumed = resume_sharded_training(out / "last", fingerprint, zero, state)
    else:
        fingerprint = run_fingerprint(config, config.data.train_path, *config.data.unpacked_paths)
        resumed = resume_training(out / "last", fingerprint, model, optimizer, state)
    if resumed:
        log.info("resumed from step %d (%s)", state.step, out / "last")
    metrics = MetricsLogger(out, "sft", resume_step=state.step if resumed else None, tracking=config.tracking,
                            run_config=to_dict(config)) if rank == 0 else None
    model.train()
    started = time.time() - state.seconds
    progress = tqdm(range(state.step, config.train.max_steps), desc="sft", unit="step", dynamic_ncols=True,
                    initial=state.step, total=config.train.max_steps, disable=rank != 0)
    bar_loss = LossOnTheBar(progress) if device.type == "cuda" else None
    for step in progress:
        lr = learning_rate(step, config.train)
        set_learning_rate(optimizer, lr)
        # All micro-batches of this step, over all workers, are collated first: the loss is normalised by their
        # total target count, so 1 worker x 2 micro-batches and 2 workers x 1 compute the same update.
        step_batches = []
        for _ in range(config.train.grad_accum * world):
            if not state.queue:
                state.queue = micro_batches(samples, config.train, state.rng, state.epoch)
                state.epoch += 1
            step_batches.append(collator([samples[i] for i in state.queue.pop()]))
        n_targets = sum(int((b["labels"][:, 1:] != IGNORE_INDEX).sum()) for b in step_batches)
        if graphed_step is not None:  # forward, backward, clipping and update in one replay
            loss_sum, _, grad_norm = graphed_step(step_batches[0])
            total = loss_sum.clone()
            state.tokens_seen += int(step_batches[0]["input_ids"].numel())
        elif zero is not None:
            total, grad_norm = zero_step(zero, step_batches[rank::world], n_targets, world, device, state,
                                         loss_chunk_tokens)
        else:
            total, grad_norm = eager_step(trained, model, optimizer, step_batches[rank::world], n_targets, world,
                                          device, config.train.max_grad_norm, state, loss_chunk_tokens)
        state.step = step + 1
        logged = step % config.train.log_every == 0 or step == config.train.max_steps - 1
        if logged or device.type != "cuda":  # reading the loss back syncs with a GPU: there only when logging
            loss = float(total) / n_targets
            progress.set_postfix(loss=f"{loss:.3f}", lr=f"{lr:.1e}")
        else:
            bar_loss.show_when_ready(total, n_targets, lr)
        if metrics and logged:
            memory = {"peak_memory_gb": torch.cuda.max_memory_allocated(device) / 2**30} if device.type == "cuda" else {}
            elapsed = time.time() - started
            metrics.log(step, loss=loss, lr=lr, grad_norm=float(grad_norm), epoch=state.epoch,
                        tokens_per_s=state.tokens_seen / elapsed, elapsed_s=round(elapsed, 3), **memory)
        if config.train.save_every and state.step % config.train.save_every == 0:
            state.seconds = time.time() - started
            if zero is not None:  # every worker writes its shard
                save_sharded_training_state(out / "last", fingerprint, zero, state, rank)
            elif rank == 0:
                save_training_state(out / "last", fingerprint, model, optimizer, state)
    train_seconds = time.time() - started
    if zero is not None:  # gather the shards into a plain model on rank 0 for evaluation and the checkpoint
        weights = zero.full_state_dict(rank)
        zero.close()
        trained = optimizer = zero = model = None
        gc.collect()  # the sharded parameters and the optimizer hold each other: free their memory before rebuilding
        if device.type == "cuda":
            torch.cuda.empty_cache()
        if rank == 0:
            model = build_model(config, device)
            model.load_state_dict(weights)
    if rank != 0:
        return {}

    # Evaluate on the held-out split.
    test_rows, _ = read_rows(config.data.test_path, "prompt", config.data.max_bad_fraction)
    results = evaluate_model(model, tokenizer, test_rows, config.eval)
    (out / "eval.json").write_text(json.dumps(results, indent=2))
    metrics.log(config.train.max_steps, **{k: v for k, v in results.items() if isinstance(v, float)})
    metrics.log_file(out / "eval.json")
    metrics.close()

    # Checkpoint (atomic) with its manifest.
    summary = {k: v for k, v in results.items() if k != "examples"}
    manifest = {
        "stage": "sft",
        "config": to_dict(config),
        "data_fingerprint": fingerprint_files(config.data.train_path, *config.data.unpacked_paths),
        "data": {"train": report.summary(), "unpacked": unpacked_reports, "dropped_too_long": too_long,
                 "truncation": truncation_stats,
                 "splits": splits},
        "packing": packed_path,
        "train_seconds": round(train_seconds, 1),
        "metrics": summary,
    }
    checkpoint = save_model_checkpoint(out / "checkpoint", model, tokenizer, manifest)
    shutil.rmtree(out / "last", ignore_errors=True)  # the finished checkpoint supersedes the resumable state
    print(f"checkpoint: {checkpoint}\nmetrics:    {out / 'metrics.jsonl'}\neval:       {out / 'eval.json'}")
    print(f"accuracy think {summary['accuracy_think']:.3f} | no-think {summary['accuracy_no_think']:.3f} | "
          f"toggle compliance {summary['toggle_compliance']:.3f} | train {train_seconds:.0f}s")
    return summary
