"""Is the sampler the policy the learner trains? Checks on the GPU, with the Mamba-2 kernels, for each decode path.

For the ~250M hybrid of configs/gpu/model_250m.json (full parameters, as the GPU pipeline trains it) and the exact
Nano-9B-v2 architecture (LoRA of configs/nano9b/grpo.yaml), both random init in bf16 on the GPU:

1. Sampler against learner. Completions are sampled at temperature 1 with each decode path (dynamic, static,
   cuda-graph); `generate` returns each token's log-prob under the distribution it was drawn from. The learner's
   log-probs of the same tokens come from the GRPO learner's pass (`model_token_logps` on packed rows, train mode:
   the fused Mamba kernel) and, for comparison, from eval mode (the unfused conv + scan). Printed: mean |dlogp|,
   max |dlogp| and the k3 KL(sampler || learner) over the sampled tokens.
2. GRPO at lr=0: `alignment.grpo.policy_update` on the cuda-graph samples with random advantages, two minibatches.
   Nothing moves, so `approx_kl_old` and both clip fractions must be 0.
3. DPO at the round start: pairs of two samples of one prompt, reference log-probs as the stage takes them
   (`dpo.reference` + `all_pair_logps`, no grad), then the policy pass with grad (`pair_logps`): the sigmoid loss
   must be ln 2 within 1e-3.

    . bench/gpu_env.sh && python3 bench/gpu_onpolicy_check.py --models 250m,nano9b

Results go to <out>/onpolicy_check.json (--out, default $OUT, else runs/onpolicy_check).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from alignment import dpo  # noqa: E402
from alignment.config import load_config  # noqa: E402
from alignment.rollout.generation import GenerationSettings, generate  # noqa: E402
from alignment.grpo import GRPOConfig, policy_update  # noqa: E402
from alignment.lora import apply_lora  # noqa: E402
from alignment.modeling import ModelConfig, load_model, mamba_kernel_path  # noqa: E402
from alignment.packed_model import enable_packed_sequences  # noqa: E402
from alignment.packing import IGNORE_INDEX, SampleCollator  # noqa: E402
from alignment.token_logprobs import MismatchMeter, disable_dropout, model_token_logps  # noqa: E402

MODELS = {
    # name: (config file, LoRA from this GRPO config or None for full parameters, prompts, new tokens, chunk tokens)
    "250m": (REPO / "configs/gpu/model_250m.json", None, 64, 128, 0),
    "nano9b": (REPO / "configs/nano9b/model_nano9b_v2.json", REPO / "configs/nano9b/grpo.yaml", 16, 64, 2048),
    "tiny": (REPO / "configs/tiny/model.json", None, 8, 16, 0),  # a CPU check of this script (float32)
}
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
DECODE_PATHS = ("dynamic", "static", "cuda-graph") if DEVICE == "cuda" else ("dynamic", "static")
ROW = 4096


def sync() -> None:
    if DEVICE == "cuda":
        torch.cuda.synchronize()


def learner_mismatch(model, samples: list[dict], chunk_tokens: int, train_mode: bool) -> dict:
    """Mismatch between the samples' sampler log-probs and the learner's pass over the same tokens."""
    collator = SampleCollator(mode="packed", max_tokens_per_row=ROW)
    meter = MismatchMeter()
    model.train(train_mode)
    with torch.no_grad():
        for start in range(0, len(samples), 8):
            batch = collator(samples[start : start + 8])
            batch = {k: v.to(DEVICE) if torch.is_tensor(v) else v for k, v in batch.items()}
            logps = model_token_logps(model, batch, chunk_tokens, temperature=1.0)  # [R, T-1]
            targets = batch["labels"][:, 1:] != IGNORE_INDEX
            meter.add(logps[targets], batch["sampler_logps"][:, 1:][targets])
    model.train()
    return meter.stats()


def check_model(name: str, seed: int) -> dict:
    config_file, lora_config, n_prompts, new_tokens, chunk_tokens = MODELS[name]
    t0 = time.perf_counter()
    dtype = "bfloat16" if DEVICE == "cuda" else "float32"
    model = load_model(ModelConfig(name_or_path=str(config_file), dtype=dtype, init_seed=seed), DEVICE)
    grpo_config = load_config(GRPOConfig, lora_config, [
        "rollout.max_new_tokens=256", f"train.max_tokens_per_row={ROW}", "train.rows_per_micro_batch=1",
        "loss.minibatches=2", f"train.loss_chunk_tokens={chunk_tokens}", "rollout.temperature=1.0"])
    if grpo_config.lora.enabled:
        model = apply_lora(model, grpo_config.lora)
    disable_dropout(model)
    packed = enable_packed_sequences(model)
    report = {"model": name, "build_seconds": round(time.perf_counter() - t0, 1), "packed": str(packed),
              "mamba_path": mamba_kernel_path(model), "lora": grpo_config.lora.enabled, "paths": {}}
    vocab = model.config.vocab_size
    rng = random.Random(seed)
    # Each prompt twice: the DPO check pairs the two samples of one prompt.
    prompts = [[rng.randrange(5, vocab) for _ in range(rng.randint(32, 96))] for _ in range(n_prompts // 2)]
    prompts = [p for p in prompts for _ in range(2)]
    samples_by_path = {}
    for path in DECODE_PATHS:
        settings = GenerationSettings(max_new_tokens=new_tokens, temperature=1.0, eos_token_ids=[], pad_token_id=0,
                                      batch_size=len(prompts), decode=path)
        sync()
        t0 = time.perf_counter()
        results = generate(model, prompts, settings=settings, seed=seed)
        sync()
        seconds = time.perf_counter() - t0
        samples = [{"input_ids": p + r.tokens, "labels": [IGNORE_INDEX] * len(p) + r.tokens,
                    "sampler_logps": [math.nan] * len(p) + r.logprobs} for p, r in zip(prompts, results)]
        samples_by_path[path] = (samples, results)
        report["paths"][path] = {
            "generate_seconds": round(seconds, 2),
            "learner_train_mode": learner_mismatch(model, samples, chunk_tokens, train_mode=True),
            "learner_eval_mode": learner_mismatch(model, samples, chunk_tokens, train_mode=False),
        }
        print(name, path, json.dumps(report["paths"][path]), flush=True)

    # GRPO at lr=0 on the cuda-graph samples.
    samples, results = samples_by_path[DECODE_PATHS[-1]]
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=0.0)
    collator = SampleCollator(mode="packed", pad_token_id=0, max_tokens_per_row=ROW)
    advantages = torch.randn(len(samples), generator=torch.Generator().manual_seed(seed))
    model.eval()  # as generation leaves it: policy_update must switch to the learner's path itself
    stats = policy_update(model, samples, advantages, grpo_config, collator, optimizer, None, random.Random(seed))
    report["grpo_lr0"] = {k: stats[k] for k in ("approx_kl_old", "clipped_low", "clipped_high", "mismatch_abs_mean",
                                                "mismatch_abs_max", "mismatch_kl_k3", "updates")}
    print(name, "grpo lr=0", json.dumps(report["grpo_lr0"]), flush=True)

    # DPO at the round start: policy == reference.
    pairs = [{"encoded": {"chosen": dpo.sampled_sample(prompts[i], results[i]),
                          "rejected": dpo.sampled_sample(prompts[i + 1], results[i + 1])}}
             for i in range(0, len(prompts), 2)]
    with dpo.reference(model):
        ref_logps, _ = dpo.all_pair_logps(model, pairs, collator, DEVICE, 4, chunk_tokens)
    model.train()
    losses = []
    for start in range(0, len(pairs), 4):
        chunk = pairs[start : start + 4]
        logps, counts = dpo.pair_logps(model, chunk, collator, DEVICE, chunk_tokens)  # with grad, as in training
        ref = ref_logps[start : start + 4].to(DEVICE)
        loss, _, _ = dpo.preference_loss(logps[:, 0], logps[:, 1], ref[:, 0], ref[:, 1], counts[:, 0], counts[:, 1])
        losses.append(loss.detach().float().cpu())
    loss = torch.cat(losses)
    report["dpo_round_start"] = {"loss_mean": float(loss.mean()), "ln2": math.log(2),
                                 "max_abs_minus_ln2": float((loss - math.log(2)).abs().max()), "pairs": len(pairs)}
    print(name, "dpo round start", json.dumps(report["dpo_round_start"]), flush=True)
    del model, optimizer
    if DEVICE == "cuda":
        torch.cuda.empty_cache()
    return report


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="250m,nano9b", help="comma-separated: " + ", ".join(MODELS))
    parser.add_argument("--out", default=os.environ.get("OUT") or "runs/onpolicy_check")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    reports = {"device": torch.cuda.get_device_name() if DEVICE == "cuda" else "cpu", "torch": torch.__version__,
               "models": []}
    for name in args.models.split(","):
        reports["models"].append(check_model(name, args.seed))
        (out / "onpolicy_check.json").write_text(json.dumps(reports, indent=2))
    print(json.dumps(reports, indent=2))


if __name__ == "__main__":
    main()
