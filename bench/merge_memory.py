"""Peak memory of `align merge` against the size of one model: two synthetic checkpoints of N float32 shards are
merged at alpha 0.5 in this process, and the peak resident memory the merge added is printed (JSON).

    python bench/merge_memory.py --shards 16 --shard-mb 64

The peak is the kernel's high-water mark (VmHWM, reset just before the merge through /proc/self/clear_refs) minus
the resident memory just before; file pages the merge maps count while they are mapped.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch
from safetensors.torch import save_file

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from alignment.merge import INDEX, merge_checkpoints  # noqa: E402


def _status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {field}")


def write_synthetic_checkpoint(directory: Path, shards: int, shard_mb: int, seed: int) -> int:
    """`shards` safetensors files of four float32 tensors each, an index, a config; returns the weight bytes."""
    directory.mkdir(parents=True)
    generator = torch.Generator().manual_seed(seed)
    per_tensor = shard_mb * (1 << 20) // 4 // 4  # float32 values of one of a shard's four tensors
    weight_map = {}
    for s in range(shards):
        name = f"model-{s + 1:05d}-of-{shards:05d}.safetensors"
        tensors = {f"layers.{s}.w{t}": torch.randn(per_tensor, generator=generator) for t in range(4)}
        save_file(tensors, directory / name, metadata={"format": "pt"})
        weight_map |= {k: name for k in tensors}
        del tensors
    total = shards * 4 * per_tensor * 4
    (directory / INDEX).write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}))
    (directory / "config.json").write_text(json.dumps({"model_type": "synthetic", "layers": shards}))
    return total


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shards", type=int, default=16)
    parser.add_argument("--shard-mb", type=int, default=64)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        model_bytes = write_synthetic_checkpoint(root / "a", args.shards, args.shard_mb, seed=0)
        write_synthetic_checkpoint(root / "b", args.shards, args.shard_mb, seed=1)
        Path("/proc/self/clear_refs").write_text("5")  # resets the high-water mark to the current size
        before = _status_kib("VmRSS")
        started = time.perf_counter()
        merge_checkpoints(root / "a", root / "b", 0.5, root / "merged")
        seconds = time.perf_counter() - started
        peak_added = (_status_kib("VmHWM") - before) * 1024
    shard_bytes = model_bytes // args.shards
    print(json.dumps({"shards": args.shards, "model_mb": model_bytes / 2**20, "shard_mb": shard_bytes / 2**20,
                      "peak_added_mb": round(peak_added / 2**20, 1),
                      "peak_over_model_plus_shard": round(peak_added / (model_bytes + shard_bytes), 3),
                      "seconds": round(seconds, 2)}))


if __name__ == "__main__":
    main()
