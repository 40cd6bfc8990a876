"""Packed rows against the same samples run one by one, on the GPU with the Mamba-2 kernels, in fp32 and bf16.

A small random hybrid (Mamba-2, attention and MLP blocks) and a sample set that mixes long samples, short ones and
ones shorter than the conv kernel, with boundaries inside and on Mamba chunks. For each case, the per-sample
losses, the logits and every parameter gradient of the packed batch are compared with the samples run alone
(batch of one, no padding):

  seq_idx + segment_sdpa   `enable_packed_sequences` (seq_idx reaches the conv and the scan), per-sample SDPA
  seq_idx + varlen         the same with `alignment.varlen_attention` (bf16, where PyTorch has the kernel)
  position_ids only        a stock model given restarting position_ids and no seq_idx: transformers keeps the
                           attention layers apart, the Mamba layers carry state across samples (the leak)
  bf16 alone vs fp32 alone the noise floor of bf16 itself, for scale

Training mode runs the fused Mamba kernel (the SFT path); "eval" rows run the unfused conv + scan path. The Mamba
dimensions (head dim 64, state 128, chunk 128) are those of `bench/bench_sft.py`, so that in one session the two
share Triton's compiled kernels: on a fresh machine, compiling and autotuning them takes about two minutes per
dtype on an H100 before the first result. Each case is printed and saved as soon as it is done.

    python bench/gpu_packing_check.py                  # GPU with mamba-ssm + causal-conv1d
    python bench/gpu_packing_check.py --device cpu     # the seq_idx reference path on the CPU (fp32)

Results go to `<out>/gpu_packing_check.json` (`--out`, default $OUT when set, else runs/gpu_packing_check).
"""

from __future__ import annotations

import argparse
import json
import os
import traceback
from pathlib import Path

import torch
import transformers
from transformers import NemotronHConfig, NemotronHForCausalLM

from alignment.packed_model import enable_packed_sequences
from alignment.packing import IGNORE_INDEX, SampleCollator, model_inputs
from alignment.token_logprobs import per_sample_logps
from alignment.varlen_attention import use_varlen_attention, varlen_kernel

# Samples of 1-3 tokens are shorter than the conv kernel (4); with chunk 128, boundaries fall inside chunks, on a
# chunk edge (128) and one past it (129), and long samples span several chunks.
LENGTHS = [1, 2, 3, 300, 37, 128, 129, 130, 5, 17, 260, 9]
BUDGET = 520
VOCAB = 512


def build_model(dtype: torch.dtype, device: str, seed: int = 0) -> NemotronHForCausalLM:
    torch.manual_seed(seed)
    config = NemotronHConfig(
        vocab_size=VOCAB, hidden_size=256, num_hidden_layers=9, hybrid_override_pattern="M-M*-M-*-",
        num_attention_heads=4, num_key_value_heads=2, head_dim=64, intermediate_size=512, mamba_num_heads=8,
        mamba_head_dim=64, n_groups=2, ssm_state_size=128, conv_kernel=4, chunk_size=128,
        tie_word_embeddings=False, use_cache=False, attn_implementation="sdpa",
    )
    return NemotronHForCausalLM(config).to(device=device, dtype=dtype)


def make_samples(seed: int = 0) -> list[dict]:
    g = torch.Generator().manual_seed(seed)
    samples = []
    for n in LENGTHS:
        ids = torch.randint(1, VOCAB, (n,), generator=g).tolist()
        prompt = n // 3  # no loss on the prompt
        samples.append({"input_ids": ids, "labels": [IGNORE_INDEX] * prompt + ids[prompt:]})
    return samples


def to_device(batch: dict, device: str) -> dict:
    return {k: v.to(device) if torch.is_tensor(v) else v for k, v in batch.items()}


