"""Padded vs packed forward+backward throughput on a small random hybrid, long-tailed sample lengths.

Every mode trains one pass over the same samples with the same weights (no optimizer step, so the loss is
comparable) and reports real (non-pad) tokens per second, the share of pad tokens, and the token-mean loss.

    python bench/bench_packing.py                      # CPU defaults, about a minute on 2 cores
    python bench/bench_packing.py --device cuda --dtype bfloat16 --hidden 1024 --layers 24 --max-len 4096
"""

from __future__ import annotations

import argparse
import math
import random
import time

import torch
from transformers import NemotronHConfig, NemotronHForCausalLM

from alignment.packed_model import enable_packed_sequences
from alignment.packing import IGNORE_INDEX, SampleCollator, model_inputs, plan_packed_batches


def long_tailed_lengths(n: int, min_len: int, max_len: int, seed: int) -> list[int]:
    """Log-uniform lengths: as many samples in [64, 128) as in [1024, 2048), like reasoning SFT data."""
    rng = random.Random(seed)
    lo, hi = math.log(min_len), math.log(max_len)
    return [int(math.exp(rng.uniform(lo, hi))) for _ in range(n)]


def build_model(args: argparse.Namespace) -> NemotronHForCausalLM:
    # Pattern: Mamba-2 (M), attention (*), MLP (-), in the 1:0.5:1.5 mix of the 24-block benchmark model.
    unit = "M-*-M-"
    pattern = (unit * (args.layers // len(unit) + 1))[: args.layers]
    config = NemotronHConfig(
        vocab_size=args.vocab,
        hidden_size=args.hidden,
        num_hidden_layers=args.layers,
        hybrid_override_pattern=pattern,
        num_attention_heads=max(args.hidden // 64, 1),
        num_key_value_heads=max(args.hidden // 256, 1),
        head_dim=64,
        intermediate_size=4 * args.hidden,
        mamba_num_heads=max(args.hidden // 32, 1),
        mamba_head_dim=64,
        n_groups=1,
        ssm_state_size=64,
        conv_kernel=4,
        chunk_size=args.chunk,
        use_cache=False,
    )
    torch.manual_seed(0)
    return NemotronHForCausalLM(config).to(device=args.device, dtype=getattr(torch, args.dtype)).train()


def run(model: torch.nn.Module, batches: list[dict], device: str) -> tuple[float, int, int, float]:
    """Forward+backward over all batches; returns (seconds, real tokens, pad tokens, token-mean loss)."""
    real = sum(int((b["sample_ids"] >= 0).sum()) for b in batches)
    total = sum(b["input_ids"].numel() for b in batches)
    targets = sum(int((b["labels"] != IGNORE_INDEX).sum()) for b in batches)
    loss_sum = 0.0
    if device == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    for batch in batches:
        inputs = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in model_inputs(batch).items()}
        n = int((batch["labels"] != IGNORE_INDEX).sum())
        loss = model(**inputs).loss
        (loss * n / targets).backward()
        loss_sum += loss.item() * n
    if device == "cuda":
        torch.cuda.synchronize()
    model.zero_grad(set_to_none=True)
    return time.perf_counter() - start, real, total - real, loss_sum / targets


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--samples", type=int, default=96, help="number of samples in the pass")
    parser.add_argument("--min-len", type=int, default=16, help="shortest sample")
    parser.add_argument("--max-len", type=int, default=1024, help="longest sample and the packed row budget")
    parser.add_argument("--batch-size", type=int, default=8, help="samples per padded batch")
    parser.add_argument("--rows", type=int, default=2, help="rows per packed batch")
    parser.add_argument("--hidden", type=int, default=128, help="hidden size")
    parser.add_argument("--layers", type=int, default=6, help="number of blocks")
    parser.add_argument("--vocab", type=int, default=1000, help="vocabulary size")
    parser.add_argument("--chunk", type=int, default=64, help="Mamba-2 chunk size")
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--dtype", default="float32", help="float32 or bfloat16")
    parser.add_argument("--threads", type=int, default=1, help="CPU threads, 0 for torch's default (1 is steadiest)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the lengths and tokens")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    lengths = long_tailed_lengths(args.samples, args.min_len, args.max_len, args.seed)
    g = torch.Generator().manual_seed(args.seed)
    samples = []
    for n in lengths:
        ids = torch.randint(1, args.vocab, (n,), generator=g).tolist()
        samples.append({"input_ids": ids, "labels": [IGNORE_INDEX] * (n // 4) + ids[n // 4 :]})  # 1/4 prompt

    padded = SampleCollator(mode="padded", pad_token_id=0, max_tokens_per_row=args.max_len)
    packed = SampleCollator(mode="packed", pad_token_id=0, max_tokens_per_row=args.max_len)
    order = list(range(len(samples)))
    random.Random(args.seed).shuffle(order)
    padded_batches = [
        padded([samples[i] for i in order[s : s + args.batch_size]]) for s in range(0, len(order), args.batch_size)
    ]
    plan = plan_packed_batches(lengths, args.max_len, args.rows, seed=args.seed)
    packed_batches = [packed([samples[i] for i in b]) for b in plan]

    model = build_model(args)
    params = sum(p.numel() for p in model.parameters())
    print(
        f"model: {params / 1e6:.1f}M params, pattern {model.config.hybrid_override_pattern}, {args.dtype} on "
        f"{args.device}, threads {torch.get_num_threads()}"
    )
    mean = sum(lengths) / len(lengths)
    print(f"data: {len(samples)} samples, lengths {min(lengths)}..{max(lengths)}, mean {mean:.0f}")

    modes = [("padded", padded_batches, None)]
    modes += [("packed segment-sdpa", packed_batches, "auto"), ("packed sdpa-dense-mask", packed_batches, "keep")]
    run(model, padded_batches[:1], args.device)  # warm-up
    results = {}
    for name, batches, attention in modes:
        if attention is not None:
            model.set_attn_implementation("sdpa")
            path = enable_packed_sequences(model, attention=attention)
            name = f"packed {path.attention} ({path.mamba})"
        seconds, real, pad, loss = run(model, batches, args.device)
        results[name] = real / seconds
        print(
            f"{name:<44} {len(batches):>3} batches  {real / seconds:>9.0f} real tok/s  pad {pad / (real + pad):5.1%}  "
            f"loss {loss:.6f}  {seconds:.1f}s"
        )
    base = results["padded"]
    for name, tps in results.items():
        if name != "padded":
            print(f"{name} vs padded: {tps / base:.2f}x")


if __name__ == "__main__":
    main()
