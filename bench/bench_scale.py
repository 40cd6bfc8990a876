"""Real-scale throughput on one H200: LoRA SFT, DPO and GRPO learner steps and rollouts of Nemotron-Nano-9B-v2 and
Nemotron-H-8B-Base (exact architectures, random init), through the stages' own code, with TRL's SFTTrainer side
by side in the same run.

On the lent GPU machine, carrying `.gpu` (the Mamba-2 kernels and the TRL / datasets wheels, listed below):

    . bench/gpu_env.sh && python3 bench/bench_scale.py --model nano9b --parts sft,dpo,grpo,trl
    . bench/gpu_env.sh && python3 bench/bench_scale.py --model nano9b --parts rollout
    . bench/gpu_env.sh && python3 bench/bench_scale.py --model nemotron_h_8b --parts sft,dpo,grpo,rollout
    python bench/bench_scale.py --small                                   # CPU check: tiny config, every part

`.gpu/` must hold kernels-mamba2.tar.xz (from shared/gpu/) and the wheels trl 1.16.0, datasets 5.2.0, dill 0.4.1,
multiprocess 0.70.19, xxhash 4.1.0 (cp312) and fsspec 2026.9.0, fetched here with
`python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp
--platform manylinux2014_x86_64 -d .gpu NAME==VERSION` (see shared/gpu/README.md). One device command may run
10 minutes: split the parts over commands as above (`--model both` with every part needs a longer allowance).
Results go to `<out>/bench_scale.json` (`--out`, default $OUT when set, else runs/bench_scale), rewritten after
every part, so a run cut short keeps what it measured; a part that fails is recorded with its traceback and the
next one runs.

The model. Each part builds its model afresh with `alignment.modeling.load_model` from
configs/nano9b/model_nano9b_v2.json or model_nemotron_h_8b.json: random init built on the GPU in bf16 (seconds,
not the minutes of a CPU init), parameter count checked against the published one (8.89B / 8.10B).

The data. Sample lengths log-uniform in [--min-len, --max-len] (1k..16k tokens: as many samples of 1-2k as of
8-16k, the long tail of reasoning traces), random token ids, fixed seed. Packed rows hold --max-len tokens.

The parts (each: --warmup untimed steps, then --steps timed ones; torch.cuda.synchronize around every step; Triton
autotunes the Mamba kernels on first use of a shape, which the warm-up absorbs):
  sft      LoRA SFT (configs/nano9b/sft_lora.yaml: targets, rank, lr) on packed rows: `SampleCollator(packed)`
           after `enable_packed_sequences`, the stage's `alignment.sft.eager_step` (`token_loss_sum`, clipping,
           AdamW). Batches are collated before timing: the stage collates while the GPU runs the previous step.
  dpo      The DPO step of `alignment.dpo.train_round` (configs/nano9b/dpo.yaml): reference log-probs with the
           adapters disabled (`dpo.reference` + `all_pair_logps`), then `pair_logps` of the policy,
           `preference_loss` plus the SFT term, backward, clipping, AdamW; --dpo-pairs pairs per step.
  grpo     The GRPO learner step `alignment.grpo.policy_update` (configs/nano9b/grpo.yaml, one minibatch): one
           rollout batch of --grpo-samples completions with random advantages, packed micro-batches of one row.
  rollout  `alignment.rollout.generation.generate` on the model as the GRPO stage holds it (LoRA, packed hooks), decode
           path --decode (auto: the static step as a CUDA graph), at each of --rollout-batches rows, prompts of
           --prompt-len tokens, every row decoding to the end (no end-of-turn token). Two lengths of decoding are
           timed; their difference is the decode step without the prefill.
  sft_as_transformers
           The sft part with NemotronH's kernel calls as transformers makes them
           (`alignment.mamba_kernels.transformers_kernel_calls`): out_proj inside the fused Mamba kernel, which then
           computes the frozen weight's gradient, and the PyTorch RMSNorm. The side-by-side reference for
           `frozen_outproj_outside` and `rms_norm_kernel_on_cuda`, which every other part of ours runs.
  trl      TRL's SFTTrainer on the same model, samples and LoRA settings (peft_config), padded batches of
           --trl-batch-size (1: no padding), gradient checkpointing as for ours, sequential order; NemotronH's
           kernel calls as transformers makes them (`transformers_kernel_calls`), as TRL runs without this project.

The learner parts (and TRL) run with activation checkpointing, and ours with the stages' chunked loss (the LM head
and log-softmax a chunk of tokens at a time), switched on through the stage config fields the stages read:
`train.activation_checkpointing` (--no-activation-checkpointing turns it off) and `train.loss_chunk_tokens` (the
stage config's value; --loss-chunk-tokens N sets it, --no-loss-chunk gives the full-logits loss).

Measured per part: real (non-pad) tokens/s, the median over timed steps of each step's rate and the total over
all timed steps; MFU the same two ways; peak GPU memory (`torch.cuda.max_memory_allocated`, reset before the
part builds its model).

MFU = FLOPs the step must do / step time / 989 TFLOP/s (H200 dense bf16 peak). Per real token of a sample of L
tokens, with N the non-embedding parameters that take part in matmuls (every Linear, the lm_head included; the
input embedding is a lookup and left out) and A the LoRA adapter parameters:

    LoRA training step      4 N + 6 A + 3 (n_attn * 2 d_attn L + n_mamba * s)
    forward only            2 N + 2 A + n_attn * 2 d_attn L + n_mamba * s     (DPO reference: A = 0)

  4 N: 2 N forward + 2 N backward; the base weights are frozen, so the backward computes activation gradients
       only (no weight gradients). 6 A: the adapters, forward 2 A, backward 2 A activation + 2 A weight gradients.
  attention: per layer and token, Q K^T and P V cost 2 * 2 * L * d_attn (d_attn = query heads x head dim),
       halved for causality = 2 d_attn L; x3 with the backward (dQ, dK, dV: twice the forward).
  s:   the Mamba-2 chunked (SSD) scan per token and layer, forward, with H heads of head dim P, state size N_s,
       G groups, chunk Q: H Q P (intra-chunk (L o C B^T) X, causal half of 2 H Q P) + G Q N_s (C B^T per group,
       causal half) + 2 H N_s P (chunk states B^T X) + 2 H N_s P (outputs C h from the carried states)
       + 2 H N_s P / Q (the state recurrence across chunks); x3 with the backward. Conv1d, gating, norms and
       other elementwise work are left out.
  Activation checkpointing recomputes each block's forward in the backward, the chunked loss each chunk's LM head:
  those recomputes are NOT counted. Pad tokens of row tails are processed but not counted. The formulas are printed
  with their numbers for each model.

Rollout bound: one decode step must at least read every weight once (the input embedding only for the B rows fed),
read and write every row's Mamba conv and SSM states (dtypes and shapes taken from a prefill's cache) and read its
attention KV cache over the valid context (mean over the timed steps), and write the new K and V. Those bytes over
the HBM bandwidth (H200: 4.8 TB/s) give the fastest possible step; the measured decode rate is printed as a share of
that bound. (The static path attends over its whole preallocated KV buffer, masked; the bound counts the valid part.)

Expected GPU time (estimates, not yet measured; the 9B on an H200 with the defaults): environment set-up ~30 s;
model build a few seconds per part; the first learner part of a process also autotunes the Mamba Triton kernels
(about two minutes on a fresh machine, less once its cache is warm); then sft ~1 min, dpo ~1 min, grpo ~1 min,
trl ~1 min, rollout ~2 min (batch 256 moves ~94 GB per decode step).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import random
import statistics
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, NamedTuple

import torch
import transformers
from torch import nn
from transformers.models.nemotron_h import modeling_nemotron_h

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from alignment import dpo, grpo, sft  # noqa: E402
from alignment.activation_checkpointing import (activation_checkpointing_status,  # noqa: E402
                                                enable_activation_checkpointing)
from alignment.config import load_config  # noqa: E402
from alignment.rollout.generation import GenerationSettings, generate  # noqa: E402
from alignment.lora import apply_lora  # noqa: E402
from alignment.mamba_kernels import transformers_kernel_calls  # noqa: E402
from alignment.modeling import (ModelConfig, count_parameters, layer_types, load_model, mamba_kernel_path,  # noqa: E402
                                 mamba_kernels_available)
from alignment.packed_model import enable_packed_sequences  # noqa: E402
from alignment.packing import IGNORE_INDEX, SampleCollator, plan_packed_batches  # noqa: E402
from alignment.resume import TrainState  # noqa: E402
from alignment.rollout.static_decode import ATTENTION_BLOCKS, MAMBA_BLOCKS, _blocks, _cache_states  # noqa: E402
from alignment.token_logprobs import describe_loss_path  # noqa: E402
from measure import PEAK_BF16_TFLOPS, matmul_tflops, peak_memory_gib, reset_memory, sync  # noqa: E402

HBM_TBPS = 4.8  # H200 HBM3e bandwidth (datasheet); an H100 SXM has 3.35
TOKENIZER = REPO / "configs" / "tiny" / "tokenizer"  # TRL's pad token only: the samples are token ids already
STAGE_CONFIGS = {part: REPO / "configs" / "nano9b" / name
                 for part, name in [("sft", "sft_lora.yaml"), ("dpo", "dpo.yaml"), ("grpo", "grpo.yaml")]}
PARTS = ("sft", "sft_as_transformers", "dpo", "grpo", "rollout", "trl")


@dataclass(frozen=True)
class ModelSpec:
    name: str
    config_file: Path
    published_params_b: float | None  # billions, as the model card rounds them


MODELS = {
    "nano9b": ModelSpec("NVIDIA-Nemotron-Nano-9B-v2", REPO / "configs" / "nano9b" / "model_nano9b_v2.json", 8.89),
    "nemotron_h_8b": ModelSpec("Nemotron-H-8B-Base", REPO / "configs" / "nano9b" / "model_nemotron_h_8b.json", 8.10),
}
SMALL_MODEL = ModelSpec("tiny hybrid (configs/tiny/model.json)", REPO / "configs" / "tiny" / "model.json", None)

GPU_DEFAULTS = dict(min_len=1024, max_len=16384, steps=5, warmup=2, dpo_pairs=1, grpo_samples=8,
                    rollout_batches="64,256", prompt_len=512, decode_short=64, decode_long=448, rollout_repeats=2)
SMALL_DEFAULTS = dict(min_len=16, max_len=256, steps=3, warmup=1, dpo_pairs=2, grpo_samples=4,
                      rollout_batches="4,8", prompt_len=16, decode_short=4, decode_long=12, rollout_repeats=1)


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", choices=[*MODELS, "both"], default="nano9b", help="architecture(s) to measure")
    parser.add_argument("--parts", type=lambda s: s.split(","), default=list(PARTS),
                        help=f"comma-separated subset of {','.join(PARTS)}")
    parser.add_argument("--small", action="store_true", help="tiny config on the CPU in float32, short samples")
    parser.add_argument("--out", default=os.environ.get("OUT") or "runs/bench_scale", help="output directory")
    parser.add_argument("--device", default="auto", help="cuda, cpu or auto")
    parser.add_argument("--steps", type=int, help="timed steps per part (after the warm-up)")
    parser.add_argument("--warmup", type=int, help="untimed steps per part first")
    parser.add_argument("--min-len", type=int, help="shortest sample (tokens)")
    parser.add_argument("--max-len", type=int, help="longest sample; also the packed row budget")
    parser.add_argument("--dpo-pairs", type=int, help="pairs per DPO step (both sides go through the model together)")
    parser.add_argument("--grpo-samples", type=int, help="completions per GRPO learner step (one rollout batch)")
    parser.add_argument("--rollout-batches", help="comma-separated generation batch sizes")
    parser.add_argument("--prompt-len", type=int, help="rollout prompt tokens")
    parser.add_argument("--decode-short", type=int, help="new tokens of the shorter timed generation")
    parser.add_argument("--decode-long", type=int, help="new tokens of the longer timed generation")
    parser.add_argument("--rollout-repeats", type=int, help="timed generations of each length (median)")
    parser.add_argument("--decode", default="auto", help="generation decode path (see alignment.rollout.generation)")
    parser.add_argument("--trl-batch-size", type=int, default=1, help="TRL samples per padded step")
    parser.add_argument("--no-activation-checkpointing", dest="activation_checkpointing", action="store_false",
                        help="learner parts and TRL without activation checkpointing (train.activation_checkpointing)")
    parser.add_argument("--no-loss-chunk", dest="loss_chunk", action="store_false",
                        help="learner parts with the full-logits loss (train.loss_chunk_tokens=0)")
    parser.add_argument("--loss-chunk-tokens", type=int, default=0,
                        help="tokens per chunk of the chunked loss; 0 keeps the stage config's value")
    parser.add_argument("--peak-tflops", type=float, default=PEAK_BF16_TFLOPS, help="peak for MFU (dense bf16)")
    parser.add_argument("--hbm-tbps", type=float, default=HBM_TBPS, help="memory bandwidth for the decode bound")
    parser.add_argument("--seed", type=int, default=0, help="seed of the lengths, tokens and init")
    parser.add_argument("--profile", action="store_true",
                        help="after the timed steps, profile one more step and write the top kernels (profile_N.txt)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a field of the stage configs the learner parts read (e.g. lora.dropout=0)")
    args = parser.parse_args()
    unknown = set(args.parts) - set(PARTS)
    if unknown:
        parser.error(f"unknown parts {sorted(unknown)}; choose from {','.join(PARTS)}")
    for name, value in (SMALL_DEFAULTS if args.small else GPU_DEFAULTS).items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    args.rollout_batches = [int(b) for b in str(args.rollout_batches).split(",")]
    if args.device == "auto":
        args.device = "cpu" if args.small or not torch.cuda.is_available() else "cuda"
    args.dtype = "float32" if args.small else "bfloat16"
    if args.decode == "auto" and args.device == "cpu":
        args.decode = "static"  # the GPU's path without the graph, rather than transformers' dynamic cache
    return args


# ---------------------------------------------------------------------------------------------------------------
# Model and FLOPs
# ---------------------------------------------------------------------------------------------------------------


def build_model(args: argparse.Namespace, spec: ModelSpec) -> nn.Module:
    """A fresh random init of `spec` on the device, the stages' way (same seed, same weights, every part)."""
    config = ModelConfig(name_or_path=str(spec.config_file), dtype=args.dtype, init_seed=args.seed,
                         attn_implementation="sdpa")
    return load_model(config, args.device)


