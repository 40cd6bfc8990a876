"""The CPU decode step's SSM state update: transformers' PyTorch fallback (as the static decoder called it) against
alignment/rollout/cpu_step.py, side by side on one layer of a model's decode step.

    python bench/bench_cpu_step.py                       # the tiny demo model's layer at 512 rows
    python bench/bench_cpu_step.py --batch 64 --repeats 200

Prints the median time per call of each and the ratio, the two run in turn; each updates its own copy of the same
state.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from transformers.models.nemotron_h import modeling_nemotron_h as modeling  # noqa: E402

from alignment.rollout import cpu_step  # noqa: E402


def timed_alternately(calls, repeats: int) -> list[float]:
    """Median seconds per call of each of `calls`, run in turn `repeats` times (a change of load hits all)."""
    times = [[] for _ in calls]
    for repeat in range(repeats + 3):  # 3 warm-up rounds
        for call, kept in zip(calls, times):
            started = time.perf_counter()
            call()
            if repeat >= 3:
                kept.append(time.perf_counter() - started)
    return [statistics.median(kept) for kept in times]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model-json", default="configs/tiny/model.json")
    parser.add_argument("--batch", type=int, default=512, help="decode rows (the demo's generation batch: 512)")
    parser.add_argument("--repeats", type=int, default=100)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: as torch starts)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    config = json.loads(Path(args.model_json).read_text())
    heads, head_dim, dstate = config["mamba_num_heads"], config["mamba_head_dim"], config["ssm_state_size"]
    groups = config["n_groups"]
    g = torch.Generator().manual_seed(0)
    batch = args.batch
    state = torch.randn(batch, heads, head_dim, dstate, generator=g)
    x, dt = torch.randn(batch, heads, head_dim, generator=g), torch.randn(batch, heads, generator=g)
    a, d, dt_bias = -torch.rand(heads, generator=g), torch.randn(heads, generator=g), torch.randn(heads, generator=g)
    b, c = torch.randn(batch, groups, dstate, generator=g), torch.randn(batch, groups, dstate, generator=g)
    theirs_state, ours_state = state.clone(), state.clone()

    def their_ssm():  # as the static decoder called it: per-head scalars expanded over the head
        modeling.mamba2_selective_state_update(
            theirs_state, x, dt[..., None].expand(-1, -1, head_dim), a[:, None, None].expand(-1, head_dim, dstate),
            b, c, d[:, None].expand(-1, head_dim), dt_bias=dt_bias[:, None].expand(-1, head_dim), dt_softplus=True)

    print(f"{args.model_json}: batch {batch}, {heads} heads x {head_dim} x {dstate}; {torch.get_num_threads()} "
          f"threads, median of {args.repeats}")
    their_s, our_s = timed_alternately(
        [their_ssm, lambda: cpu_step.ssm_update(ours_state, x, dt, a, b, c, d, dt_bias)], args.repeats)
    print(f"SSM state update: transformers {their_s * 1e3:.2f} ms, cpu_step {our_s * 1e3:.2f} ms, "
          f"{their_s / our_s:.2f}x")


if __name__ == "__main__":
    main()
