"""Same-run peers for the cuda backend's speed cases (issue 21), and its Triton kernels timed on
their own, for `v4hal selfcheck` on a GPU.

- `blockwise_scaled_mm`: cuBLAS's block-scaled FP8 GEMM called directly (`F.scaled_mm` with
  DeepSeek's 1x128 activation and 128x128 weight scaling, the scales laid out once, untimed):
  the "best torch._scaled_mm-style block scaling" the Triton GEMM is judged against (>= 0.9x).
- `tensor_scaled_mm`: `torch._scaled_mm` with one scale per tensor, the cheapest FP8 GEMM cuBLAS
  has (an upper bound, not the same math).
- `triton_fp8_matmul`: the cuda backend's Triton GEMM itself (the op takes cuBLAS where it can,
  so the kernel is timed apart).
- `torch_path`: an op's torch implementation that a Triton kernel replaces (cpu_fast's code, which
  the cuda backend inherits, run on the device), so the speed table says whether the kernel earns
  its place.

Each peer maker returns `(callable, None)` or `(None, why it cannot run here)`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from v4hal import ops
from v4hal.backends import registry
from v4hal.bench.cases import randn


def fp8_operands(m: int, n: int, k: int, device: torch.device):
    """`fp8_matmul`'s operands as the speed cases make them: (a, a_scale, b, b_scale)."""
    g = torch.Generator().manual_seed(0)
    a, a_s = ops.quantize_fp8(randn(g, m, k), (1, 128))
    b, b_s = ops.quantize_fp8(randn(g, n, k, scale=0.05), (128, 128))
    return a.to(device), a_s.to(device), b.to(device), b_s.to(device)


def _runs(fn, what: str):
    try:
        fn()
    except (RuntimeError, NotImplementedError, ValueError, TypeError) as exc:
        return None, f"{what} unavailable here: {str(exc).splitlines()[0] if str(exc) else type(exc).__name__}"
    return fn, None


def blockwise_scaled_mm(m: int, n: int, k: int, device: torch.device):
    if not hasattr(F, "scaled_mm"):
        return None, f"F.scaled_mm block-scaled unavailable: torch {torch.__version__} has no F.scaled_mm"
    a, a_s, b, b_s = fp8_operands(m, n, k, device)
    sa, sb = registry.family_view("cuda", "quant").blockwise_scales(a_s, b_s, m, k)
    bt = b.t()
    return _runs(lambda: F.scaled_mm(a, bt, sa, F.ScalingType.BlockWise1x128, sb, F.ScalingType.BlockWise128x128,
                                     output_dtype=torch.bfloat16), "F.scaled_mm block-scaled")


def tensor_scaled_mm(m: int, n: int, k: int, device: torch.device):
    """M padded to 16, which cuBLAS requires of a per-tensor-scaled FP8 GEMM."""
    rows = max(16, -(-m // 16) * 16)
    g = torch.Generator().manual_seed(0)
    a = torch.randn(rows, k, generator=g).to(torch.float8_e4m3fn).to(device)
    b = (torch.randn(n, k, generator=g) * 0.05).to(torch.float8_e4m3fn).to(device)
    one = torch.ones((), device=device)
    return _runs(lambda: torch._scaled_mm(a, b.t(), one, one, out_dtype=torch.bfloat16), "torch._scaled_mm tensor-scaled")


def fp8_peers(m: int, n: int, k: int, device: torch.device, notes: list[str]) -> dict:
    """The FP8 GEMM peers that run here, by name; a note for each that cannot."""
    peers = {}
    for name, make in (("F.scaled_mm block-scaled", blockwise_scaled_mm), ("torch._scaled_mm tensor-scaled", tensor_scaled_mm)):
        fn, why = make(m, n, k, device)
        if fn is None:
            notes.append(f"fp8 M{m}-N{n}-K{k}: {why}")
        else:
            peers[name] = fn
    return peers


def triton_fp8_matmul(m: int, n: int, k: int, device: torch.device):
    a, a_s, b, b_s = fp8_operands(m, n, k, device)
    kernels = registry.backend_module("cuda").triton_kernels("quant", a)
    if kernels is None:
        return None, f"the Triton kernels run on CUDA devices with triton installed (here: {device})"
    return lambda: kernels.fp8_matmul(a, a_s, b, b_s, torch.bfloat16), None


def torch_path(op: str, *args):
    """`op`'s cpu_fast implementation called on `args` (the validated arguments its contract passes
    to a backend), on whatever device they are on."""
    fn = getattr(registry.family_view("cpu_fast", registry.ops()[op].family), op)
    return lambda: fn(*args)
