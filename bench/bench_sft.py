"""SFT training throughput: TRL's SFTTrainer (padded) vs our padded loop vs our packed loop, same model and data.

One run trains the same random-init hybrid on the same long-tailed samples along each path, for one warm-up pass
(Triton autotunes the Mamba kernels on first use of a shape) and then `--epochs` timed passes:

  (a)  TRL `SFTTrainer` with its default padded batches (`per_device_train_batch_size` samples per step, sequential
       order so that (a) and (b) see the same batches). Gradient checkpointing off, as in (b) and (c);
       (a0) repeats it with TRL's default gradient checkpointing on.
  (b)  `SampleCollator(mode="padded")` + our loop (`alignment.sft.token_loss_sum`, AdamW, clipping), same batches.
  (c)  `SampleCollator(mode="packed")` + the same loop after `enable_packed_sequences`; rows planned over the pass
       with `plan_packed_batches`, as many tokens per step as (b) on average. Once with varlen attention
       (`alignment.varlen_attention`, when this PyTorch has the kernel) and once with `segment_sdpa`; on the GPU
       also with twice the rows per step (twice the samples per optimizer step), and each of those with the whole
       step captured as a CUDA graph (`c_graph`, `c_2x_rows_graph`). Our step is the stage's: pinned non-blocking
       copies, labels not handed to the model, no host sync inside the step.

Printed per path: real (non-pad) tokens/s (median over timed passes), ratio to (a), MFU = 6 * parameters * real
tokens/s / peak dense bf16 FLOP/s, pad share, peak GPU memory. Loss agreement: the first `--loss-steps` optimizer
steps from the same init on the same samples (TRL's first batches; (c) packs each of them into rows).

    python bench/bench_sft.py                  # GPU: ~250M hybrid (8 Mamba-2, 4 attention, 12 MLP), bf16
    python bench/bench_sft.py --small          # CPU: tiny config, a minute; (a) is skipped if trl is missing

Results go to `<out>/bench_sft.json` (`--out`, default $OUT when set, else runs/bench_sft), rewritten after
every path. On a fresh GPU machine the first pass compiles and autotunes the Mamba Triton kernels (about two
minutes on an H100, once per process start on that machine's cache); the whole GPU run takes about six minutes.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import random
import statistics
import tempfile
import time
import traceback
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F
import transformers
from transformers import AutoTokenizer, NemotronHConfig, NemotronHForCausalLM

from alignment.graphed_step import GraphedTrainStep, capturable_adamw
from alignment.packed_model import enable_packed_sequences
from alignment.packing import IGNORE_INDEX, SampleCollator, model_inputs, plan_packed_batches
from alignment.runtime import to_device
from alignment.sft import token_loss_sum
from alignment.varlen_attention import use_varlen_attention
from measure import PEAK_BF16_TFLOPS, matmul_tflops, peak_memory_gib, reset_memory, sync

REPO = Path(__file__).resolve().parents[1]
TOKENIZER = REPO / "configs" / "tiny" / "tokenizer"  # only its pad token is used: the samples are token ids already

# ---------------------------------------------------------------------------------------------------------------
# Configuration
# ---------------------------------------------------------------------------------------------------------------

GPU_DEFAULTS = dict(
    samples=256, min_len=64, max_len=4096, batch_size=8, epochs=3, loss_steps=4,
    hidden=1024, blocks=24, unit="M-M-*-", vocab=32768, intermediate=4608, mamba_heads=32, mamba_head_dim=64,
    n_groups=2, ssm_state=128, chunk=128, attn_heads=16, kv_heads=4, head_dim=64, dtype="bfloat16",
)
SMALL_DEFAULTS = dict(
    samples=24, min_len=8, max_len=192, batch_size=4, epochs=1, loss_steps=3,
    hidden=64, blocks=6, unit="M-M-*-", vocab=512, intermediate=128, mamba_heads=4, mamba_head_dim=16,
    n_groups=1, ssm_state=16, chunk=16, attn_heads=4, kv_heads=2, head_dim=16, dtype="float32",
)


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--small", action="store_true", help="tiny config on CPU (smoke run)")
    parser.add_argument("--out", default=os.environ.get("OUT") or "runs/bench_sft", help="output directory")
    parser.add_argument("--device", default="auto", help="cuda, cpu or auto")
    parser.add_argument("--samples", type=int, help="samples per pass (the same for every path)")
    parser.add_argument("--min-len", type=int, help="shortest sample")
    parser.add_argument("--max-len", type=int, help="longest sample; also the packed row budget")
    parser.add_argument("--batch-size", type=int, help="samples per padded step (TRL's default is 8)")
    parser.add_argument("--rows-per-step", type=int, default=0,
                        help="packed rows per step; 0: as many tokens per step as a padded step on average")
    parser.add_argument("--epochs", type=int, help="timed passes after one warm-up pass")
    parser.add_argument("--loss-steps", type=int, help="optimizer steps compared in the loss agreement")
    parser.add_argument("--lr", type=float, default=1e-4, help="AdamW learning rate (constant) for every path")
    parser.add_argument("--skip-trl", action="store_true", help="leave out (a) and (a0)")
    parser.add_argument("--skip-trl-checkpointing", action="store_true", help="leave out (a0)")
    parser.add_argument("--paths", type=lambda x: x.split(","), default=[],
                        help="comma-separated subset of a,a0,b,c,c_segment,c_graph,c_2x_rows,c_2x_rows_graph (default all)")
    parser.add_argument("--peak-tflops", type=float, default=PEAK_BF16_TFLOPS, help="peak for MFU (dense bf16)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the lengths, tokens and init")
    parser.add_argument("--profile", type=int, default=0, metavar="STEPS",
                        help="after the paths, profile STEPS packed steps: host vs GPU time, top ops (profile.txt)")
    for name in GPU_DEFAULTS:
        if name not in ("samples", "min_len", "max_len", "batch_size", "epochs", "loss_steps"):
            kind = str if name in ("unit", "dtype") else int
            parser.add_argument(f"--{name.replace('_', '-')}", type=kind, help="model: " + name.replace("_", " "))
    args = parser.parse_args()
    for name, value in (SMALL_DEFAULTS if args.small else GPU_DEFAULTS).items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    if args.device == "auto":
        args.device = "cpu" if args.small or not torch.cuda.is_available() else "cuda"
    return args


# ---------------------------------------------------------------------------------------------------------------
# Model and data
# ---------------------------------------------------------------------------------------------------------------


def model_config(args: argparse.Namespace) -> NemotronHConfig:
    """A hybrid in miniature: Mamba-2 (M), attention (*), MLP (-); 'M-M-*-' x 4 = 8 M, 4 *, 12 -."""
    pattern = (args.unit * (args.blocks // len(args.unit) + 1))[: args.blocks]
    return NemotronHConfig(
        vocab_size=args.vocab, hidden_size=args.hidden, num_hidden_layers=args.blocks,
        hybrid_override_pattern=pattern, num_attention_heads=args.attn_heads, num_key_value_heads=args.kv_heads,
        head_dim=args.head_dim, intermediate_size=args.intermediate, mamba_num_heads=args.mamba_heads,
        mamba_head_dim=args.mamba_head_dim, n_groups=args.n_groups, ssm_state_size=args.ssm_state, conv_kernel=4,
        chunk_size=args.chunk, tie_word_embeddings=False, use_cache=False, attn_implementation="sdpa",
    )


def initial_weights(args: argparse.Namespace) -> dict[str, torch.Tensor]:
    """One random init (on the CPU, seeded) that every path starts from."""
    torch.manual_seed(args.seed)
    model = NemotronHForCausalLM(model_config(args)).to(getattr(torch, args.dtype))
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def fresh_model(args: argparse.Namespace, weights: dict[str, torch.Tensor]) -> NemotronHForCausalLM:
    with torch.device(args.device):
        model = NemotronHForCausalLM(model_config(args)).to(getattr(torch, args.dtype))
    model.load_state_dict(weights, strict=True)
    return model.train()


def long_tailed_samples(args: argparse.Namespace) -> list[dict]:
    """Log-uniform lengths in [min_len, max_len] (as many samples in 64..128 as in 2048..4096, like reasoning SFT
    data), Zipf-distributed tokens (so the loss moves in a few steps), the first quarter of each sample a prompt."""
    rng = random.Random(args.seed)
    lo, hi = math.log(args.min_len), math.log(args.max_len + 1)
    lengths = [min(args.max_len, int(math.exp(rng.uniform(lo, hi)))) for _ in range(args.samples)]
    g = torch.Generator().manual_seed(args.seed)
    zipf = 1.0 / torch.arange(1, args.vocab, dtype=torch.float64) ** 1.1  # ids 1..vocab-1; 0 is the pad
    samples = []
    for n in lengths:
        ids = (torch.multinomial(zipf, n, replacement=True, generator=g) + 1).tolist()
        samples.append({"input_ids": ids, "labels": [IGNORE_INDEX] * (n // 4) + ids[n // 4 :]})
    return samples


def padded_groups(n: int, batch_size: int) -> list[list[int]]:
    """Consecutive groups of `batch_size` samples: what TRL's sequential sampler hands its collator."""
    return [list(range(i, min(i + batch_size, n))) for i in range(0, n, batch_size)]


