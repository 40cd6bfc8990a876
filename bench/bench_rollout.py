"""Rollout engines side by side in one run: the static batch (today's default), continuous batching, transformers.

    python3 bench/bench_rollout.py --model tiny                      # CPU: configs/tiny/model.json
    python3 bench/bench_rollout.py --checkpoint runs/demo/dpo/checkpoint --prompts runs/demo/data/rl.jsonl \
        --groups 32 --lengths real                                   # CPU: a trained model's own lengths
    . bench/gpu_env.sh && python3 bench/bench_rollout.py --model 250m --batches 64,256
    . bench/gpu_env.sh && python3 bench/bench_rollout.py --model nano9b --batches 64,256

The model is a random init of the config, built on the device in the model's dtype (bf16 on CUDA, float32 on the
CPU). A random-init model rarely writes its end-of-turn token, so each sample is stopped at a planned length instead
(its own `max_new_tokens`): `--lengths uniform` gives every sample `--max-new-tokens`, `--lengths longtail` draws
them log-uniform in [`--min-new-tokens`, `--max-new-tokens`]. With `--checkpoint` (a trained model) and `--prompts`
(prompt rows, rendered reasoning-on by the checkpoint's chat template), `--lengths real` lets the model end its
samples itself, at most `--max-new-tokens`. Prompts: `--groups` distinct prompts of
`--prompt-len` tokens, each asked `--group-size` times, as GRPO does; sampling at temperature 1.

Sides (the same samples, the same planned lengths):
  dynamic      `alignment.rollout.generation._generate_batch` over batches of `--batch` rows on transformers' forward and
               dynamic cache (the CPU default): finished rows leave the batch.
  static       `alignment.rollout.generation._generate_batch` over batches of `--batch` rows on the static step (a CUDA graph
               on CUDA): finished rows stay in the batch, fed a filler, until the batch's longest sample ends.
  continuous   `alignment.rollout.continuous.generate_continuous` over `--batch` slots: refilled as samples finish, one
               prefill per distinct prompt.
  continuous, no fork   the same with every sample's prompt made distinct (its first token changed): the prefill
               work forking saves.
  continuous-fp32  continuous with the SSM state in float32 whatever `--ssm-state` says (its cost).
  continuous-fixed  continuous without moving the tail to fewer slots (every step over all `--batch` slots).
  transformers `model.generate` in batches of `--batch` (uniform lengths only: it cannot stop rows at planned lengths,
               so on long tails it would decode every row to the longest).

The SSM state between decode steps is `--ssm-state` (rollout.ssm_state_dtype: model, the model's dtype, or float32)
on the static and continuous sides; transformers keeps it in float32.

Reported per side: wall seconds, useful tokens/s (tokens of the samples: what a learner gets), computed rows/s (rows
a decode step processes, finished or not), decode steps and seconds per step, prefill forwards and prompts
prefilled. On CUDA also the share of the memory bound of one decode step at `--batch` rows (bench_scale.py's bound:
weights + Mamba states read and written + KV read, over the HBM bandwidth). Each side runs once after a warm-up
call of the same side on a few samples (Triton autotune, graph capture), synchronised; `--repeats` timed runs per
side, the sides interleaved, median seconds (repeat r samples with seed + r; counts are of the first). Per batch size also
the prefill alone: the distinct prompts once (forked) against every sample's prompt, in forwards of `--batch` rows.
Results go to `<out>/bench_rollout.json`.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import math
import os
import random
import statistics
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

from alignment.rollout.generation import (  # noqa: E402
    SSM_STATE_DTYPES, GenerationSettings, _generate_batch, _Sample, decode_attention_backends, prefill,
    sample_uniforms, ssm_state_dtype,
)  # fmt: skip
from alignment.modeling import ModelConfig, load_model  # noqa: E402
from alignment.rollout.continuous import generate_continuous  # noqa: E402
from alignment.rollout.static_decode import StaticDecoder, static_max_len  # noqa: E402
from bench_scale import HBM_TBPS, decode_bound, decode_state_bytes  # noqa: E402
from measure import sync  # noqa: E402

MODELS = {
    "tiny": REPO / "configs" / "tiny" / "model.json",
    "250m": REPO / "configs" / "gpu" / "model_250m.json",
    "nano9b": REPO / "configs" / "nano9b" / "model_nano9b_v2.json",
}


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", choices=list(MODELS), default="tiny")
    parser.add_argument("--checkpoint", help="a trained model directory instead of --model's random init")
    parser.add_argument("--prompts", help="prompt rows (JSONL) for --checkpoint, rendered reasoning-on")
    parser.add_argument("--device", default="auto", help="cuda, cpu or auto")
    parser.add_argument("--batches", default="32", help="comma-separated rows (static) / slots (continuous)")
    parser.add_argument("--groups", type=int, default=16, help="distinct prompts")
    parser.add_argument("--group-size", type=int, default=8, help="samples per prompt")
    parser.add_argument("--prompt-len", type=int, default=64)
    parser.add_argument("--lengths", default="uniform,longtail", help="comma-separated: uniform, longtail, real")
    parser.add_argument("--min-new-tokens", type=int, default=16)
    parser.add_argument("--max-new-tokens", type=int, default=160)
    parser.add_argument("--sides", default="dynamic,static,continuous,continuous-nofork,transformers")
    parser.add_argument("--ssm-state", choices=SSM_STATE_DTYPES, default="model",
                        help="the SSM state dtype of the static and continuous sides")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per side (median; repeat r: seed + r)")
    parser.add_argument("--out", default=os.environ.get("OUT") or "runs/bench_rollout")
    args = parser.parse_args()
    if args.device == "auto":
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    args.batches = [int(b) for b in args.batches.split(",")]
    args.lengths = args.lengths.split(",")
    args.sides = args.sides.split(",")
    return args


def workload(args, vocab: int, lengths: str, fork: bool, real_prompts: list[list[int]] | None = None,
             ) -> tuple[list[list[int]], list[int]]:
    """Prompts (each distinct prompt `group_size` times, or all distinct without `fork`) and planned lengths."""
    rng = random.Random(args.seed)
    distinct = real_prompts[:args.groups] if real_prompts else [
        [rng.randrange(5, vocab) for _ in range(args.prompt_len)] for _ in range(args.groups)]
    prompts = [list(p) for p in distinct for _ in range(args.group_size)]
    if not fork:
        for i, prompt in enumerate(prompts):
            prompt[0] = 5 + i % (vocab - 5)  # a different first token: no two samples share a prefill
    if lengths in ("uniform", "real"):  # real: the model's end-of-turn token ends a sample first
        planned = [args.max_new_tokens] * len(prompts)
    else:  # log-uniform: as many short samples as long ones, the long tail of reasoning traces
        lo, hi = math.log(args.min_new_tokens), math.log(args.max_new_tokens)
        planned = [int(round(math.exp(rng.uniform(lo, hi)))) for _ in prompts]
    return prompts, planned


def make_samples(prompts, planned, settings: GenerationSettings, seed: int) -> list[_Sample]:
    samples = []
    for i, (prompt, length) in enumerate(zip(prompts, planned)):
        sample = _Sample(prompt, None, False, dataclasses.replace(settings, max_new_tokens=length))
        sample.uniforms = sample_uniforms(seed, i, settings.max_new_tokens)
        samples.append(sample)
    return samples


def run_batches(model, samples, settings, batch, device, static: bool) -> dict:
    """Batches of `batch` samples, on the static step (finished rows stay, fed a filler) or transformers' dynamic
    cache (finished rows leave)."""
    max_len = static_max_len(max(len(s.prompt) for s in samples), settings.max_new_tokens)
    decoder, steps, rows = None, 0, 0
    for start in range(0, len(samples), batch):
        chunk = samples[start:start + batch]
        if static and (decoder is None or decoder.batch_size != len(chunk)):
            decoder = StaticDecoder(model, len(chunk), max_len, use_graph=device.type == "cuda",
                                    ssm_state_dtype=ssm_state_dtype(settings, model))
        _generate_batch(model, chunk, settings, None, decoder)
        decoded = [len(s.tokens) - 1 for s in chunk]  # the first token comes from the prefill
        steps += max(decoded)
        rows += len(chunk) * max(decoded) if static else sum(decoded)
    return {"decode_steps": steps, "computed_rows": rows, "prefills": -(-len(samples) // batch),
            "prompts_prefilled": len(samples)}


def run_continuous(model, samples, settings, batch, device) -> dict:
    max_len = static_max_len(max(len(s.prompt) for s in samples), settings.max_new_tokens)
    stats = generate_continuous(model, samples, dataclasses.replace(settings, batch_size=batch), max_len=max_len,
                                use_graph=device.type == "cuda")
    return {"decode_steps": stats.decode_steps, "computed_rows": stats.slot_steps,
            "prefills": stats.prefills, "prompts_prefilled": stats.prompts_prefilled,
            "slot_occupancy": stats.occupancy(), "moves_to_fewer_slots": stats.moves}


def run_transformers(model, samples, settings, batch, device) -> dict:
    steps, rows = 0, 0
    for start in range(0, len(samples), batch):
        chunk = samples[start:start + batch]
        width = max(len(s.prompt) for s in chunk)
        ids = torch.zeros(len(chunk), width, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for r, s in enumerate(chunk):
            ids[r, width - len(s.prompt):] = torch.tensor(s.prompt)
            mask[r, width - len(s.prompt):] = 1
        longest = max(s.settings.max_new_tokens for s in chunk)
        out = model.generate(input_ids=ids.to(device), attention_mask=mask.to(device), max_new_tokens=longest,
                             min_new_tokens=longest, do_sample=True, temperature=1.0, top_p=1.0, top_k=0)
        for r, s in enumerate(chunk):
            s.tokens = out[r, width:width + s.settings.max_new_tokens].tolist()
        steps += longest - 1
        rows += len(chunk) * (longest - 1)
    return {"decode_steps": steps, "computed_rows": rows, "prefills": -(-len(samples) // batch),
            "prompts_prefilled": len(samples)}


def run_continuous_fixed(model, samples, settings, batch, device) -> dict:
    from unittest import mock

    from alignment.rollout import continuous

    with mock.patch.object(continuous, "smaller_slots", lambda live, slots: None):
        return run_continuous(model, samples, settings, batch, device)


def run_continuous_fp32(model, samples, settings, batch, device) -> dict:
    return run_continuous(model, samples, dataclasses.replace(settings, ssm_state_dtype="float32"), batch, device)


SIDES = {"dynamic": functools.partial(run_batches, static=False), "static": functools.partial(run_batches, static=True),
         "continuous": run_continuous, "continuous-nofork": run_continuous, "continuous-fp32": run_continuous_fp32,
         "continuous-fixed": run_continuous_fixed,
         "transformers": run_transformers}


def side_state_dtype(side: str, settings: GenerationSettings, model) -> torch.dtype:
    """The SSM state a side keeps between steps (transformers' cache and the fp32 side: float32)."""
    if side in ("transformers", "dynamic", "continuous-fp32"):
        return torch.float32
    return ssm_state_dtype(settings, model)


def prefill_seconds(model, prompts: list[list[int]], batch: int, device) -> float:
    """Seconds to prefill `prompts` in forwards of `batch` rows (median of 3 after a warm-up), synchronised."""
    runs = []
    for repeat in range(4):
        sync(device.type)
        started = time.perf_counter()
        for start in range(0, len(prompts), batch):
            prefill(model, prompts[start:start + batch], pad_token_id=0)
        sync(device.type)
        if repeat:
            runs.append(time.perf_counter() - started)
    return statistics.median(runs)


def main() -> None:
    args = parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    device = torch.device(args.device)
    dtype = "bfloat16" if device.type == "cuda" else "float32"
    source = args.checkpoint or str(MODELS[args.model])
    model = load_model(ModelConfig(name_or_path=source, dtype=dtype, attn_implementation="sdpa"), device).eval()
    vocab = model.config.vocab_size
    settings = GenerationSettings(max_new_tokens=args.max_new_tokens, temperature=1.0, pad_token_id=0,
                                  ssm_state_dtype=args.ssm_state)
    real_prompts = None
    if args.checkpoint:
        from alignment.chat_format import encode_prompt
        from alignment.data import read_rows
        from alignment.evaluate import EvalConfig, generation_settings
        from alignment.grpo import prompt_for
        from alignment.modeling import load_tokenizer

        tokenizer = load_tokenizer(ModelConfig(name_or_path=args.checkpoint))
        settings = dataclasses.replace(generation_settings(tokenizer, EvalConfig()), temperature=1.0,
                                       max_new_tokens=args.max_new_tokens, ssm_state_dtype=args.ssm_state)
        rows, _ = read_rows(args.prompts, "prompt")
        real_prompts = [encode_prompt(tokenizer, prompt_for(row), True) for row in rows[:args.groups]]
    states = {dtype: decode_state_bytes(model, args.device, dtype) for dtype in (torch.float32, model.dtype)} \
        if device.type == "cuda" else None
    report = {"model": args.model, "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
              "torch": torch.__version__, "args": {k: v for k, v in vars(args).items()}, "runs": []}
    prompt_lengths = [len(p) for p in real_prompts] if real_prompts else [args.prompt_len]
    print(f"{source} on {report['device']}, {dtype}; {args.groups} prompts x {args.group_size}, prompts of "
          f"{min(prompt_lengths)}-{max(prompt_lengths)} tokens, new tokens up to {args.max_new_tokens}")
    header = f"{'lengths':<9}{'batch':>6} {'side':<18}{'seconds':>9}{'useful tok/s':>14}{'rows/s':>10}" \
             f"{'steps':>7}{'ms/step':>9}{'prefilled':>10}{'bound':>7}"
    print(header + "\n" + "-" * len(header))
    with torch.inference_mode(), decode_attention_backends(device):
        for lengths in args.lengths:
            for batch in args.batches:
                sides = [side for side in args.sides if side != "transformers" or lengths == "uniform"]
                timed: dict[str, list[float]] = {side: [] for side in sides}
                results: dict[str, dict] = {}
                for repeat in range(args.repeats):  # sides interleaved, so a change of machine load hits all
                    for side in sides:
                        prompts, planned = workload(args, vocab, lengths, side != "continuous-nofork", real_prompts)
                        if repeat == 0:  # autotune, capture, allocator warm-up
                            warm = make_samples(prompts[:min(4, len(prompts))], [4] * 4, settings, args.seed + 1)
                            SIDES[side](model, warm, settings, batch, device)
                        samples = make_samples(prompts, planned, settings, args.seed + repeat)
                        sync(args.device)
                        started = time.perf_counter()
                        result = SIDES[side](model, samples, settings, batch, device)
                        sync(args.device)
                        timed[side].append(time.perf_counter() - started)
                        result["useful_tokens"] = sum(len(s.tokens) for s in samples)
                        results.setdefault(side, result)  # counts of the first repeat (same planned lengths)
                forked, _ = workload(args, vocab, lengths, True, real_prompts)
                distinct = list(dict.fromkeys(map(tuple, forked)))
                prefill_report = {"lengths": lengths, "batch": batch, "side": "prefill",
                                  "prompts_forked": len(distinct), "prompts_unforked": len(forked),
                                  "seconds_forked": prefill_seconds(model, [list(p) for p in distinct], batch, device),
                                  "seconds_unforked": prefill_seconds(model, forked, batch, device)}
                report["runs"].append(prefill_report)
                print(f"{lengths:<9}{batch:>6} prefill: {len(distinct)} distinct prompts in "
                      f"{prefill_report['seconds_forked']:.3f} s, all {len(forked)} in "
                      f"{prefill_report['seconds_unforked']:.3f} s "
                      f"({prefill_report['seconds_unforked'] / prefill_report['seconds_forked']:.1f}x)", flush=True)
                for side in sides:
                    result, seconds = results[side], statistics.median(timed[side])
                    result |= {"lengths": lengths, "batch": batch, "side": side, "seconds": seconds,
                               "seconds_each": timed[side],
                               "useful_tokens_per_s": result["useful_tokens"] / seconds,
                               "computed_rows_per_s": result["computed_rows"] / seconds,
                               "seconds_per_step": seconds / max(1, result["decode_steps"])}
                    if states is not None:
                        context = args.prompt_len + sum(planned) / len(planned) / 2
                        state_dtype = side_state_dtype(side, settings, model)
                        result["ssm_state_dtype"] = str(state_dtype)
                        bound = decode_bound(model, states[state_dtype], batch, context, HBM_TBPS)
                        result["bound"] = bound
                        result["share_of_bound"] = result["computed_rows_per_s"] / bound["bound_tokens_per_s"]
                    report["runs"].append(result)
                    share = f"{result['share_of_bound']:.0%}" if "share_of_bound" in result else "-"
                    print(f"{lengths:<9}{batch:>6} {side:<18}{seconds:>9.2f}{result['useful_tokens_per_s']:>14,.0f}"
                          f"{result['computed_rows_per_s']:>10,.0f}{result['decode_steps']:>7}"
                          f"{result['seconds_per_step'] * 1e3:>9.1f}{result['prompts_prefilled']:>10}{share:>7}",
                          flush=True)
                    (out / "bench_rollout.json").write_text(json.dumps(report, indent=2, default=str))
    print(f"\nwrote {out / 'bench_rollout.json'}")


if __name__ == "__main__":
    main()
