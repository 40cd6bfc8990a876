"""Batched sampling speed: our budget-aware `alignment.generation.generate` vs transformers' `generate`, same model,
prompts and sampling settings, side by side in one run.

The model is bench_grpo.py's random-init hybrid (24 blocks: 8 Mamba-2, 4 attention, 12 MLP, hidden 1024, bf16). It
rarely writes its end-of-turn token, so every row decodes `--max-new-tokens` tokens on every side: the same work.
Three sides: transformers `generate`; ours on the plain model; ours after `enable_packed_sequences` (the model as the
DPO and GRPO stages hold it while they sample). Each is timed `--repeats` times after a warm-up call (Triton autotunes
the Mamba kernels per shape); medians. `--profile` adds a torch profile of one call per side: host time per decode step
and the top operators, written to `--out`.

Greedy decoding must give the same tokens on every side: 16 rows x 32 tokens are compared in float32 and printed.

    python bench/bench_generation.py --device cuda                  # 128 prompts x 256 new tokens
    python bench/bench_generation.py --size tiny                    # CPU check
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

from alignment.generation import GenerationSettings, generate  # noqa: E402
from alignment.packed_model import enable_packed_sequences  # noqa: E402
from bench_grpo import build_model_dir  # noqa: E402

SIZES = {
    "full": dict(layers=24, hidden=1024, vocab=32768, rows=128, max_new_tokens=256),
    "tiny": dict(layers=6, hidden=64, vocab=1024, rows=8, max_new_tokens=16),
}


def prompts(tokenizer, rows: int) -> list[list[int]]:
    from alignment.chat import encode_prompt, with_reasoning
    from alignment.evaluate import prompt_messages
    from data_recipes.synthetic_math import MathTaskConfig, generate_splits

    split = generate_splits(MathTaskConfig(train_size=rows, validation_size=0, test_size=0, seed=0))["train"]
    return [encode_prompt(tokenizer, with_reasoning(prompt_messages(r), True)) for r in split]


def hf_generate(model, tokenizer, ids: list[list[int]], max_new: int, greedy: bool, seed: int) -> list[list[int]]:
    width = max(map(len, ids))
    input_ids = torch.full((len(ids), width), tokenizer.pad_token_id, dtype=torch.long)
    mask = torch.zeros_like(input_ids)
    for r, p in enumerate(ids):  # left padding, as transformers expects for decoder-only generation
        input_ids[r, width - len(p):] = torch.tensor(p)
        mask[r, width - len(p):] = 1
    device = next(model.parameters()).device
    torch.manual_seed(seed)
    out = model.generate(input_ids=input_ids.to(device), attention_mask=mask.to(device), max_new_tokens=max_new,
                         do_sample=not greedy, temperature=None if greedy else 1.0, top_p=None, top_k=None,
                         pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)
    return [row[width:].tolist() for row in out]


def ours_generate(model, tokenizer, ids, max_new: int, greedy: bool, seed: int) -> list[list[int]]:
    settings = GenerationSettings(max_new_tokens=max_new, temperature=0.0 if greedy else 1.0,
                                  eos_token_ids=[tokenizer.eos_token_id], pad_token_id=tokenizer.pad_token_id,
                                  batch_size=len(ids))
    return [r.tokens for r in generate(model, ids, settings=settings, seed=seed)]


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def timed(fn, device: str, repeats: int) -> list[float]:
    fn()  # warm-up: Triton autotuning, cuBLAS handles, allocator
    times = []
    for _ in range(repeats):
        sync(device)
        start = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - start)
    return times


def profile(fn, path: Path, steps: int) -> dict:
    from torch.profiler import ProfilerActivity, profile as torch_profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
    with torch_profile(activities=activities) as prof:
        fn()
    table = prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=25)
    path.write_text(table)
    kernels = [e for e in prof.events() if e.device_type.name == "CUDA"]
    return {"cuda_kernels_per_step": len(kernels) / steps,
            "gpu_kernel_ms_per_step": sum(e.device_time for e in kernels) / 1e3 / steps}


def python_profile(fn, path: Path) -> None:
    """cProfile of one call: where the host's time goes, by Python function (cumulative)."""
    import cProfile
    import io
    import pstats

    profiler = cProfile.Profile()
    profiler.runcall(fn)
    text = io.StringIO()
    pstats.Stats(profiler, stream=text).sort_stats("cumulative").print_stats(45)
    path.write_text(text.getvalue())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", choices=sorted(SIZES), default="full")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--profile", action="store_true", help="torch and Python profiles of one call per side")
    parser.add_argument("--out", default="runs/bench/generation")
    for key in SIZES["full"]:
        parser.add_argument(f"--{key.replace('_', '-')}", type=int, default=None)
    args = parser.parse_args()
    for key, value in SIZES[args.size].items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    args.dtype = "bfloat16" if args.device.startswith("cuda") else "float32"
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    from transformers import AutoModelForCausalLM, AutoTokenizer

    with tempfile.TemporaryDirectory(dir=out) as tmp:
        model_dir = build_model_dir(args, Path(tmp))
        tokenizer = AutoTokenizer.from_pretrained(model_dir)
        dtype = torch.bfloat16 if args.dtype == "bfloat16" else torch.float32
        plain = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype).to(args.device).eval()
        packed = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype).to(args.device).eval()
    packed_path = enable_packed_sequences(packed)
    ids = prompts(tokenizer, args.rows)
    n = args.max_new_tokens
    sides = {
        "transformers generate": lambda greedy=False: hf_generate(plain, tokenizer, ids, n, greedy, 0),
        "ours": lambda greedy=False: ours_generate(plain, tokenizer, ids, n, greedy, 0),
        "ours, packed model": lambda greedy=False: ours_generate(packed, tokenizer, ids, n, greedy, 0),
    }

    # Same greedy tokens on every side, checked in float32 (bf16 greedy decoding of a random model is full of near-ties
    # that flip between runs of the same code) on the first rows.
    check = ids[:16]
    plain32, packed32 = plain.float(), packed.float()
    reference = hf_generate(plain32, tokenizer, check, 32, True, 0)
    agreement = {
        "ours": sum(a == b for a, b in zip(ours_generate(plain32, tokenizer, check, 32, True, 0), reference)) / len(check),
        "ours, packed model": sum(a == b for a, b in zip(ours_generate(packed32, tokenizer, check, 32, True, 0),
                                                         reference)) / len(check),
    }
    plain, packed = plain32.to(dtype), packed32.to(dtype)

    results = {"setup": vars(args) | {"packed_path": str(packed_path)}, "greedy_rows_equal_to_transformers": agreement, "sides": {}}
    for name, fn in sides.items():
        times = timed(fn, args.device, args.repeats)
        tokens = sum(len(t) for t in fn())
        cell = {"median_s": statistics.median(times), "times_s": times, "tokens": tokens,
                "tokens_per_s": tokens / statistics.median(times), "ms_per_step": 1e3 * statistics.median(times) / n}
        if args.profile:
            cell |= profile(fn, out / f"profile_{len(results['sides'])}.txt", n)
            python_profile(fn, out / f"python_profile_{len(results['sides'])}.txt")
        results["sides"][name] = cell
        print(f"{name:24} {cell['median_s']:7.2f} s  {cell['tokens_per_s']:9.0f} tok/s  "
              f"{cell['ms_per_step']:6.1f} ms/step" + (f"  {cell['cuda_kernels_per_step']:.0f} kernels/step"
                                                      if args.profile else ""), flush=True)
    base = results["sides"]["transformers generate"]["median_s"]
    for name, cell in results["sides"].items():
        cell["speedup_vs_transformers"] = base / cell["median_s"]
    if args.device.startswith("cuda"):
        results["setup"]["gpu"] = torch.cuda.get_device_name()
    print(f"greedy rows (float32) equal to transformers generate: {agreement}")
    print("speed-up vs transformers generate: "
          + ", ".join(f"{k}: {v['speedup_vs_transformers']:.2f}x" for k, v in results["sides"].items()))
    (out / "results.json").write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