# ---------------------------------------------------------------------------------------------------------------
# (a) TRL's SFTTrainer
# ---------------------------------------------------------------------------------------------------------------


def run_trl(args, weights, samples, gradient_checkpointing: bool) -> dict:
    """Train with TRL's SFTTrainer on pre-tokenized samples (input_ids + labels); per-pass times and step losses."""
    from datasets import Dataset
    from transformers import TrainerCallback
    from transformers.trainer_callback import PrinterCallback
    from trl import SFTConfig, SFTTrainer

    class PassTimer(TrainerCallback):
        def __init__(self):
            self.seconds: list[float] = []

        def on_epoch_begin(self, *_, **__):
            sync(args.device)
            self.start = time.perf_counter()

        def on_epoch_end(self, *_, **__):
            sync(args.device)
            self.seconds.append(time.perf_counter() - self.start)

    class LossRecordingSFTTrainer(SFTTrainer):
        """SFTTrainer that keeps each step's training loss (TRL's logs round it to 4 digits)."""

        step_losses: list[torch.Tensor]

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            out = super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
            if model.training:
                self.step_losses.append((out[0] if return_outputs else out).detach().float())
            return out

    model = fresh_model(args, weights)
    tokenizer = AutoTokenizer.from_pretrained(TOKENIZER)
    dataset = Dataset.from_dict(
        {"input_ids": [s["input_ids"] for s in samples], "labels": [s["labels"] for s in samples]}
    )
    with tempfile.TemporaryDirectory() as tmp:
        config = SFTConfig(
            output_dir=tmp,
            per_device_train_batch_size=args.batch_size,
            num_train_epochs=1 + args.epochs,
            max_length=args.max_len,  # TRL's default (1024) would cut the long tail: not the same data
            learning_rate=args.lr,
            lr_scheduler_type="constant",
            train_sampling_strategy="sequential",
            gradient_checkpointing=gradient_checkpointing,
            bf16=args.dtype == "bfloat16",
            use_cpu=args.device == "cpu",
            logging_steps=10**9,
            save_strategy="no",
            report_to="none",
            disable_tqdm=True,
            seed=args.seed,
        )
        timer = PassTimer()
        trainer = LossRecordingSFTTrainer(
            model=model, args=config, train_dataset=dataset, processing_class=tokenizer, callbacks=[timer]
        )
        trainer.step_losses = []
        trainer.remove_callback(PrinterCallback)
        trainer.train()
    losses = [float(x) for x in trainer.step_losses]
    del trainer, model
    return {"pass_seconds": timer.seconds, "step_losses": losses}