@dataclass(frozen=True)
class FlopModel:
    """FLOPs of the work a step must do (the formulas of the module docstring)."""

    matmul_params: int  # N: every Linear weight, lm_head included, input embedding excluded
    attention_layers: int
    attention_width: int  # d_attn: query heads x head dim
    mamba_layers: int
    scan_per_token: float  # s: forward FLOPs of one Mamba layer's chunked scan per token

    @classmethod
    def of(cls, model: nn.Module) -> "FlopModel":
        """Read from a model before LoRA is applied (the adapters are counted separately)."""
        cfg = model.config
        types = layer_types(model)
        H, P, N, G, Q = cfg.mamba_num_heads, cfg.mamba_head_dim, cfg.ssm_state_size, cfg.n_groups, cfg.chunk_size
        scan = H * Q * P + G * Q * N + 4 * H * N * P + 2 * H * N * P / Q
        return cls(
            matmul_params=sum(m.weight.numel() for m in model.modules() if isinstance(m, nn.Linear)),
            attention_layers=sum(t in ATTENTION_BLOCKS for t in types),
            attention_width=cfg.num_attention_heads * cfg.head_dim,
            mamba_layers=sum(t in MAMBA_BLOCKS for t in types),
            scan_per_token=scan,
        )

    def _sequence_terms(self, lengths: list[int]) -> float:
        """Forward FLOPs of attention and the scans over samples of these lengths."""
        attention, scan = self.attention_layers * 2 * self.attention_width, self.mamba_layers * self.scan_per_token
        return sum(attention * n * n + scan * n for n in lengths)

    def lora_step(self, lengths: list[int], adapters: int) -> float:
        return sum(lengths) * (4 * self.matmul_params + 6 * adapters) + 3 * self._sequence_terms(lengths)

    def forward(self, lengths: list[int], adapters: int = 0) -> float:
        return sum(lengths) * (2 * self.matmul_params + 2 * adapters) + self._sequence_terms(lengths)

    def describe(self, adapters: int, mean_len: float) -> str:
        per_token = 4 * self.matmul_params + 6 * adapters + 3 * (
            self.attention_layers * 2 * self.attention_width * mean_len + self.mamba_layers * self.scan_per_token)
        return (f"FLOPs per real token of an L-token sample, LoRA step: 4N + 6A + 3(n_attn*2*d_attn*L + n_mamba*s), "
                f"N={self.matmul_params / 1e9:.3f}B, A={adapters / 1e6:.1f}M, n_attn={self.attention_layers}, "
                f"d_attn={self.attention_width}, n_mamba={self.mamba_layers}, s={self.scan_per_token / 1e6:.2f}M "
                f"(H Q P + G Q N_s + 4 H N_s P + 2 H N_s P/Q); at L={mean_len:.0f}: {per_token / 1e9:.1f} GFLOP; "
                "reference forward: 2N + n_attn*2*d_attn*L + n_mamba*s; recomputes (activation checkpointing, "
                "chunked loss) not counted")


