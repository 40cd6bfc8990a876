"""Where one decode step's time goes: the model step (CUDA graph replay), the sampler, the host bookkeeping.

    . bench/gpu_env.sh && python3 bench/decode_breakdown.py --model nano9b --batches 64,256
    python3 bench/decode_breakdown.py --model tiny --batches 4        # CPU check

For each batch size: the static decoder is loaded from a prefill of random prompts and its step timed alone (graph
replay on CUDA, eager elsewhere), for the batch-prefilled layout (one shared write column) and the slot layout
(continuous batching, a column per slot), with the SSM state in the model's dtype and in float32. Then the sampler
(`next_tokens_from_uniforms` on the step's logits) and the per-sample host work (`_Sample.step`, the token upload)
alone. Each figure is the median of `--repeats` timed runs of `--steps` steps after a warm-up, synchronised. Against
it: the memory bound of the step (bench_scale.decode_bound). With `--profile`, the CUDA kernels of a few eager steps,
by total time. Results go to `<out>/decode_breakdown.json`.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

from alignment.modeling import ModelConfig, load_model  # noqa: E402
from alignment.rollout.generation import (  # noqa: E402
    GenerationSettings, _Sample, decode_attention_backends, next_tokens_from_uniforms, prefill, sample_uniforms,
)  # fmt: skip
from alignment.rollout.static_decode import StaticDecoder, static_max_len  # noqa: E402
from bench_rollout import MODELS  # noqa: E402
from bench_scale import HBM_TBPS, decode_bound, decode_state_bytes  # noqa: E402
from measure import sync  # noqa: E402


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", choices=list(MODELS), default="tiny")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--batches", default="64")
    parser.add_argument("--prompt-len", type=int, default=64)
    parser.add_argument("--context", type=int, default=1024, help="new tokens the KV buffers leave room for")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--profile", action="store_true", help="also list the CUDA kernels of eager steps")
    parser.add_argument("--out", default=os.environ.get("OUT") or "runs/decode_breakdown")
    args = parser.parse_args()
    if args.device == "auto":
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    args.batches = [int(b) for b in args.batches.split(",")]
    return args


def timed(fn, steps: int, repeats: int, device: str) -> float:
    """Median seconds of one call of `fn`, over `repeats` runs of `steps` calls (after one warm-up run)."""
    runs = []
    for repeat in range(repeats + 1):
        sync(device)
        started = time.perf_counter()
        for _ in range(steps):
            fn()
        sync(device)
        if repeat:
            runs.append((time.perf_counter() - started) / steps)
    return statistics.median(runs)


def loaded_decoder(model, batch, args, slots: bool, state_dtype) -> StaticDecoder:
    vocab = model.config.vocab_size
    generator = torch.Generator().manual_seed(batch)
    prompts = torch.randint(5, vocab, (batch, args.prompt_len), generator=generator).tolist()
    _, cache, mask = prefill(model, prompts, pad_token_id=0)
    decoder = StaticDecoder(model, batch, static_max_len(args.prompt_len, args.context),
                            use_graph=args.device == "cuda", ssm_state_dtype=state_dtype)
    if slots:
        decoder.load_slots(cache, mask, list(range(batch)), list(range(batch)))
    else:
        decoder.start(cache, mask)
    return decoder


def model_step(decoder: StaticDecoder, slots: bool):
    tokens = [7] * decoder.batch_size
    keep = list(range(decoder.batch_size))
    return (lambda: decoder.step_slots(tokens)) if slots else (lambda: decoder.next(tokens, keep))


def main() -> None:
    args = parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    dtype = "bfloat16" if args.device == "cuda" else "float32"
    model = load_model(ModelConfig(name_or_path=str(MODELS[args.model]), dtype=dtype, attn_implementation="sdpa"),
                       torch.device(args.device)).eval()
    states = decode_state_bytes(model, args.device, model.dtype)  # the bound of the step with the model-dtype state
    report = {"model": args.model, "device": torch.cuda.get_device_name() if args.device == "cuda" else "cpu",
              "torch": torch.__version__, "args": vars(args), "batches": []}
    settings = GenerationSettings(max_new_tokens=args.context, temperature=1.0, pad_token_id=0)
    # Positions the step steps through in all: room for every timed and warm-up step of the longest layout.
    need = (args.repeats + 1) * args.steps * 4 + 8
    args.context = max(args.context, need)
    with torch.inference_mode(), decode_attention_backends(torch.device(args.device)):
        for batch in args.batches:
            row = {"batch": batch}
            bound = decode_bound(model, states, batch, args.prompt_len + args.context / 2, HBM_TBPS)
            row["bound_step_ms"] = bound["bound_step_seconds"] * 1e3
            for slots in (False, True):
                for state_dtype in (model.dtype, torch.float32):
                    decoder = loaded_decoder(model, batch, args, slots, state_dtype)
                    state = "model" if state_dtype == model.dtype else "fp32"
                    name = f"step_{'slots' if slots else 'batch'}_{state}_state_ms"
                    row[name] = timed(model_step(decoder, slots), args.steps, args.repeats, args.device) * 1e3
                    if not slots and state == "model":
                        logits = decoder.next([7] * batch, list(range(batch)))
                    del decoder
                    torch.cuda.empty_cache() if args.device == "cuda" else None
            uniforms = torch.rand(batch, dtype=torch.float64)
            row["sampler_ms"] = timed(lambda: next_tokens_from_uniforms(logits, settings, uniforms.to(logits.device)),
                                      args.steps, args.repeats, args.device) * 1e3
            samples = []
            for i in range(batch):
                sample = _Sample([5] * args.prompt_len, None, False, dataclasses.replace(settings, max_new_tokens=10**9))
                sample.uniforms = sample_uniforms(0, i, 4096)
                samples.append(sample)

            def host() -> None:  # what the engine does per step besides the model and the sampler
                drawn = torch.stack([s.uniforms[len(s.tokens) % 4096] for s in samples]).to(logits.device)
                choice = drawn.to(torch.long).tolist()  # a device -> host copy, as the sampler's result takes
                fed = [s.step(c, 0.0) for s, c in zip(samples, choice)]
                torch.tensor(fed).to(logits.device)

            row["host_ms"] = timed(host, args.steps, args.repeats, args.device) * 1e3
            row["share_of_bound_graph_only"] = row["bound_step_ms"] / row["step_slots_model_state_ms"]
            report["batches"].append(row)
            print(json.dumps(row), flush=True)
            (out / "decode_breakdown.json").write_text(json.dumps(report, indent=2, default=str))
            if args.profile and args.device == "cuda":
                decoder = loaded_decoder(model, batch, args, True, model.dtype)
                decoder.graph = None  # eager steps: the profiler sees each kernel
                step = lambda: decoder.step_slots([7] * batch)  # noqa: E731
                step()
                with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
                    for _ in range(5):
                        step()
                    sync(args.device)
                table = prof.key_averages().table(sort_by="cuda_time_total", row_limit=25)
                print(table, flush=True)
                (out / f"kernels_batch{batch}.txt").write_text(table)
                del decoder
    print(f"wrote {out / 'decode_breakdown.json'}")


if __name__ == "__main__":
    main()
