"""What machine a figure came from, and its measured limits (for roofline shares)."""

from __future__ import annotations

import platform
import time
from functools import lru_cache

import torch


def cpu_name() -> str:
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def describe(device: torch.device | str = "cpu") -> str:
    device = torch.device(device)
    if device.type == "cuda":
        return f"{torch.cuda.get_device_name(device)} (CUDA {torch.version.cuda}, torch {torch.__version__})"
    if device.type == "npu":
        return f"{torch.npu.get_device_name()} (torch {torch.__version__})"
    import os

    # The SIMD level torch dispatches to: the same VM model has come with and without AVX-512 BF16.
    return (f"{cpu_name()}, {os.cpu_count()} logical cores, {torch.backends.cpu.get_cpu_capability()}, "
            f"{torch.get_num_threads()} torch threads, torch {torch.__version__}")


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type == "npu":
        torch.npu.synchronize()


def _best_seconds(fn, device: torch.device, repeats: int = 5) -> float:
    fn()
    synchronize(device)
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        synchronize(device)
        best = min(best, time.perf_counter() - start)
    return best


@lru_cache(maxsize=None)
def limits(device_str: str = "cpu") -> dict[str, float]:
    """Measured peak memory bandwidth (GB/s, large copy) and matrix throughput (TFLOP/s, BF16 and
    FP32 GEMM) of `device`: the roofline that bench figures are quoted against."""
    device = torch.device(device_str)
    n_bytes = 256 * 2**20 if device.type == "cpu" else 2 * 2**30
    src = torch.empty(n_bytes // 4, dtype=torch.float32, device=device).uniform_()
    dst = torch.empty_like(src)
    copy_s = _best_seconds(lambda: dst.copy_(src), device)
    out = {"bandwidth_gbs": 2 * n_bytes / copy_s / 1e9}
    n = 2048 if device.type == "cpu" else 8192
    for dtype, key in ((torch.bfloat16, "bf16_tflops"), (torch.float32, "fp32_tflops")):
        a = torch.randn(n, n, device=device).to(dtype)
        b = torch.randn(n, n, device=device).to(dtype)
        out[key] = 2 * n**3 / _best_seconds(lambda: a @ b, device, repeats=3) / 1e12
    return out