def check_parameters(model: nn.Module, spec: ModelSpec) -> dict:
    n = sum(p.numel() for p in model.parameters())
    embedding = model.get_input_embeddings().weight.numel()
    ok = spec.published_params_b is None or round(n / 1e9, 2) == spec.published_params_b
    return {"params": n, "params_without_input_embedding": n - embedding,
            "published_params_b": spec.published_params_b, "matches_published": ok}


def memory_overrides(args: argparse.Namespace) -> list[str]:
    """The stage config fields for activation checkpointing and the chunked loss, as --flags set them."""
    overrides = [f"train.activation_checkpointing={str(args.activation_checkpointing).lower()}"]
    if not args.loss_chunk:
        overrides.append("train.loss_chunk_tokens=0")
    elif args.loss_chunk_tokens:
        overrides.append(f"train.loss_chunk_tokens={args.loss_chunk_tokens}")
    return overrides + args.overrides


def memory_savers(model: nn.Module, train_config) -> dict[str, str]:
    """Activation checkpointing switched on from the stage config field, as the stages do; what the logs say."""
    if train_config.activation_checkpointing:
        enable_activation_checkpointing(model)
    return {"activation_checkpointing": activation_checkpointing_status(model),
            "loss": describe_loss_path(train_config.loss_chunk_tokens)}


