"""Parity and speed cases for the quantized-matmul family (real V4-Flash / V4-Pro / V3.2 linear
shapes plus small and ragged ones)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from v4hal import ops
from v4hal.bench.cases import SHAPES, Case, SpeedCase, Tolerance, randn


def _fp8_matmul_inputs(m: int, n: int, k: int):
    def make(g: torch.Generator) -> dict:
        a, a_s = ops.quantize_fp8(randn(g, m, k), (1, 128))
        b, b_s = ops.quantize_fp8(randn(g, n, k, scale=0.05), (128, 128))
        return dict(a=a, a_scale=a_s, b=b, b_scale=b_s, out_dtype=torch.bfloat16)

    return make


FP8_SHAPES = [("small", 4, 256, 512, True), ("ragged", 3, 200, 300, True),
              ("v4-flash/q_a", 16, SHAPES["v4-flash"]["q_lora"], SHAPES["v4-flash"]["hidden"], False),
              ("v4-pro/q_a", 16, SHAPES["v4-pro"]["q_lora"], SHAPES["v4-pro"]["hidden"], False),
              ("v3.2/q_a", 16, SHAPES["v3.2"]["q_lora"], SHAPES["v3.2"]["hidden"], False)]

PARITY = [
    Case("fp8_matmul", name, ops.fp8_matmul, _fp8_matmul_inputs(m, n, k),
         Tolerance.for_dtype(torch.bfloat16, k), quick=quick)
    for name, m, n, k, quick in FP8_SHAPES
]


def _fp8_speed(m: int, n: int, k: int):
    def make(device: torch.device):
        g = torch.Generator().manual_seed(0)
        x, w = randn(g, m, k).to(device), randn(g, n, k, scale=0.05).to(device)
        a, a_s = ops.quantize_fp8(x, (1, 128))
        b, b_s = ops.quantize_fp8(w, (128, 128))
        x16, w16 = x.bfloat16(), w.bfloat16()
        return (lambda: ops.fp8_matmul(a, a_s, b, b_s)), {"F.linear bf16": lambda: F.linear(x16, w16)}

    return make


SPEED = [
    SpeedCase("fp8_matmul", f"M{m}-N{n}-K{k}", _fp8_speed(m, n, k), flops=2 * m * n * k,
              bytes=m * k + n * k + 2 * m * n, quick=m <= 8)
    for m, n, k in [(1, 4096, 4096), (8, 7168, 7168), (2048, 4096, 4096)]
]
