"""The decode step's SSM state update alone: alignment/rollout/ssm_step.py against mamba-ssm's selective_state_update.

    . bench/gpu_env.sh && python3 bench/bench_ssm_step.py            # Nano-9B-v2's Mamba shapes, batch 64 and 256

One Mamba layer's update (heads 128, head dim 80, state 128, 8 groups; bf16 activations) per call, with the state in
float32 and in bf16. Per side: median microseconds per call (CUDA events over 50 calls, after a warm-up that
autotunes), the state bytes it must read and write, and that traffic over the time against the HBM bandwidth.
Results go to `<out>/bench_ssm_step.json`.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

from alignment.rollout.ssm_step import _kernel, ssm_step  # noqa: E402
from bench_scale import HBM_TBPS  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batches", default="64,256")
    parser.add_argument("--calls", type=int, default=50)
    parser.add_argument("--out", default=os.environ.get("OUT") or "runs/bench_ssm_step")
    args = parser.parse_args()
    from mamba_ssm.ops.triton.selective_state_update import selective_state_update

    heads, head_dim, dstate, groups = 128, 80, 128, 8
    rows = []
    for batch in [int(b) for b in args.batches.split(",")]:
        for state_dtype in (torch.float32, torch.bfloat16):
            state = torch.randn(batch, heads, head_dim, dstate, device="cuda").to(state_dtype)
            x = torch.randn(batch, heads, head_dim, device="cuda", dtype=torch.bfloat16)
            dt = torch.randn(batch, heads, device="cuda", dtype=torch.bfloat16)
            a = -torch.rand(heads, device="cuda") - 0.1
            b, c = (torch.randn(batch, groups, dstate, device="cuda", dtype=torch.bfloat16) for _ in range(2))
            d, dt_bias = torch.randn(heads, device="cuda"), torch.randn(heads, device="cuda")
            sides = {
                "mamba_ssm": lambda: selective_state_update(
                    state, x, dt[..., None].expand(-1, -1, head_dim), a[:, None, None].expand(-1, head_dim, dstate),
                    b, c, d[:, None].expand(-1, head_dim), dt_bias=dt_bias[:, None].expand(-1, head_dim),
                    dt_softplus=True),
                "ssm_step": lambda: ssm_step(state, x, dt, a, b, c, d, dt_bias),
            }  # fmt: skip
            state_bytes = 2 * state.numel() * state.element_size()  # read and written
            row = {"batch": batch, "state_dtype": str(state_dtype), "state_bytes": state_bytes}
            for name, call in sides.items():
                for _ in range(3):
                    call()
                times = []
                for _ in range(5):
                    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                    start.record()
                    for _ in range(args.calls):
                        call()
                    end.record()
                    torch.cuda.synchronize()
                    times.append(start.elapsed_time(end) / 1e3 / args.calls)
                seconds = statistics.median(times)
                row[f"{name}_us"] = seconds * 1e6
                row[f"{name}_share_of_hbm"] = state_bytes / seconds / (HBM_TBPS * 1e12)
            row["speedup"] = row["mamba_ssm_us"] / row["ssm_step_us"]
            row["ssm_step_config"] = str(getattr(_kernel(), "best_config", None))
            rows.append(row)
            print(json.dumps(row), flush=True)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "bench_ssm_step.json").write_text(json.dumps({"device": torch.cuda.get_device_name(), "rows": rows},
                                                        indent=2))


if __name__ == "__main__":
    main()