# ---------------------------------------------------------------------------------------------------------------
# Data: long-tailed lengths, random token ids
# ---------------------------------------------------------------------------------------------------------------


class Data:
    """Samples drawn on demand from a stream seeded by --seed and the part's name: a part sees the same samples
    whichever other parts run, and every model the same ones."""

    def __init__(self, args: argparse.Namespace, vocab: int, stream: str):
        self.args, self.vocab = args, vocab
        self.rng = random.Random(f"{args.seed}/{stream}")
        self.generator = torch.Generator().manual_seed(self.rng.getrandbits(63))

    def length(self) -> int:
        lo, hi = math.log(self.args.min_len), math.log(self.args.max_len + 1)
        return min(self.args.max_len, int(math.exp(self.rng.uniform(lo, hi))))

    def ids(self, n: int) -> list[int]:
        return torch.randint(3, self.vocab, (n,), generator=self.generator).tolist()  # 0..2: pad, bos, eos

    def sft_samples(self, n: int) -> list[dict]:
        """Prompt (first quarter, no loss) + completion."""
        samples = []
        for _ in range(n):
            ids = self.ids(self.length())
            samples.append({"input_ids": ids, "labels": [IGNORE_INDEX] * (len(ids) // 4) + ids[len(ids) // 4:]})
        return samples

    def pairs(self, n: int) -> list[dict]:
        """Chosen and rejected share a prompt (a quarter of the shorter side); each side's length long-tailed."""
        pairs = []
        for _ in range(n):
            lengths = (self.length(), self.length())
            prompt = self.ids(max(1, min(lengths) // 4))
            sides = {}
            for side, total in zip(("chosen", "rejected"), lengths):
                completion = self.ids(max(1, total - len(prompt)))
                sides[side] = {"input_ids": prompt + completion,
                               "labels": [IGNORE_INDEX] * len(prompt) + completion}
            pairs.append({"encoded": sides})
        return pairs


def sft_rows(args: argparse.Namespace, shared: dict) -> tuple[list[dict], list[list[int]]]:
    """The SFT samples and their packed rows, one row per step (warm-up first); drawn once per model, so the TRL
    part trains on the same samples as the SFT part."""
    if "sft" not in shared:
        steps = args.warmup + args.steps
        mean_len = (args.max_len - args.min_len) / math.log(args.max_len / args.min_len)  # log-uniform
        count = math.ceil(1.5 * steps * args.max_len / mean_len) + 8  # rows come out fuller than they need
        samples = Data(args, shared["vocab"], "sft").sft_samples(count)
        plan = plan_packed_batches([len(s["input_ids"]) for s in samples], args.max_len, 1, seed=args.seed)
        if len(plan) < steps:
            raise ValueError(f"{len(samples)} samples make {len(plan)} packed rows, {steps} needed")
        shared["sft"] = samples, plan[:steps]
    return shared["sft"]


# ---------------------------------------------------------------------------------------------------------------
# Timing
# ---------------------------------------------------------------------------------------------------------------


def timed(step: Callable[[object], object], items: list, args: argparse.Namespace) -> tuple[list[float], list]:
    """Run `step` on every item; the first `args.warmup` are not timed. Returns (seconds, outputs) of the timed."""
    seconds, outputs = [], []
    for i, item in enumerate(items):
        sync(args.device)
        started = time.perf_counter()
        out = step(item)
        sync(args.device)
        if i >= args.warmup:
            seconds.append(time.perf_counter() - started)
            outputs.append(out)
    if args.profile and items:  # one more step of the last item under the profiler, after the timed ones
        from torch.profiler import ProfilerActivity, profile

        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if args.device == "cuda" else [])
        with profile(activities=activities) as prof:
            step(items[-1])
            sync(args.device)
        sort = "cuda_time_total" if args.device == "cuda" else "cpu_time_total"
        table = prof.key_averages().table(sort_by=sort, row_limit=30, max_name_column_width=70)
        (Path(args.out) / f"profile_{len(list(Path(args.out).glob('profile_*')))}.txt").write_text(table)
        print(table, flush=True)
    return seconds, outputs


def rates(seconds: list[float], tokens: list[int], flops: list[float], args: argparse.Namespace) -> dict:
    """Tokens/s and MFU of the timed steps: the median of per-step rates, and totals over all timed steps."""
    peak = args.peak_tflops * 1e12
    return {
        "steps_timed": len(seconds), "step_seconds": seconds, "step_tokens": tokens,
        "median_step_seconds": statistics.median(seconds),
        "tokens_per_s": statistics.median(t / s for t, s in zip(tokens, seconds)),
        "tokens_per_s_total": sum(tokens) / sum(seconds),
        "mfu": statistics.median(f / s / peak for f, s in zip(flops, seconds)),
        "mfu_total": sum(flops) / sum(seconds) / peak,
        "tflops_per_step": [f / 1e12 for f in flops],
    }


# ---------------------------------------------------------------------------------------------------------------
# The parts
# ---------------------------------------------------------------------------------------------------------------


class LoraLearner(NamedTuple):
    """A learner part's model as its stage holds it, and what the part reports about it."""

    model: nn.Module  # LoRA on, packed-sequence hooks on, activation checkpointing as the stage config says
    flops: FlopModel  # read before LoRA: the adapters are counted separately
    packed: object  # the packed path (its str names the Mamba and attention kernels)
    savers: dict[str, str]  # activation checkpointing and loss path, as the logs say
    adapters: int  # trainable adapter parameters
    optimizer: torch.optim.Optimizer


def lora_learner(args, spec: ModelSpec, config, betas: tuple[float, float]) -> LoraLearner:
    """Build `spec`, add LoRA and the stage's memory savers, and the AdamW the stage builds (its `betas`)."""
    model = build_model(args, spec)
    flops = FlopModel.of(model)
    model = apply_lora(model, config.lora)
    packed = enable_packed_sequences(model)
    savers = memory_savers(model, config.train)
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=config.train.lr, weight_decay=config.train.weight_decay, betas=betas)
    return LoraLearner(model, flops, packed, savers, count_parameters(model, trainable_only=True), optimizer)


def part_sft(args, spec: ModelSpec, shared: dict) -> dict:
    """LoRA SFT steps of the stage on packed rows of --max-len tokens, one row per step."""
    config = load_config(sft.SFTConfig, STAGE_CONFIGS["sft"], memory_overrides(args))
    model, flops, packed, savers, adapters, optimizer = lora_learner(args, spec, config, betas=(0.9, 0.95))  # run_sft's
    device = torch.device(args.device)
    collator = SampleCollator(mode="packed", pad_token_id=0, max_tokens_per_row=args.max_len)
    samples, plan = sft_rows(args, shared)
    batches = [collator([samples[i] for i in group]) for group in plan]  # collated before timing, see docstring
    state = TrainState(rng=random.Random(args.seed))
    model.train()

    def step(batch):
        n_targets = int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())
        total, _ = sft.eager_step(model, model, optimizer, [batch], n_targets, 1, device,
                                  config.train.max_grad_norm, state, config.train.loss_chunk_tokens)
        return total / n_targets

    seconds, losses = timed(step, batches, args)
    timed_plan = plan[args.warmup:]
    lengths = [[len(samples[i]["input_ids"]) for i in group] for group in timed_plan]
    result = rates(seconds, [sum(x) for x in lengths], [flops.lora_step(x, adapters) for x in lengths], args)
    result |= {"what": f"stage eager_step, LoRA r={config.lora.r}, packed rows of {args.max_len} ({packed})",
               "samples_per_step": [len(g) for g in timed_plan], "losses": [float(x) for x in losses],
               "adapter_params": adapters, "memory_savers": savers, "flops": flops.describe(
                   adapters, statistics.mean(x for step_lengths in lengths for x in step_lengths))}
    return result


def part_sft_as_transformers(args, spec: ModelSpec, shared: dict) -> dict:
    """The sft part with transformers' kernel calls (out_proj inside the fused kernel, the PyTorch RMSNorm)."""
    with transformers_kernel_calls(modeling_nemotron_h):
        result = part_sft(args, spec, shared)
    return result | {"what": result["what"] + ", transformers' kernel calls (out_proj in the fused kernel, PyTorch RMSNorm)"}


def part_dpo(args, spec: ModelSpec, shared: dict) -> dict:
    """The DPO step: reference log-probs with adapters disabled, then the policy's loss step."""
    config = load_config(dpo.DPOConfig, STAGE_CONFIGS["dpo"], [
        f"train.max_tokens_per_row={args.max_len}", f"pairs.max_seq_len={args.max_len}", *memory_overrides(args)])
    model, flops, packed, savers, adapters, optimizer = lora_learner(args, spec, config, betas=(0.9, 0.95))  # DPO's
    chunk = config.train.loss_chunk_tokens
    device = torch.device(args.device)
    collator = SampleCollator(mode="packed", pad_token_id=0, max_tokens_per_row=args.max_len)
    n_steps = args.warmup + args.steps
    pairs = Data(args, shared["vocab"], "dpo").pairs(n_steps * args.dpo_pairs)
    groups = [pairs[i:i + args.dpo_pairs] for i in range(0, len(pairs), args.dpo_pairs)]
    split: list[tuple[float, float]] = []
    model.train()

    def step(batch: list[dict]):
        started = time.perf_counter()
        with dpo.reference(model):  # the stage computes these once per round; one forward per pair either way
            ref, _ = dpo.all_pair_logps(model, batch, collator, device, len(batch), chunk)  # [B, 2], on the host
        reference_s = time.perf_counter() - started
        logps, counts = dpo.pair_logps(model, batch, collator, device, chunk)  # [B, 2]
        ref = ref.to(device)
        losses, _, _ = dpo.preference_loss(logps[:, 0], logps[:, 1], ref[:, 0], ref[:, 1], counts[:, 0],
                                           counts[:, 1], config.loss.loss_type, config.loss.beta)
        sft_loss = -logps[:, 0].sum() / counts[:, 0].sum().clamp(min=1)
        loss = losses.mean() + config.loss.sft_weight * sft_loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), config.train.max_grad_norm)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        sync(args.device)
        split.append((reference_s, time.perf_counter() - started - reference_s))
        return loss.detach()

    seconds, losses = timed(step, groups, args)
    timed_groups = groups[args.warmup:]
    lengths = [[len(p["encoded"][side]["input_ids"]) for p in g for side in ("chosen", "rejected")]
               for g in timed_groups]
    step_flops = [flops.lora_step(x, adapters) + flops.forward(x) for x in lengths]
    result = rates(seconds, [sum(x) for x in lengths], step_flops, args)
    timed_split = split[args.warmup:]
    result |= {"what": f"reference forward (adapters off) + policy step, {args.dpo_pairs} pair(s)/step, "
                       f"{config.loss.loss_type} beta {config.loss.beta} + SFT {config.loss.sft_weight} ({packed})",
               "median_reference_seconds": statistics.median(r for r, _ in timed_split),
               "median_policy_seconds": statistics.median(p for _, p in timed_split),
               "losses": [float(x) for x in losses], "adapter_params": adapters, "memory_savers": savers,
               "flops": flops.describe(adapters, statistics.mean(x for g in lengths for x in g))
               + " (DPO: LoRA step + reference forward)"}
    return result