# ---------------------------------------------------------------------------------------------------------------
# (b), (c) our loop
# ---------------------------------------------------------------------------------------------------------------


def eager_step(args, model) -> Callable[[dict], tuple[torch.Tensor, int]]:
    """The SFT stage's step (token_loss_sum, token-mean loss, clipping, AdamW) on a collated batch.

    As in the stage: pinned non-blocking copies, nothing read back inside the step. Returns (loss sum, targets).
    """
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=args.lr, weight_decay=0.0, fused=args.device == "cuda")
    device = torch.device(args.device)

    def step(batch: dict) -> tuple[torch.Tensor, int]:
        n_targets = int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())
        batch = to_device(batch, device)
        loss_sum = token_loss_sum(model, batch)
        (loss_sum / n_targets).backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss_sum.detach(), n_targets

    return step


def graphed_step(args, model, groups: list[list[int]], rows: int) -> GraphedTrainStep:
    """(c)'s step captured once as a CUDA graph and replayed (`alignment.graphed_step`)."""
    optimizer = capturable_adamw([p for p in model.parameters() if p.requires_grad], args.lr,
                                 torch.device(args.device), weight_decay=0.0)
    max_segments = max(len(g) for g in groups) + 2 * rows  # samples + each row's tail + its extension
    # A planned group almost always packs into `rows` rows (see plan_packed_batches); a rare extra row runs eagerly.
    return GraphedTrainStep(model, optimizer, token_loss_sum, rows=rows, tokens_per_row=args.max_len,
                            max_segments=max_segments, max_grad_norm=1.0)


