"""SFT under DeepSpeed ZeRO-3 against the plain loop, one process, same model, data and steps.

    python bench/bench_zero.py                 # GPU: the ~250M hybrid of configs/gpu/model_250m.json
    python bench/bench_zero.py --small         # CPU: the tiny model, a smoke run
    python bench/bench_zero.py --gpus 2        # ZeRO-3 over 2 GPUs (NCCL) against the plain loop on one

Runs, each through the stage itself (`alignment.sft.run_sft`):
  plain-fp32 / zero3-fp32   loss agreement: the same trajectory is expected (ZeRO only moves where weights live)
  plain-bf16 / zero3-bf16   speed and memory in the dtype one trains in (ZeRO keeps fp32 master weights and AdamW
                            states, the plain loop steps bf16 weights, so their losses differ a little)
A short warm-up run per dtype comes first (Triton autotunes the Mamba kernels on first use). Printed per run:
losses of the first steps, tokens/s and seconds per step after the first 5 steps (padded packed rows, the same for
both), peak GPU memory.
On one GPU ZeRO-3 shards over a world of one: this checks the path and its cost, not the memory saving of N GPUs.
With `--gpus N` the ZeRO-3 runs use N processes, one GPU each, and the plain run accumulates N micro-batches per
step instead, so both see the same global batch (peak memory is rank 0's).
Results go to `<out>/bench_zero.json` (`--out`, default $OUT when set, else runs/bench_zero).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from alignment.config import load_config  # noqa: E402
from alignment.sft import SFTConfig, run_sft  # noqa: E402
from alignment.zero import free_local_port  # noqa: E402
from data_recipes.synthetic_math import MathDataConfig, MathTaskConfig, write_splits  # noqa: E402

ZERO3 = "configs/deepspeed/zero3.json"
SKIP = 5  # steps left out of the speed figures


def _rank(rank: int, world: int, port: int, config: SFTConfig) -> None:
    """One process of a multi-GPU run: its own GPU, an NCCL group (gloo for a `--small` CPU check), then the stage."""
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    on_gpu = config.device != "cpu"
    if on_gpu:
        torch.cuda.set_device(rank)
    torch.distributed.init_process_group("nccl" if on_gpu else "gloo", rank=rank, world_size=world)
    try:
        run_sft(config)
    finally:
        torch.distributed.destroy_process_group()


def run(name: str, out: Path, data: Path, base: list[str], extra: list[str], processes: int = 1) -> dict:
    overrides = [*base, f"data.train_path={data / 'train.jsonl'}", f"data.test_path={data / 'test.jsonl'}",
                 f"eval.test_path={data / 'test.jsonl'}", f"output_dir={out / name}", *extra]
    config = load_config(SFTConfig, "configs/tiny/sft.yaml", overrides)
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    started = time.perf_counter()
    if processes > 1:
        torch.multiprocessing.spawn(_rank, args=(processes, free_local_port(), config), nprocs=processes, join=True)
    else:
        run_sft(config)
    seconds = time.perf_counter() - started
    rows = [json.loads(line) for line in (out / name / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in rows if "loss" in r]
    # Steady state: tokens/s between the end of step SKIP and the last step (a new packed shape autotunes once).
    first, last = steps[SKIP - 1], steps[-1]
    tokens = last["tokens_per_s"] * last["elapsed_s"] - first["tokens_per_s"] * first["elapsed_s"]
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return {"losses": [round(r["loss"], 6) for r in steps], "tokens_per_s": tokens / (last["elapsed_s"] - first["elapsed_s"]),
            "seconds_per_step": (last["elapsed_s"] - first["elapsed_s"]) / (last["step"] - first["step"]),
            "peak_memory_gb": steps[-1].get("peak_memory_gb"), "seconds": round(seconds, 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--small", action="store_true", help="tiny model on CPU")
    parser.add_argument("--steps", type=int, default=30, help="optimizer steps per run")
    parser.add_argument("--dtypes", default="float32,bfloat16", help="comma-separated: float32, bfloat16")
    parser.add_argument("--gpus", type=int, default=1, help="processes (one GPU each) for the ZeRO-3 runs")
    parser.add_argument("--out", default=os.environ.get("OUT") or "runs/bench_zero", help="output directory")
    args = parser.parse_args()
    out = Path(args.out)
    data = out / "data"
    write_splits(MathDataConfig(task=MathTaskConfig(train_size=3000, validation_size=8, test_size=16),
                                output_dir=str(data)))
    base = [f"train.max_steps={args.steps}", "train.log_every=1", "train.warmup_steps=5", "eval.max_samples=8",
            "eval.max_new_tokens=32", "eval.budgets=[null]"]
    if args.small:
        base += ["device=cpu"]
    else:
        base += ["model.name_or_path=configs/gpu/model_250m.json", "train.lr=3.0e-4", "train.batch_size=64",
                 "train.max_tokens_per_row=8192", "device=cuda"]
    zero = [f"train.deepspeed={ZERO3}"]
    # The same global batch on both sides: N workers x 1 micro-batch, or 1 process accumulating N.
    plain = [f"train.grad_accum={args.gpus}"] if args.gpus > 1 else []
    results = {"device": torch.cuda.get_device_name() if torch.cuda.is_available() and not args.small else "cpu",
               "torch": torch.__version__, "steps": args.steps, "zero3_gpus": args.gpus, "runs": {}}
    for dtype in args.dtypes.split(","):
        short = "fp32" if dtype == "float32" else "bf16"
        run(f"warmup-{short}", out, data, [*base, "train.max_steps=10"], [f"model.dtype={dtype}"])
        for name, extra, processes in ((f"plain-{short}", plain, 1), (f"zero3-{short}", zero, args.gpus)):
            results["runs"][name] = run(name, out, data, base, [f"model.dtype={dtype}", *extra], processes)
            (out / "bench_zero.json").write_text(json.dumps(results, indent=2))
    for short in ("fp32", "bf16"):
        if f"plain-{short}" in results["runs"]:
            plain, sharded = results["runs"][f"plain-{short}"]["losses"], results["runs"][f"zero3-{short}"]["losses"]
            results[f"{short}_max_relative_loss_difference"] = max(abs(a - b) / abs(a) for a, b in zip(plain, sharded))
    (out / "bench_zero.json").write_text(json.dumps(results, indent=2))
    print(f"{'run':<12} {'tokens/s':>10} {'s/step':>7} {'peak GB':>8} {'seconds':>8}  first losses")
    for name, r in results["runs"].items():
        memory = f"{r['peak_memory_gb']:.2f}" if r["peak_memory_gb"] is not None else "-"
        print(f"{name:<12} {r['tokens_per_s']:>10.0f} {r['seconds_per_step']:>7.3f} {memory:>8} {r['seconds']:>8.1f}  "
              f"{r['losses'][:4]}")
    for short in ("fp32", "bf16"):
        if (key := f"{short}_max_relative_loss_difference") in results:
            print(f"{short} loss agreement (max relative difference over {args.steps} steps): {results[key]:.2e}")


if __name__ == "__main__":
    main()
