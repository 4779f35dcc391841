"""The converter's compiled FP8 decodes (conversion/_kernels.c, built by `pip install`): one C
loop per element instead of torch's five elementwise passes, bit for bit the torch path in
conversion/formats.py, which remains the reference and the fallback (no C compiler at install
time, or `V4HAL_CONVERT_KERNELS=0`). `V4HAL_CONVERT_KERNELS=portable` keeps the compiled loops
but not their AVX2 versions (what a CPU without AVX2, e.g. an Arm host, runs). Every argument is
checked here; the C side trusts them."""

from __future__ import annotations

import os

import torch

from v4hal.ops import quant

try:
    from v4hal.conversion import _kernels
    UNAVAILABLE = ""
except ImportError as e:  # built without a C compiler: the torch path serves
    _kernels = None
    UNAVAILABLE = f"v4hal.conversion._kernels was not built ({e})"


MODES = ("1", "portable", "0")


def _mode() -> str:
    mode = os.environ.get("V4HAL_CONVERT_KERNELS", "1")
    if mode not in MODES:
        raise ValueError(f"V4HAL_CONVERT_KERNELS: expected one of {', '.join(MODES)}, got {mode!r}")
    return mode


def enabled() -> bool:
    """Whether conversions use the compiled decodes: built, and not switched off."""
    return _kernels is not None and _mode() != "0"


def describe() -> str:
    if _kernels is None:
        return f"torch decode ({UNAVAILABLE})"
    return {"1": "compiled decode", "portable": "compiled decode, portable loops (V4HAL_CONVERT_KERNELS=portable)",
            "0": "torch decode (V4HAL_CONVERT_KERNELS=0)"}[_mode()]


def _check(q: torch.Tensor, s: torch.Tensor, out: torch.Tensor, out_dtype: torch.dtype) -> None:
    block = quant.WEIGHT_BLOCK
    if q.dtype != torch.float8_e4m3fn or q.dim() != 2 or not q.is_contiguous():
        raise ValueError(f"fp8 decode: q: expected a contiguous 2-d float8_e4m3fn tensor, got {q.dtype} "
                         f"{tuple(q.shape)} (contiguous={q.is_contiguous()})")
    if s.dtype != torch.float32 or s.dim() != 2 or s.stride(1) != 1 or tuple(s.shape) != quant.scale_shape(tuple(q.shape), block):
        raise ValueError(f"fp8 decode: s: expected float32 {quant.scale_shape(tuple(q.shape), block)} with unit column "
                         f"stride, got {s.dtype} {tuple(s.shape)} stride {s.stride()}")
    if out.dtype != out_dtype or tuple(out.shape) != tuple(q.shape) or not out.is_contiguous():
        raise ValueError(f"fp8 decode: out: expected a contiguous {out_dtype} {tuple(q.shape)}, got {out.dtype} "
                         f"{tuple(out.shape)} (contiguous={out.is_contiguous()})")
    if any(t.device.type != "cpu" for t in (q, s, out)):
        raise ValueError("fp8 decode: expected CPU tensors")


def dequant_fp8(q: torch.Tensor, s: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """`out` (float32 or BF16, q's shape) = float32(q) * s per 128x128 block, rounded once to
    out's dtype; NaN codes give NaN. `s` must be finite, non-negative and below 2**8 (so
    s * 2**120 stays finite), as formats._fast_fp8 checks."""
    _check(q, s, out, out.dtype)
    fn = {torch.bfloat16: _kernels.fp8_rows_bf16, torch.float32: _kernels.fp8_rows_f32}.get(out.dtype)
    if fn is None:
        raise ValueError(f"fp8 decode: out: expected bfloat16 or float32, got {out.dtype}")
    fn(q.data_ptr(), s.data_ptr(), s.stride(0), q.shape[0], q.shape[1], out.data_ptr(), _mode() != "portable")
    return out


def fp8_to_int8(q: torch.Tensor, s: torch.Tensor, out: torch.Tensor, row_scale: torch.Tensor) -> None:
    """Row-wise int8 of the decoded rows into `out` (int8, q's shape) and `row_scale` (float32,
    one per row), as formats.fp8_to_int8_rows; q must hold no NaN code."""
    _check(q, s, out, torch.int8)
    if row_scale.dtype != torch.float32 or tuple(row_scale.shape) != (q.shape[0],) or not row_scale.is_contiguous():
        raise ValueError(f"fp8 -> int8: row_scale: expected contiguous float32 ({q.shape[0]},), got "
                         f"{row_scale.dtype} {tuple(row_scale.shape)}")
    _kernels.fp8_rows_int8(q.data_ptr(), s.data_ptr(), s.stride(0), q.shape[0], q.shape[1], out.data_ptr(),
                           row_scale.data_ptr(), _mode() != "portable")