def timed_passes(args, samples, groups: list[list[int]], collator: SampleCollator, passes: int, step) -> dict:
    """`step(batch)` -> (loss sum, targets, ...) over `groups`, `passes` times; seconds per pass, first-pass losses."""
    seconds, losses, shapes = [], [], []
    for epoch in range(passes):
        sync(args.device)
        start = time.perf_counter()
        for group in groups:
            batch = collator([samples[i] for i in group])
            loss_sum, n_targets, *_ = step(batch)
            if epoch == 0:
                shapes.append(tuple(batch["input_ids"].shape))
                losses.append(loss_sum.float() / n_targets)  # a new tensor: a graph's outputs are overwritten
        sync(args.device)
        seconds.append(time.perf_counter() - start)
    return {"pass_seconds": seconds, "step_losses": [float(x) for x in losses], "shapes": shapes}


def packed_model(args, weights, attention: str) -> tuple[NemotronHForCausalLM, str]:
    model = fresh_model(args, weights)
    path = enable_packed_sequences(model)
    label = str(path)
    if attention == "varlen":
        if not use_varlen_attention(model):
            raise RuntimeError("torch.nn.attention.varlen is not available here")
        label = f"mamba={path.mamba} attention=packed_varlen"
    return model, label


# ---------------------------------------------------------------------------------------------------------------
# Main
# ---------------------------------------------------------------------------------------------------------------


def summarize(name, run, real_tokens, total_tokens, steps, n_params, args, peak_mem, label=""):
    timed = run["pass_seconds"][1:] or run["pass_seconds"]
    median = statistics.median(timed)
    tps = real_tokens / median
    return {
        "path": name, "label": label, "steps_per_pass": steps, "real_tokens_per_pass": real_tokens,
        "tokens_per_pass_with_pad": total_tokens, "pad_share": 1 - real_tokens / total_tokens,
        "pass_seconds": run["pass_seconds"], "median_pass_seconds": median, "real_tokens_per_s": tps,
        "mfu": 6 * n_params * tps / (args.peak_tflops * 1e12), "peak_memory_gib": peak_mem,
        "step_losses_first_pass": run["step_losses"],
    }


