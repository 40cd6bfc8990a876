"""Batched sampling speed: our budget-aware `alignment.rollout.generation.generate` vs transformers' `generate`, same model,
prompts and sampling settings, side by side in one run.

The model is bench_grpo.py's random-init hybrid (24 blocks: 8 Mamba-2, 4 attention, 12 MLP, hidden 1024, bf16). It
rarely writes its end-of-turn token, so every row decodes `--max-new-tokens` tokens on every side: the same work.
Four sides: transformers `generate`; ours on the plain model with transformers' dynamic cache, and with the static
step replayed as a CUDA graph (the default on CUDA, `alignment/rollout/static_decode.py`); ours after `enable_packed_sequences`
(the model as the DPO and GRPO stages hold it while they sample) on the default path. Each is timed `--repeats` times
after a warm-up call (Triton autotunes the Mamba kernels per shape); medians. `--profile` adds a torch profile of one call per side: host time per decode step
and the top operators, written to `--out`.

Greedy decoding must give the same tokens on every side: 16 rows x 32 tokens are compared in float32 and printed.
On CUDA the first 16 rows are also decoded in bf16 for the full length with the dynamic and the graph path, and the
share of equal rows and of equal tokens up to the first difference is printed (near-ties flip in bf16).

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

from alignment.rollout.generation import GenerationSettings, generate  # noqa: E402
from alignment.packed_model import enable_packed_sequences  # noqa: E402
from bench_grpo import build_model_dir  # noqa: E402

SIZES = {
    "full": dict(layers=24, hidden=1024, vocab=32768, rows=128, max_new_tokens=256),
    "tiny": dict(layers=6, hidden=64, vocab=1024, rows=8, max_new_tokens=16),
}


def prompts(tokenizer, rows: int) -> list[list[int]]:
    from alignment.chat_format import encode_prompt, with_reasoning
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


def ours_generate(model, tokenizer, ids, max_new: int, greedy: bool, seed: int, decode: str = "auto") -> list[list[int]]:
    settings = GenerationSettings(max_new_tokens=max_new, temperature=0.0 if greedy else 1.0,
                                  eos_token_ids=[tokenizer.eos_token_id], pad_token_id=tokenizer.pad_token_id,
                                  batch_size=len(ids), decode=decode)
    return [r.tokens for r in generate(model, ids, settings=settings, seed=seed)]


def bf16_agreement(expected: list[list[int]], got: list[list[int]]) -> dict:
    """Equal rows, and the share of tokens before each row's first difference."""
    prefix = [next((i for i, (a, b) in enumerate(zip(e, g)) if a != b), min(len(e), len(g))) for e, g in
              zip(expected, got)]
    return {"rows_equal": sum(e == g for e, g in zip(expected, got)) / len(expected),
            "tokens_before_first_difference": sum(prefix) / sum(len(e) for e in expected)}


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
    graph = "cuda-graph" if args.device.startswith("cuda") else "static"
    sides = {
        "transformers generate": lambda greedy=False: hf_generate(plain, tokenizer, ids, n, greedy, 0),
        "ours, dynamic cache": lambda greedy=False: ours_generate(plain, tokenizer, ids, n, greedy, 0, "dynamic"),
        f"ours, {graph}": lambda greedy=False: ours_generate(plain, tokenizer, ids, n, greedy, 0, graph),
        "ours, packed model": lambda greedy=False: ours_generate(packed, tokenizer, ids, n, greedy, 0),
    }

    # Same greedy tokens on every side, checked in float32 (bf16 greedy decoding of a random model is full of near-ties
    # that flip between runs of the same code) on the first rows.
    check = ids[:16]
    plain32, packed32 = plain.float(), packed.float()
    reference = hf_generate(plain32, tokenizer, check, 32, True, 0)
    agreement = {
        name: sum(a == b for a, b in zip(ours_generate(model, tokenizer, check, 32, True, 0, decode), reference))
        / len(check)
        for name, model, decode in [("ours, dynamic cache", plain32, "dynamic"), (f"ours, {graph}", plain32, graph),
                                    ("ours, packed model", packed32, "auto")]
    }
    plain, packed = plain32.to(dtype), packed32.to(dtype)
    if args.device.startswith("cuda"):
        agreement["bf16 full length, graph vs dynamic"] = bf16_agreement(
            ours_generate(plain, tokenizer, check, n, True, 0, "dynamic"),
            ours_generate(plain, tokenizer, check, n, True, 0, graph))

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