def part_grpo(args, spec: ModelSpec, shared: dict) -> dict:
    """`grpo.policy_update` on rollout batches of --grpo-samples completions (one optimizer step each)."""
    config = load_config(grpo.GRPOConfig, STAGE_CONFIGS["grpo"], [
        f"train.max_tokens_per_row={args.max_len}", f"rollout.max_new_tokens={min(4096, args.max_len - 1)}",
        "loss.minibatches=1", "loss.epochs=1", "loss.kl_coef=0.0", "train.rows_per_micro_batch=1",
        *memory_overrides(args),
    ])
    model, flops, packed, savers, adapters, optimizer = lora_learner(args, spec, config, betas=(0.9, 0.99))  # GRPO's
    collator = SampleCollator(mode="packed", pad_token_id=0, max_tokens_per_row=args.max_len)
    rng, data = random.Random(args.seed), Data(args, shared["vocab"], "grpo")
    batches = []
    for _ in range(args.warmup + args.steps):
        samples = []
        for s in data.sft_samples(args.grpo_samples):  # prompt: a quarter, at most 1024 tokens; the rest sampled
            prompt = min(1024, len(s["input_ids"]) // 4)
            samples.append({"input_ids": s["input_ids"],
                            "labels": [IGNORE_INDEX] * prompt + s["input_ids"][prompt:]})
        advantages = torch.randn(len(samples), generator=data.generator)
        batches.append((samples, advantages))
    model.train()

    def step(batch):
        samples, advantages = batch
        return grpo.policy_update(model, samples, advantages, config, collator, optimizer, None, rng)

    seconds, stats = timed(step, batches, args)
    lengths = [[len(s["input_ids"]) for s in samples] for samples, _ in batches[args.warmup:]]
    result = rates(seconds, [sum(x) for x in lengths], [flops.lora_step(x, adapters) for x in lengths], args)
    result |= {"what": f"policy_update, {args.grpo_samples} completions/step, micro-batches of 1 row x "
                       f"{args.max_len} ({packed})",
               "tokens_trained_reported": [s["tokens_trained"] for s in stats],
               "losses": [s["loss"] for s in stats], "adapter_params": adapters, "memory_savers": savers,
               "flops": flops.describe(adapters, statistics.mean(x for g in lengths for x in g))}
    return result


def decode_state_bytes(model: nn.Module, device: str, ssm_dtype: torch.dtype = torch.float32) -> dict:
    """Per-row bytes of each Mamba layer's conv + SSM state and of one position of KV, from a prefill's cache, the
    SSM state counted in `ssm_dtype` (the decoder's rollout.ssm_state_dtype: float32, or the model's dtype)."""
    with torch.inference_mode():
        ids = torch.full((1, 8), 3, device=device)
        cache = model(input_ids=ids, use_cache=True, logits_to_keep=1).past_key_values
    mamba, kv_per_position = 0, 0
    for block in _blocks(model):
        if block.block_type in MAMBA_BLOCKS:
            conv, ssm = _cache_states(cache, block.layer_idx, block.block_type)
            mamba += conv[0].numel() * conv.element_size() + ssm[0].numel() * ssm_dtype.itemsize
        elif block.block_type in ATTENTION_BLOCKS:
            keys, values = _cache_states(cache, block.layer_idx, block.block_type)  # [1, H_kv, 8, head_dim]
            kv_per_position += (keys[0, :, 0].numel() * keys.element_size()
                                + values[0, :, 0].numel() * values.element_size())
    return {"mamba_state_bytes_per_row": mamba, "kv_bytes_per_row_position": kv_per_position}


def decode_bound(model: nn.Module, states: dict, batch: int, context: float, hbm_tbps: float) -> dict:
    """Fastest possible decode step: the bytes it must move over the memory bandwidth."""
    embedding = model.get_input_embeddings().weight
    weights = sum(p.numel() * p.element_size() for p in model.parameters() if p is not embedding)
    weights += batch * embedding.shape[1] * embedding.element_size()  # only the rows fed this step
    mamba = batch * 2 * states["mamba_state_bytes_per_row"]  # read and written
    kv = batch * states["kv_bytes_per_row_position"] * (context + 1)  # read over the context, the new K, V written
    total = weights + mamba + kv
    seconds = total / (hbm_tbps * 1e12)
    return {"bytes_weights": weights, "bytes_mamba_states": mamba, "bytes_kv": kv, "bytes_per_step": total,
            "bound_step_seconds": seconds, "bound_tokens_per_s": batch / seconds}


def part_rollout(args, spec: ModelSpec, shared: dict) -> dict:
    """Generation throughput at each batch size, against the memory bound of a decode step."""
    config = load_config(grpo.GRPOConfig, STAGE_CONFIGS["grpo"])
    model = build_model(args, spec)
    model = apply_lora(model, config.lora)  # as the GRPO stage holds it while it samples
    packed = enable_packed_sequences(model)
    model.eval()
    states = decode_state_bytes(model, args.device)
    data = Data(args, shared["vocab"], "rollout")
    short, long = args.decode_short, args.decode_long
    results = {"what": f"alignment.rollout.generation.generate, decode={args.decode}, prompts of {args.prompt_len} tokens, "
                       f"{short} and {long} new tokens, temperature 1, no end-of-turn token ({packed})",
               **states, "batches": {}}
    for batch in args.rollout_batches:
        reset_memory(args.device)  # peak memory per batch size
        prompts = [data.ids(args.prompt_len) for _ in range(batch)]

        def run(new_tokens: int) -> float:
            settings = GenerationSettings(max_new_tokens=new_tokens, temperature=1.0, top_p=1.0, eos_token_ids=[],
                                          pad_token_id=0, batch_size=batch, decode=args.decode)
            sync(args.device)
            started = time.perf_counter()
            out = generate(model, prompts, settings=settings, seed=args.seed)
            sync(args.device)
            seconds = time.perf_counter() - started
            if any(len(r.tokens) != new_tokens for r in out):
                raise RuntimeError(f"a row stopped before {new_tokens} new tokens: the work would not be the same")
            return seconds

        run(short)  # warm-up: Triton autotuning for these shapes, cuBLAS, the allocator
        times = {short: [], long: []}
        for _ in range(args.rollout_repeats):
            for n in (short, long):
                times[n].append(run(n))
        t_short, t_long = statistics.median(times[short]), statistics.median(times[long])
        step_seconds = (t_long - t_short) / (long - short)
        context = args.prompt_len + (short + long) / 2  # mean valid positions over the steps the difference times
        bound = decode_bound(model, states, batch, context, args.hbm_tbps)
        decode_tps = batch / step_seconds if step_seconds > 0 else float("nan")
        results["batches"][str(batch)] = {
            "seconds": {str(k): v for k, v in times.items()}, "decode_step_seconds": step_seconds,
            "decode_tokens_per_s": decode_tps, "end_to_end_tokens_per_s": batch * long / t_long,
            "prefill_and_setup_seconds": t_short - short * step_seconds, **bound,
            "share_of_bound": decode_tps / bound["bound_tokens_per_s"],
            "peak_memory_gib": peak_memory_gib(args.device),
        }
        print(f"  rollout batch {batch}: decode {decode_tps:,.0f} tok/s ({step_seconds * 1e3:.1f} ms/step), bound "
              f"{bound['bound_tokens_per_s']:,.0f} tok/s ({bound['bytes_per_step'] / 1e9:.1f} GB/step) -> "
              f"{decode_tps / bound['bound_tokens_per_s']:.0%}; end to end {batch * long / t_long:,.0f} tok/s",
              flush=True)
    return results


def part_trl(args, spec: ModelSpec, shared: dict) -> dict:
    """TRL's SFTTrainer, LoRA through its peft_config, on the samples of the SFT part's steps, in order."""
    from datasets import Dataset
    from peft import LoraConfig as PeftLoraConfig
    from transformers import AutoTokenizer, TrainerCallback
    from transformers.trainer_callback import PrinterCallback
    from trl import SFTConfig as TRLSFTConfig, SFTTrainer

    config = load_config(sft.SFTConfig, STAGE_CONFIGS["sft"])
    samples, plan = sft_rows(args, shared)
    ordered = [samples[i] for group in plan for i in group]  # the SFT part's samples, its warm-up rows first
    b = args.trl_batch_size
    groups = [ordered[i:i + b] for i in range(0, len(ordered), b)]
    if len(groups) <= args.warmup:
        raise ValueError(f"{len(ordered)} samples give {len(groups)} TRL steps, not more than --warmup")

    class StepTimer(TrainerCallback):
        def __init__(self):
            self.seconds: list[float] = []

        def on_step_begin(self, *_, **__):
            sync(args.device)
            self.started = time.perf_counter()

        def on_step_end(self, *_, **__):
            sync(args.device)
            self.seconds.append(time.perf_counter() - self.started)

    model = build_model(args, spec)
    flops = FlopModel.of(model)
    dataset = Dataset.from_dict({"input_ids": [s["input_ids"] for s in ordered],
                                 "labels": [s["labels"] for s in ordered]})
    lora = config.lora
    peft_config = PeftLoraConfig(r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout,
                                 target_modules=lora.target_modules, task_type="CAUSAL_LM")
    timer = StepTimer()
    with tempfile.TemporaryDirectory() as tmp:
        trl_config = TRLSFTConfig(
            output_dir=tmp, per_device_train_batch_size=b, max_steps=len(groups),
            max_length=args.max_len,  # TRL's default (1024) would cut the long tail: not the same data
            learning_rate=config.train.lr, lr_scheduler_type="constant", train_sampling_strategy="sequential",
            gradient_checkpointing=args.activation_checkpointing, bf16=args.dtype == "bfloat16",
            use_cpu=args.device == "cpu", logging_steps=10**9, save_strategy="no", report_to="none",
            disable_tqdm=True, seed=args.seed,
        )
        trainer = SFTTrainer(model=model, args=trl_config, train_dataset=dataset, callbacks=[timer],
                             processing_class=AutoTokenizer.from_pretrained(TOKENIZER), peft_config=peft_config)
        trainer.remove_callback(PrinterCallback)
        adapters = count_parameters(trainer.model, trainable_only=True)
        with transformers_kernel_calls(modeling_nemotron_h):  # TRL as it runs without this project
            trainer.train()
    del trainer
    seconds = timer.seconds[args.warmup:]
    lengths = [[len(s["input_ids"]) for s in g] for g in groups[args.warmup:]][:len(seconds)]
    result = rates(seconds, [sum(x) for x in lengths], [flops.lora_step(x, adapters) for x in lengths], args)
    padded = sum(len(g) * max(x) for g, x in zip(groups[args.warmup:], lengths))
    result |= {"what": f"TRL SFTTrainer, padded batches of {b}, peft LoRA r={lora.r}, gradient checkpointing "
                       f"{'on' if args.activation_checkpointing else 'off'}",
               "pad_share": 1 - sum(map(sum, lengths)) / padded, "adapter_params": adapters,
               "memory_savers": {"activation_checkpointing": f"TRL's gradient_checkpointing="
                                                             f"{args.activation_checkpointing}",
                                 "loss": "TRL's fused LM head (log-probs, entropy in chunks, no full logits)"},
               "flops": flops.describe(adapters, statistics.mean(x for g in lengths for x in g))}
    return result


PART_FUNCTIONS = {"sft": part_sft, "sft_as_transformers": part_sft_as_transformers, "dpo": part_dpo, "grpo": part_grpo,
                  "rollout": part_rollout, "trl": part_trl}


# ---------------------------------------------------------------------------------------------------------------
# Main
# ---------------------------------------------------------------------------------------------------------------


def trl_version() -> str | None:
    try:
        import trl

        return trl.__version__
    except ImportError:
        return None


def write(report: dict, path: Path) -> None:
    path.write_text(json.dumps(report, indent=2, default=str))


def main() -> None:
    args = parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / "bench_scale.json"
    if args.device == "cpu":
        torch.set_num_threads(max(1, min(4, os.cpu_count() or 1)))
    device_name = torch.cuda.get_device_name() if args.device == "cuda" else platform.processor() or "cpu"
    env = {"device": device_name, "torch": torch.__version__, "transformers": transformers.__version__,
           "trl": trl_version(), "python": platform.python_version(), "mamba_kernels_installed":
           mamba_kernels_available(), "peak_bf16_tflops": args.peak_tflops, "hbm_tbps": args.hbm_tbps,
           "measured_matmul_tflops": matmul_tflops(args.device)}
    print(f"device: {device_name} | torch {torch.__version__} | transformers {transformers.__version__} | "
          f"trl {env['trl']} | mamba-ssm + causal-conv1d installed: {env['mamba_kernels_installed']}"
          + (f" | bf16 matmul {env['measured_matmul_tflops']:.0f} TFLOP/s" if env["measured_matmul_tflops"] else ""))
    specs = {"small": SMALL_MODEL} if args.small else (
        dict(MODELS) if args.model == "both" else {args.model: MODELS[args.model]})
    report: dict = {"env": env, "args": vars(args), "models": {}}

    for key, spec in specs.items():
        entry = report["models"][key] = {"name": spec.name, "config": str(spec.config_file.relative_to(REPO)),
                                         "parts": {}, "errors": {}}
        reset_memory(args.device)
        build_started = time.perf_counter()
        probe = build_model(args, spec)  # parameter check and the kernel path the parts will run on
        entry["build_seconds"] = time.perf_counter() - build_started  # random init on the device (synchronized)
        entry |= check_parameters(probe, spec)
        entry["mamba_path"] = mamba_kernel_path(probe)
        vocab = probe.config.vocab_size
        del probe
        if spec.published_params_b is None:
            check = "no published count"
        else:
            check = f"published {spec.published_params_b:.2f}B: " + (
                "match" if entry["matches_published"] else "MISMATCH, the architecture is not the real one")
        print(f"\n== {spec.name}: {entry['params'] / 1e9:.3f}B parameters ({check}), "
              f"{args.dtype} on {args.device}, built in {entry['build_seconds']:.1f} s, mamba path: {entry['mamba_path']}")
        shared = {"vocab": vocab}  # what the parts of one model share: the vocabulary, the SFT samples
        for part in [p for p in PARTS if p in args.parts]:
            reset_memory(args.device)
            started = time.perf_counter()
            try:
                result = PART_FUNCTIONS[part](args, spec, shared)
                result["peak_memory_gib"] = peak_memory_gib(args.device)
                result["part_seconds"] = time.perf_counter() - started
                entry["parts"][part] = result
                print_part(part, result)
            except Exception as error:  # one part failing must not lose the others' numbers
                traceback.print_exc()
                entry["errors"][part] = {"error": f"{type(error).__name__}: {error}",
                                         "traceback": traceback.format_exc(),
                                         "seconds": time.perf_counter() - started}
                print(f"  {part} failed: {entry['errors'][part]['error'][:300]}", flush=True)
            reset_memory(args.device)
            write(report, path)
    write(report, path)
    print_table(report)
    print(f"\nwrote {path}")


def print_part(part: str, result: dict) -> None:
    if "tokens_per_s" not in result:  # the rollout prints a line per batch size as it goes
        return
    lines = [f"  {part}: {result['tokens_per_s']:,.0f} tok/s (median step; {result['tokens_per_s_total']:,.0f} over "
             f"all timed), MFU {result['mfu']:.1%}, peak {result['peak_memory_gib'] or 0:.1f} GiB, "
             f"{result['part_seconds']:.0f} s"]
    lines += [f"    {key.replace('_', ' ')}: {value}" for key, value in result.get("memory_savers", {}).items()]
    lines.append(f"    {result['flops']}")
    print("\n".join(lines), flush=True)


def print_table(report: dict) -> None:
    for entry in report["models"].values():
        print(f"\n{entry['name']} ({entry['params'] / 1e9:.2f}B), {report['env']['device']}; tokens/s: median of "
              f"per-step rates (all timed steps together); MFU against {report['env']['peak_bf16_tflops']:.0f} TFLOP/s")
        header = f"{'part':<19}{'steps':>6}{'tokens/s':>12}{'(all)':>11}{'MFU':>8}{'(all)':>8}{'peak mem':>11}  what"
        print(header)
        print("-" * len(header))
        for part in PARTS:
            r = entry["parts"].get(part)
            if part in entry["errors"]:
                print(f"{part:<19}  failed: {entry['errors'][part]['error'][:120]}")
            elif r and "tokens_per_s" in r:
                mem = f"{r['peak_memory_gib']:.1f} GiB" if r["peak_memory_gib"] is not None else "-"
                print(f"{part:<19}{r['steps_timed']:>6}{r['tokens_per_s']:>12,.0f}{r['tokens_per_s_total']:>11,.0f}"
                      f"{r['mfu']:>8.1%}{r['mfu_total']:>8.1%}{mem:>11}  {r['what']}")
        rollout = entry["parts"].get("rollout")
        if rollout:
            print(f"\nrollout: {rollout['what']}")
            head = f"{'batch':>6}{'decode tok/s':>14}{'ms/step':>9}{'bound tok/s':>13}{'share':>7}{'GB/step':>9}" \
                   f"{'end-to-end tok/s':>18}{'peak mem':>11}"
            print(head)
            print("-" * len(head))
            for batch, r in rollout["batches"].items():
                mem = f"{r['peak_memory_gib']:.1f} GiB" if r["peak_memory_gib"] is not None else "-"
                print(f"{batch:>6}{r['decode_tokens_per_s']:>14,.0f}{r['decode_step_seconds'] * 1e3:>9.1f}"
                      f"{r['bound_tokens_per_s']:>13,.0f}{r['share_of_bound']:>7.0%}{r['bytes_per_step'] / 1e9:>9.2f}"
                      f"{r['end_to_end_tokens_per_s']:>18,.0f}{mem:>11}")


if __name__ == "__main__":
    main()