def main() -> None:
    args = parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.device == "cpu":
        torch.set_num_threads(max(1, min(4, os.cpu_count() or 1)))

    samples = long_tailed_samples(args)
    lengths = [len(s["input_ids"]) for s in samples]
    real_tokens = sum(lengths)
    groups = padded_groups(len(samples), args.batch_size)
    padded_tokens = sum(len(g) * max(lengths[i] for i in g) for g in groups)
    mean_len = real_tokens / len(samples)
    rows_per_step = args.rows_per_step or max(1, round(args.batch_size * mean_len / args.max_len))
    packed_plan = plan_packed_batches(lengths, args.max_len, rows_per_step, seed=args.seed)

    weights = initial_weights(args)
    n_params = sum(v.numel() for v in weights.values())
    n_embed = weights["model.embeddings.weight"].numel()
    device_name = torch.cuda.get_device_name() if args.device == "cuda" else platform.processor() or "cpu"
    try:
        import trl

        trl_version = trl.__version__
    except ImportError:
        trl_version = None
    try:
        from torch.nn.attention.varlen import varlen_attn  # noqa: F401

        has_varlen = True
    except ImportError:
        has_varlen = False
    env = {
        "device": device_name, "torch": torch.__version__, "transformers": transformers.__version__,
        "trl": trl_version, "python": platform.python_version(), "torch_varlen_attn": has_varlen,
        "peak_bf16_tflops": args.peak_tflops, "measured_matmul_tflops": matmul_tflops(args.device),
    }
    cfg = model_config(args)
    print(f"device: {device_name} | torch {torch.__version__} | transformers {transformers.__version__} | "
          f"trl {trl_version}")
    print(f"model: NemotronH {n_params / 1e6:.1f}M params ({(n_params - n_embed) / 1e6:.1f}M without the input "
          f"embedding), pattern {cfg.hybrid_override_pattern}, hidden {args.hidden}, vocab {args.vocab}, {args.dtype}")
    print(f"data: {len(samples)} samples, lengths {min(lengths)}..{max(lengths)} (log-uniform), median "
          f"{statistics.median(lengths):.0f}, mean {mean_len:.0f}, {real_tokens} real tokens per pass; padded "
          f"batches of {args.batch_size}: {len(groups)} steps; packed: {len(packed_plan)} steps of {rows_per_step} "
          f"row(s) x {args.max_len} tokens")

    results: dict[str, dict] = {}
    errors: dict[str, str] = {}
    report = {
        "env": env, "args": vars(args), "n_params": n_params, "n_params_without_input_embedding": n_params - n_embed,
        "pattern": cfg.hybrid_override_pattern, "lengths": lengths, "rows_per_step": rows_per_step,
        "results": results, "errors": errors,
    }

    def attempt(key: str, fn) -> None:
        reset_memory(args.device)
        try:
            fn()
            if "real_tokens_per_s" in results.get(key, {}):
                r = results[key]
                print(f"[{key}] {r['real_tokens_per_s']:.0f} real tok/s, MFU {r['mfu']:.1%}, passes "
                      f"{', '.join(f'{x:.2f}s' for x in r['pass_seconds'])}")
        except Exception as e:  # one path failing must not lose the others' numbers
            traceback.print_exc()
            errors[key] = f"{type(e).__name__}: {e}"
            print(f"[{key}] failed: {errors[key]}")
        reset_memory(args.device)
        (out / "bench_sft.json").write_text(json.dumps(report, indent=2))  # after every path: a timeout keeps the rest

    passes = 1 + args.epochs
    padded_collator = SampleCollator(mode="padded", pad_token_id=0, max_tokens_per_row=args.max_len)
    packed_collator = SampleCollator(mode="packed", pad_token_id=0, max_tokens_per_row=args.max_len)

    trl_runs = [] if args.skip_trl else [("a", False)] + ([] if args.skip_trl_checkpointing else [("a0", True)])
    if trl_runs and trl_version is None:
        print("trl is not installed: (a) skipped")
        trl_runs = []
    trl_runs = [(k, c) for k, c in trl_runs if not args.paths or k in args.paths]
    for key, checkpointing in trl_runs:
        def run_a(key=key, checkpointing=checkpointing):
            run = run_trl(args, weights, samples, checkpointing)
            label = "TRL SFTTrainer, padded" + (", gradient checkpointing (TRL default)" if checkpointing else "")
            results[key] = summarize(key, run, real_tokens, padded_tokens, len(groups), n_params, args,
                                     peak_memory_gib(args.device), label)
        attempt(key, run_a)

    def run_b():
        model = fresh_model(args, weights)
        run = timed_passes(args, samples, groups, padded_collator, passes, eager_step(args, model))
        results["b"] = summarize("b", run, real_tokens, padded_tokens, len(groups), n_params, args,
                                 peak_memory_gib(args.device), "ours, SampleCollator(padded)")
    if not args.paths or "b" in args.paths:
        attempt("b", run_b)

    # (c) and its variants: key, attention, rows per step, loss function, what the variant changes.
    attention = "varlen" if has_varlen and args.device == "cuda" else "segment"
    variants = [("c", attention, rows_per_step, False, "")]
    if attention == "varlen":
        variants.append(("c_segment", "segment", rows_per_step, False, ""))
    if args.device == "cuda":
        variants.append(("c_graph", attention, rows_per_step, True, ", CUDA graph"))
    if not args.small:
        variants.append(("c_2x_rows", attention, 2 * rows_per_step, False, f", {2 * rows_per_step} rows/step"))
    if args.device == "cuda":
        variants.append(("c_2x_rows_graph", attention, 2 * rows_per_step, True,
                         f", {2 * rows_per_step} rows/step, CUDA graph"))
    for key, attn, rows, graphed, note in variants:
        if args.paths and key not in args.paths:
            continue

        def run_c(key=key, attn=attn, rows=rows, graphed=graphed, note=note):
            plan = plan_packed_batches(lengths, args.max_len, rows, seed=args.seed)
            model, label = packed_model(args, weights, attn)
            step = graphed_step(args, model, plan, rows) if graphed else eager_step(args, model)
            run = timed_passes(args, samples, plan, packed_collator, passes, step)
            if graphed:  # every batch ran at the captured shape
                run["shapes"] = [(rows, args.max_len)] * len(plan)
                print(f"  graphed: {step.replayed_steps} replayed, {step.eager_steps} eager (too large), "
                      f"{step.warmed} warm-up")
            total = sum(r * t for r, t in run["shapes"])
            results[key] = summarize(key, run, real_tokens, total, len(plan), n_params, args,
                                     peak_memory_gib(args.device), "ours, SampleCollator(packed), " + label + note)
        attempt(key, run_c)

    # Loss agreement: (c) on TRL's first batches, each packed into rows, from the same init.
    def run_c_aligned():
        model, _ = packed_model(args, weights, attention)
        run = timed_passes(args, samples, groups[: args.loss_steps], packed_collator, 1, eager_step(args, model))
        results["c_on_trl_batches"] = {"step_losses_first_pass": run["step_losses"]}
    attempt("c_on_trl_batches", run_c_aligned)

    if args.profile:
        attempt("profile", lambda: results.update(profile=profile_packed(args, weights, samples, packed_plan,
                                                                         packed_collator, attention, out)))
    (out / "bench_sft.json").write_text(json.dumps(report, indent=2))
    print_tables(report, args)
    print(f"wrote {out / 'bench_sft.json'}")


