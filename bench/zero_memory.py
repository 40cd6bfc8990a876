"""Memory per GPU of full-weight GRPO under ZeRO-3, computed from a model config's sizes (no GPU needed).

    python bench/zero_memory.py configs/nano9b/model_nano9b_v2.json --rollout-batch 64 --context 4352 --row 6144

What it counts, per GPU, in GB (1e9 bytes):
- shards: ZeRO-3 splits 18 bytes per parameter over the workers: bf16 weights (2), fp32 gradients
  (4, `grad_accum_dtype` fp32 in configs/deepspeed/zero3.json), fp32 master weights (4), AdamW moments (8);
- rollouts: every worker gathers the whole bf16 model (2 bytes per parameter) and holds the cache of its decode slots:
  per sequence, each Mamba layer's SSM state (heads x head dim x state, in bf16 or float32) and conv state
  (conv channels x kernel width, bf16), and each attention layer's K and V for the whole context (bf16);
- learner: one float32 copy of the full logits of a packed row (`loss_chunk_tokens` must be 0 under ZeRO-3; the
  log-softmax and its gradient hold one or two more for a moment) and one gathered layer (the largest, bf16).
  Activations are not counted: they depend on activation checkpointing and the kernels; measure them.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

ZERO3_BYTES_PER_PARAMETER = 2 + 4 + 4 + 8  # bf16 weights, fp32 gradients, fp32 master weights, AdamW m and v
GB = 1e9


def parameter_count(model_json: str) -> tuple[int, int]:
    """(all parameters, parameters of the largest decoder layer), from the config built on the meta device."""
    from alignment.modeling import ModelConfig, load_model

    model = load_model(ModelConfig(name_or_path=model_json, dtype="bfloat16"), "meta")
    layers = [sum(p.numel() for p in layer.parameters()) for layer in model.model.layers]
    return sum(p.numel() for p in model.parameters()), max(layers + [model.lm_head.weight.numel()])


def cache_bytes_per_sequence(config: dict, context: int, ssm_fp32: bool) -> int:
    """Decode cache of one sequence of `context` tokens: Mamba SSM and conv states, attention K and V."""
    pattern = config["hybrid_override_pattern"]
    mamba_layers, attention_layers = pattern.count("M"), pattern.count("*")
    heads, head_dim, state = config["mamba_num_heads"], config["mamba_head_dim"], config["ssm_state_size"]
    ssm = heads * head_dim * state * (4 if ssm_fp32 else 2)
    conv_channels = heads * head_dim + 2 * config["n_groups"] * state
    conv = conv_channels * config["conv_kernel"] * 2  # transformers' cache keeps the kernel's whole window
    kv = 2 * config["num_key_value_heads"] * config["head_dim"] * context * 2
    return mamba_layers * (ssm + conv) + attention_layers * kv


def plan(model_json: str, world: int, rollout_batch: int, context: int, row_tokens: int, ssm_fp32: bool,
         counts: tuple[int, int] | None = None) -> dict[str, float]:
    """GB per GPU of each part, and the peaks of the rollout and learner phases."""
    config = json.loads(Path(model_json).read_text())
    parameters, largest_layer = counts or parameter_count(model_json)
    shards = parameters * ZERO3_BYTES_PER_PARAMETER / world
    gathered = parameters * 2
    cache = rollout_batch * cache_bytes_per_sequence(config, context, ssm_fp32)
    logits = row_tokens * config["vocab_size"] * 4
    parts = {"parameters_b": parameters / 1e9, "shards": shards / GB, "gathered_weights": gathered / GB,
             "rollout_cache": cache / GB, "row_logits": logits / GB, "live_layer": largest_layer * 2 / GB}
    parts["rollout_peak"] = parts["shards"] + parts["gathered_weights"] + parts["rollout_cache"]
    parts["learner_peak_without_activations"] = parts["shards"] + parts["row_logits"] + parts["live_layer"]
    return parts


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("model_json")
    parser.add_argument("--rollout-batch", type=int, default=64, help="decode slots per GPU (rollout.batch_size)")
    parser.add_argument("--context", type=int, default=4352, help="prompt + rollout.max_new_tokens")
    parser.add_argument("--row", type=int, default=6144, help="train.max_tokens_per_row")
    parser.add_argument("--ssm-state", choices=["float32", "model"], default="float32",
                        help="rollout.ssm_state_dtype: float32 (the default) or model (bf16)")
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2, 4, 8])
    args = parser.parse_args()
    counts = parameter_count(args.model_json)
    ssm_fp32 = args.ssm_state == "float32"
    print(f"{args.model_json}: {counts[0] / 1e9:.2f}B parameters; rollouts of {args.rollout_batch} x {args.context} "
          f"tokens ({'float32' if ssm_fp32 else 'bf16'} SSM state); learner rows of {args.row} tokens\n")
    print("| workers | ZeRO-3 shards | gathered weights | rollout cache | rollout peak | row logits (fp32) | "
          "learner peak, activations not counted |")
    print("|---|---|---|---|---|---|---|")
    for world in args.workers:
        p = plan(args.model_json, world, args.rollout_batch, args.context, args.row, ssm_fp32, counts)
        print(f"| {world} | {p['shards']:.1f} GB | {p['gathered_weights']:.1f} GB | {p['rollout_cache']:.1f} GB | "
              f"{p['rollout_peak']:.1f} GB | {p['row_logits']:.1f} GB | {p['learner_peak_without_activations']:.1f} GB |")


if __name__ == "__main__":
    main()