def run_packed(model, samples, device, drop_seq_idx: bool) -> dict:
    """Per-sample logp sums, per-sample logits and gradients of -sum(logp) / targets for one packed batch."""
    collate = SampleCollator(mode="packed", pad_token_id=0, max_tokens_per_row=BUDGET)
    batch = to_device(collate(samples), device)
    assert batch["input_ids"].shape[0] < len(samples)  # really packed
    if drop_seq_idx:  # what TRL's padding-free rows and most frameworks give the model
        inputs = {"input_ids": batch["input_ids"], "position_ids": batch["position_ids"], "use_cache": False}
    else:
        inputs = model_inputs(batch)
    model.zero_grad(set_to_none=True)
    logits = model(**inputs).logits  # [R, T, V]
    sums, counts = per_sample_logps(logits, batch["labels"], batch["sample_ids"], len(samples))
    (-sums.sum() / counts.sum()).backward()
    per_sample_logits = [logits[batch["sample_ids"] == i].detach().float() for i in range(len(samples))]
    return {"sums": sums.detach().float(), "counts": counts, "logits": per_sample_logits, "grads": grads_of(model)}


def run_alone(model, samples, device) -> dict:
    """The same quantities with every sample run as its own batch of one."""
    collate = SampleCollator(mode="padded", pad_token_id=0, max_tokens_per_row=BUDGET)
    total = sum(sum(y != IGNORE_INDEX for y in s["labels"][1:]) for s in samples)
    model.zero_grad(set_to_none=True)
    sums, counts, logits_all = [], [], []
    for s in samples:
        batch = to_device(collate([s]), device)
        logits = model(**model_inputs(batch)).logits  # [1, n, V]
        sm, cn = per_sample_logps(logits, batch["labels"], batch["sample_ids"], 1)
        (-sm.sum() / total).backward()
        sums.append(sm.detach().float())
        counts.append(cn)
        logits_all.append(logits[0].detach().float())
    return {"sums": torch.cat(sums), "counts": torch.cat(counts), "logits": logits_all, "grads": grads_of(model)}


def grads_of(model) -> dict[str, torch.Tensor]:
    return {k: p.grad.detach().float().clone() for k, p in model.named_parameters() if p.grad is not None}


def compare(got: dict, ref: dict) -> dict:
    """Max abs / rel error of per-sample mean losses, max abs logit error, gradient errors."""
    has = ref["counts"] > 0
    loss_got = -got["sums"][has] / got["counts"][has]
    loss_ref = -ref["sums"][has] / ref["counts"][has]
    loss_err = (loss_got - loss_ref).abs()
    logit_err = max(float((a - b).abs().max()) for a, b in zip(got["logits"], ref["logits"]))
    diff_sq = sum(float((got["grads"][k] - g).pow(2).sum()) for k, g in ref["grads"].items())
    ref_sq = sum(float(g.pow(2).sum()) for g in ref["grads"].values())
    per_param = {
        k: float((got["grads"][k] - g).norm() / g.norm().clamp_min(1e-30)) for k, g in ref["grads"].items()
    }
    worst = max(per_param, key=per_param.get) if per_param else ""
    return {
        "loss_max_abs_err": float(loss_err.max()),
        "loss_max_rel_err": float((loss_err / loss_ref.abs()).max()),
        "logits_max_abs_err": logit_err,
        "grad_max_abs_err": max(
            (float((got["grads"][k] - g).abs().max()) for k, g in ref["grads"].items()), default=0.0
        ),
        "grad_max_abs_ref": max((float(g.abs().max()) for g in ref["grads"].values()), default=0.0),
        "grad_rel_err": (diff_sq / ref_sq) ** 0.5 if ref_sq else 0.0,
        "grad_worst_param": worst,
        "grad_worst_param_rel_err": per_param.get(worst, 0.0),
        "counts_equal": bool((got["counts"] == ref["counts"]).all()),
    }


HEADER = (f"{'dtype':<9}{'case':<42}{'loss abs':>10}{'loss rel':>10}{'logit abs':>11}{'grad abs':>10}"
          f"{'grad rel':>10}  worst param (rel)")