def profile_packed(args, weights, samples, plan: list[list[int]], collator, attention: str, out: Path) -> dict:
    """Where a packed step's time goes: seconds the host takes to issue it vs the GPU's busy time, and top ops.

    A step is host-bound when issuing its kernels takes longer than running them; then the GPU idles between them.
    """
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    model, _ = packed_model(args, weights, attention)
    run_step = eager_step(args, model)
    host, wall = [], []

    def step(group):
        run_step(collator([samples[i] for i in group]))

    for group in plan[: 2]:  # warm-up (autotuned shapes are cached from the timed paths)
        step(group)
    groups = plan[2: 2 + args.profile]
    for group in groups:
        sync(args.device)
        start = time.perf_counter()
        step(group)
        host.append(time.perf_counter() - start)  # the step is issued: nothing inside it waits for the GPU
        sync(args.device)
        wall.append(time.perf_counter() - start)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if args.device == "cuda" else [])
    with profile(activities=activities) as prof:
        for group in groups:
            step(group)
        sync(args.device)
    events = prof.key_averages()
    # Kernel events only: op events also carry the time of the kernels they launched (the profiler's own total).
    busy_us = sum(e.self_device_time_total for e in events
                  if e.device_type == DeviceType.CUDA and not e.is_user_annotation)
    sort = "self_device_time_total" if args.device == "cuda" else "self_cpu_time_total"
    (out / "profile.txt").write_text(events.table(sort_by=sort, row_limit=30) + "\n\n"
                                     + events.table(sort_by="self_cpu_time_total", row_limit=30))
    result = {"steps": len(groups), "host_issue_s_median": statistics.median(host),
              "wall_s_median": statistics.median(wall), "gpu_busy_s_per_step": busy_us / 1e6 / len(groups)}
    print(f"[profile] per packed step: host issue {result['host_issue_s_median'] * 1e3:.1f} ms, wall "
          f"{result['wall_s_median'] * 1e3:.1f} ms, GPU kernels busy {result['gpu_busy_s_per_step'] * 1e3:.1f} ms "
          f"(tables in {out / 'profile.txt'})")
    del model, run_step
    return result


