"""What the GPU benchmarks share to measure honestly: synchronizing, peak memory, and the matmul ceiling for MFU."""

from __future__ import annotations

import gc

import torch

PEAK_BF16_TFLOPS = 989.0  # H100 SXM and H200: dense bf16 tensor-core peak (datasheet)


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def reset_memory(device: str) -> None:
    """Free what the previous part left and start a new peak-memory count."""
    gc.collect()
    if device == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def peak_memory_gib(device: str) -> float | None:
    return torch.cuda.max_memory_allocated() / 2**30 if device == "cuda" else None


def matmul_tflops(device: str) -> float | None:
    """Measured dense bf16 matmul rate (8192^3, random data), the practical ceiling next to the datasheet peak."""
    if device != "cuda":
        return None
    a, b = (torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    for _ in range(3):
        a @ b
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(10):
        a @ b
    end.record()
    torch.cuda.synchronize()
    return 10 * 2 * 8192**3 / (start.elapsed_time(end) / 1e3) / 1e12