def print_row(r: dict) -> None:
    if "error" in r:
        print(f"{r['dtype']:<9}{r['case']:<42}  failed: {r['error'][:120]}")
        return
    print(f"{r['dtype']:<9}{r['case']:<42}{r['loss_max_abs_err']:>10.1e}{r['loss_max_rel_err']:>10.1e}"
          f"{r['logits_max_abs_err']:>11.1e}{r['grad_max_abs_err']:>10.1e}{r['grad_rel_err']:>10.1e}  "
          f"{r['grad_worst_param']} ({r['grad_worst_param_rel_err']:.1e})")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="cuda or cpu")
    parser.add_argument("--out", default=os.environ.get("OUT") or "runs/gpu_packing_check", help="output directory")
    parser.add_argument("--dtypes", default="float32,bfloat16", help="comma-separated: float32, bfloat16")
    parser.add_argument("--modes", default="train,eval", help="comma-separated: train (fused kernel), eval")
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    device = args.device
    if device == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = False  # fp32 means fp32 here
        torch.backends.cudnn.allow_tf32 = False
    samples = make_samples()
    wanted = [getattr(torch, name) for name in args.dtypes.split(",")]
    if device != "cuda" and torch.bfloat16 in wanted:
        print("bf16 cases need the GPU kernels: skipped on the CPU")
        wanted = [d for d in wanted if d != torch.bfloat16]
    # fp32 always runs first: its one-by-one results are the reference of the bf16 noise floor.
    dtypes = [torch.float32] + [d for d in wanted if d != torch.float32]
    modes = args.modes.split(",")
    env = {
        "device": torch.cuda.get_device_name() if device == "cuda" else "cpu", "torch": torch.__version__,
        "transformers": transformers.__version__, "lengths": LENGTHS, "budget": BUDGET,
    }
    rows: list[dict] = []

    def case(name: str, dtype: torch.dtype, fn) -> None:
        try:
            result = fn()
        except Exception as e:
            traceback.print_exc()
            result = {"error": f"{type(e).__name__}: {e}"}
        result = {"case": name, "dtype": str(dtype).removeprefix("torch."), **result}
        rows.append(result)
        print_row(result)
        (out / "gpu_packing_check.json").write_text(json.dumps({"env": env, "rows": rows}, indent=2))

    print(f"Packed vs one by one, {env['device']}, torch {env['torch']}, transformers {env['transformers']}; "
          f"samples {LENGTHS} in rows of {BUDGET}")
    print(HEADER)
    reference_fp32 = {}
    for dtype in dtypes:
        for mode in modes:
            model = build_model(dtype, device)
            model.train(mode == "train")
            alone = run_alone(model, samples, device)
            if dtype == torch.float32:
                reference_fp32[mode] = alone
                if torch.float32 not in wanted:
                    continue
            else:
                case(f"bf16 alone vs fp32 alone ({mode})", dtype, lambda: compare(alone, reference_fp32[mode]))

            stock = build_model(dtype, device)
            stock.train(mode == "train")
            case(f"position_ids only, stock model ({mode})", dtype,
                 lambda: compare(run_packed(stock, samples, device, drop_seq_idx=True), alone))
            del stock

            path = enable_packed_sequences(model)
            case(f"seq_idx + segment_sdpa ({mode})", dtype,
                 lambda: {"path": str(path), **compare(run_packed(model, samples, device, drop_seq_idx=False), alone)})
            if dtype != torch.float32 and varlen_kernel() is not None:
                use_varlen_attention(model)
                case(f"seq_idx + varlen ({mode})", dtype,
                     lambda: {"path": f"mamba={path.mamba} attention=packed_varlen",
                              **compare(run_packed(model, samples, device, drop_seq_idx=False), alone)})
            del model
            if device == "cuda":
                torch.cuda.empty_cache()

    print()
    print(HEADER)
    for r in rows:
        print_row(r)
    paths = sorted({r["path"] for r in rows if "path" in r})
    print("packed paths: " + "; ".join(paths))
    print(f"wrote {out / 'gpu_packing_check.json'}")


if __name__ == "__main__":
    main()