def print_tables(report: dict, args: argparse.Namespace) -> None:
    results, env = report["results"], report["env"]
    base = results.get("a")
    print()
    measured = env["measured_matmul_tflops"]
    print(f"Throughput, {env['device']}, median of {args.epochs} timed pass(es) after 1 warm-up pass; MFU = 6 x "
          f"{report['n_params'] / 1e6:.1f}M params x real tok/s / {args.peak_tflops:.0f} TFLOP/s (dense bf16 peak"
          + (f"; measured bf16 matmul here: {measured:.0f} TFLOP/s)" if measured else ")"))
    header = f"{'path':<15}{'steps':>6}{'real tok/s':>12}{'vs (a)':>8}{'MFU':>8}{'pad':>7}{'peak mem':>10}  what"
    print(header)
    print("-" * len(header))
    for key in ("a", "a0", "b", "c", "c_segment", "c_graph", "c_2x_rows", "c_2x_rows_graph"):
        r = results.get(key)
        if r is None:
            if key in report["errors"]:
                print(f"({key})".ljust(15) + f"  failed: {report['errors'][key][:100]}")
            continue
        ratio = f"{r['real_tokens_per_s'] / base['real_tokens_per_s']:.2f}x" if base else "-"
        mem = f"{r['peak_memory_gib']:.1f} GiB" if r["peak_memory_gib"] is not None else "-"
        print(f"{'(' + key + ')':<15}{r['steps_per_pass']:>6}{r['real_tokens_per_s']:>12.0f}{ratio:>8}"
              f"{r['mfu']:>8.1%}{r['pad_share']:>7.0%}{mem:>10}  {r['label']}")

    steps = args.loss_steps
    cols = [("a", "(a) TRL"), ("b", "(b) padded"), ("c_on_trl_batches", "(c) packed")]
    losses = {k: results[k]["step_losses_first_pass"][:steps] for k, _ in cols if k in results}
    if not losses:
        return
    print()
    print(f"Loss agreement: token-mean loss of the first {steps} steps, same init, same samples per step "
          "(step 1: identical weights)")
    print(f"{'step':<6}" + "".join(f"{name:>14}" for k, name in cols if k in losses)
          + ("".join(f"{h:>14}" for h in ("|c-a|", "|c-a|/a", "|b-a|")) if "a" in losses else ""))
    for i in range(steps):
        row = f"{i + 1:<6}" + "".join(f"{losses[k][i]:>14.6f}" if i < len(losses[k]) else f"{'-':>14}"
                                       for k, _ in cols if k in losses)
        compared = ("a" in losses and "c_on_trl_batches" in losses
                    and i < min(len(losses["a"]), len(losses["c_on_trl_batches"])))
        if compared:
            a, c = losses["a"][i], losses["c_on_trl_batches"][i]
            b = losses["b"][i] if "b" in losses and i < len(losses["b"]) else float("nan")
            row += f"{abs(c - a):>14.2e}{abs(c - a) / abs(a):>14.2e}{abs(b - a):>14.2e}"
        print(row)


if __name__ == "__main__":
    main()
