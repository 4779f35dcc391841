"""Quantized matmul family: DeepSeek's FP8 block scaling, MXFP4 experts, int8 W8A8.

Formats (DeepSeek V3/V3.2/V4 checkpoints, see docs/quant.md):
- FP8: `float8_e4m3fn` values with one fp32 scale per block, `x ~= q * scale`. Activations use
  1x128 blocks (one scale per 128 consecutive elements of the last dim), weights 128x128 blocks
  (scale shape `[ceil(N/128), ceil(K/128)]`). scale = max(amax, 1e-4) / 448; with
  `scale_fmt="ue8m0"` the scale is rounded UP to a power of two (2**ceil(log2(s))), so no value
  ever exceeds the e4m3 range. Ragged tails (K or N not a multiple of the block) form a short block.
  An FP8 weight must hold no e4m3 NaN code (0x7f / 0xff): `fp8_matmul` does not scan its operands
  (a pass over the weight per call), so what it makes of one is undefined (cpu_fast's decode GEMV
  reads it as +-480). Checkpoint loaders and converters reject such weights, once. A NaN code in
  an activation gives NaN outputs on every backend.
- FP4 (MXFP4, V4 routed experts): e2m1 codes packed two per byte (element 2i in the low nibble,
  2i+1 in the high nibble) in a uint8 tensor `[N, K/2]`, one power-of-two (ue8m0) scale per 1x32
  block, given as fp32 powers of two or `float8_e8m0fnu`, shape `[N, K/32]`.
- int8 W8A8 (Ascend A2/A3): symmetric int8 with one fp32 scale per row of the last dim (per token
  for activations, per output channel for weights), scale = amax / 127.
"""

from __future__ import annotations

import math

import torch

from v4hal.backends.registry import dispatch, register_op
from v4hal.ops import _check

__all__ = ["FP8_MAX", "FP4_MAX", "INT8_MAX", "ACT_BLOCK", "WEIGHT_BLOCK", "FP4_BLOCK", "INT32_EXACT_K",
           "quantize_fp8", "dequantize_fp8", "fp8_matmul",
           "quantize_fp4", "dequantize_fp4", "fp4_matmul",
           "quantize_int8", "int8_matmul", "scale_shape"]

FAMILY = "quant"
for _op in ("quantize_fp8", "dequantize_fp8", "fp8_matmul", "quantize_fp4", "dequantize_fp4",
            "fp4_matmul", "quantize_int8", "int8_matmul"):
    register_op(_op, FAMILY)

FP8_MAX = 448.0
FP4_MAX = 6.0
# e2m1 magnitude of codes 0..7; bit 3 of a code is the sign.
E2M1_VALUES = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0)
INT8_MAX = 127.0
ACT_BLOCK = (1, 128)
WEIGHT_BLOCK = (128, 128)
FP4_BLOCK = 32
# The longest K whose int8 x int8 sum cannot overflow int32 (|q| <= 128): longer products are
# summed in K pieces of at most this length (or in a wider type) by every backend.
INT32_EXACT_K = (2**31 - 1) // (128 * 128)
SCALE_FMTS = ("fp32", "ue8m0")
FLOAT_IN = (torch.float32, torch.bfloat16, torch.float16, torch.float64)
OUT_DTYPES = (torch.bfloat16, torch.float16, torch.float32, torch.float64)
FP8 = (torch.float8_e4m3fn,)
FP4_SCALE_DTYPES = (torch.float32, torch.float8_e8m0fnu, torch.uint8)
# What a checkpoint may store an FP8 weight's block scales as: the floats `fp8_matmul` and
# `dequantize_fp8` take, or V4's ue8m0 exponent bytes as float8_e8m0fnu, which loaders and
# converters turn into float32 exactly. Not uint8: no FP8 contract reads exponent bytes so.
FP8_STORED_SCALE_DTYPES = (torch.float32, torch.float64, torch.float8_e8m0fnu)


def scale_shape(shape: tuple[int, ...], block: tuple[int, int]) -> tuple[int, ...]:
    """Shape of the scale tensor for a tensor of `shape` quantized in `block` blocks."""
    bm, bk = block
    if bm == 1:
        return (*shape[:-1], math.ceil(shape[-1] / bk))
    return (math.ceil(shape[-2] / bm), math.ceil(shape[-1] / bk))


def _block(op: str, block: object) -> tuple[int, int]:
    if (not isinstance(block, tuple) or len(block) != 2
            or not all(isinstance(b, int) and b > 0 for b in block)):
        raise _check.OpInputError(op, "block", "a tuple of two positive ints like (1, 128)", repr(block))
    return block


def quantize_fp8(x: torch.Tensor, block: tuple[int, int] = ACT_BLOCK, scale_fmt: str = "fp32"):
    """Block-quantize `x` to e4m3: returns `(q, scale)`.

    x: float tensor. With block (1, b) any rank >= 1, blocks run along the last dim; with
    (bm, bk), bm > 1, x must be 2-d `[N, K]` (a weight). q: `float8_e4m3fn`, x's shape.
    scale: float32, `scale_shape(x.shape, block)`. NaN/Inf in x is rejected (it would poison the
    block's amax and every value in it).
    """
    op = "quantize_fp8"
    block = _block(op, block)
    _check.tensor(op, "x", x, dtypes=FLOAT_IN, ndim=2 if block[0] > 1 else range(1, 9))
    _check.choice(op, "scale_fmt", scale_fmt, SCALE_FMTS)
    _check.finite(op, "x", x)
    return dispatch(op)(x, block, scale_fmt)


def dequantize_fp8(q: torch.Tensor, scale: torch.Tensor, block: tuple[int, int] = WEIGHT_BLOCK,
                   out_dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    """`q * scale` with each scale broadcast over its block; exactly DeepSeek's weight_dequant
    (product in float32, then cast to `out_dtype`)."""
    op = "dequantize_fp8"
    block = _block(op, block)
    _check.tensor(op, "q", q, dtypes=FP8, ndim=2 if block[0] > 1 else range(1, 9))
    _check.tensor(op, "scale", scale, dtypes=(torch.float32, torch.float64))
    _check.shape(op, "scale", scale, scale_shape(tuple(q.shape), block), f"q {tuple(q.shape)} in {block} blocks")
    _check.choice(op, "out_dtype", out_dtype, OUT_DTYPES)
    _check.same_device(op, q=q, scale=scale)
    _check.scales(op, scale=scale)
    return dispatch(op)(q, scale, block, out_dtype)


def fp8_matmul(a: torch.Tensor, a_scale: torch.Tensor, b: torch.Tensor, b_scale: torch.Tensor,
               out_dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    """`y = dequant(a) @ dequant(b).T` as DeepSeek's FP8 GEMM computes it.

    a: e4m3 `[..., K]` with a_scale fp32 `[..., ceil(K/128)]` (1x128 blocks);
    b: e4m3 `[N, K]` with b_scale fp32 `[ceil(N/128), ceil(K/128)]` (128x128 blocks).
    Per K block the raw products are summed in fp32, then scaled by `a_scale * b_scale` and added
    to an fp32 accumulator. Returns `[..., N]` in `out_dtype`.
    """
    op = "fp8_matmul"
    _check.tensor(op, "a", a, dtypes=FP8, ndim=range(1, 9))
    _check.tensor(op, "b", b, dtypes=FP8, ndim=2)
    _check.equal(op, "b", b.shape[1], a.shape[-1], "K (columns of b) = last dim of a")
    _check.tensor(op, "a_scale", a_scale, dtypes=(torch.float32, torch.float64))
    _check.tensor(op, "b_scale", b_scale, dtypes=(torch.float32, torch.float64))
    _check.shape(op, "a_scale", a_scale, scale_shape(tuple(a.shape), ACT_BLOCK), "1x128 blocks of a")
    _check.shape(op, "b_scale", b_scale, scale_shape(tuple(b.shape), WEIGHT_BLOCK), "128x128 blocks of b")
    _check.choice(op, "out_dtype", out_dtype, OUT_DTYPES)
    _check.same_device(op, a=a, a_scale=a_scale, b=b, b_scale=b_scale)
    _check.scales(op, a_scale=a_scale, b_scale=b_scale)
    return dispatch(op)(a, a_scale, b, b_scale, out_dtype)


def quantize_fp4(w: torch.Tensor):
    """MXFP4-quantize a weight `[N, K]` (K even): returns `(packed uint8 [N, K/2], scale fp32
    [N, K/32])`. scale = 2**ceil(log2(amax / 6)) per 1x32 block, amax clamped to >= 1e-4 as for
    FP8 (an all-zero block gets a small finite scale); values round to the nearest e2m1 code, ties
    to the even code. K must be a multiple of 32."""
    op = "quantize_fp4"
    _check.tensor(op, "w", w, dtypes=FLOAT_IN, ndim=2)
    if w.shape[1] % FP4_BLOCK:
        raise _check.OpInputError(op, "w", f"a column count divisible by {FP4_BLOCK} (MXFP4 blocks)",
                                  _check.describe(w))
    _check.finite(op, "w", w)
    return dispatch(op)(w)


def dequantize_fp4(packed: torch.Tensor, scale: torch.Tensor,
                   out_dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    """Unpack e2m1 pairs and multiply by the 1x32 ue8m0 scales: `[N, K/2] -> [N, K]`."""
    op = "dequantize_fp4"
    _check_fp4_weight(op, packed, scale)
    _check.choice(op, "out_dtype", out_dtype, OUT_DTYPES)
    _check.scales(op, scale=scale)
    return dispatch(op)(packed, scale, out_dtype)


def fp4_matmul(a: torch.Tensor, b: torch.Tensor, b_scale: torch.Tensor, a_scale: torch.Tensor | None = None,
               out_dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    """`y = A @ dequant_fp4(b).T` for V4's routed experts.

    a: either a float activation `[..., K]` (weight-only quantization) or e4m3 `[..., K]` with
    a_scale `[..., ceil(K/128)]` (FP8 x FP4, as DeepSeek's inference code runs the experts).
    b: packed `[N, K/2]` uint8, b_scale `[N, ceil(K/32)]`. Accumulates in fp32; returns `[..., N]`.
    """
    op = "fp4_matmul"
    _check_fp4_weight(op, b, b_scale)
    if a_scale is None:
        _check.tensor(op, "a", a, dtypes=FLOAT_IN, ndim=range(1, 9))
    else:
        _check.tensor(op, "a", a, dtypes=FP8, ndim=range(1, 9))
        _check.tensor(op, "a_scale", a_scale, dtypes=(torch.float32, torch.float64))
        _check.shape(op, "a_scale", a_scale, scale_shape(tuple(a.shape), ACT_BLOCK), "1x128 blocks of a")
    _check.equal(op, "b", 2 * b.shape[1], a.shape[-1], "K (2 x packed columns of b) = last dim of a")
    _check.choice(op, "out_dtype", out_dtype, OUT_DTYPES)
    _check.same_device(op, a=a, b=b, b_scale=b_scale, a_scale=a_scale)
    _check.scales(op, b_scale=b_scale, a_scale=a_scale)
    return dispatch(op)(a, b, b_scale, a_scale, out_dtype)


def _check_fp4_weight(op: str, packed: torch.Tensor, scale: torch.Tensor) -> None:
    _check.tensor(op, "packed" if op == "dequantize_fp4" else "b", packed, dtypes=(torch.uint8,), ndim=2)
    _check.tensor(op, "scale" if op == "dequantize_fp4" else "b_scale", scale, dtypes=FP4_SCALE_DTYPES)
    n, k = packed.shape[0], 2 * packed.shape[1]
    _check.shape(op, "scale" if op == "dequantize_fp4" else "b_scale", scale,
                 (n, math.ceil(k / FP4_BLOCK)), f"one scale per 1x{FP4_BLOCK} block of a [{n}, {k}] weight")


def quantize_int8(x: torch.Tensor):
    """Symmetric int8 per row of the last dim: returns `(q int8 like x, scale fp32 x.shape[:-1])`,
    scale = max(amax, 1e-8) / 127, q = round(x / scale) (half to even). Per token for activations,
    per output channel for a weight `[N, K]` (msmodelslim's W8A8 layout)."""
    op = "quantize_int8"
    _check.tensor(op, "x", x, dtypes=FLOAT_IN, ndim=range(1, 9))
    _check.finite(op, "x", x)
    return dispatch(op)(x)


def int8_matmul(a: torch.Tensor, a_scale: torch.Tensor, b: torch.Tensor, b_scale: torch.Tensor,
                out_dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    """`y = (a @ b.T) * a_scale[..., None] * b_scale` with exact integer accumulation (int32 sums
    over K pieces of at most `INT32_EXACT_K`, so no K can overflow; the cuda and Ascend float32
    fallbacks round like a float32 epilogue instead).

    a: int8 `[..., K]`, a_scale fp32 `a.shape[:-1]`; b: int8 `[N, K]`, b_scale fp32 `[N]`.
    """
    op = "int8_matmul"
    _check.tensor(op, "a", a, dtypes=(torch.int8,), ndim=range(1, 9))
    _check.tensor(op, "b", b, dtypes=(torch.int8,), ndim=2)
    _check.equal(op, "b", b.shape[1], a.shape[-1], "K (columns of b) = last dim of a")
    _check.tensor(op, "a_scale", a_scale, dtypes=(torch.float32, torch.float64))
    _check.tensor(op, "b_scale", b_scale, dtypes=(torch.float32, torch.float64))
    _check.shape(op, "a_scale", a_scale, tuple(a.shape[:-1]), "one scale per row of a")
    _check.shape(op, "b_scale", b_scale, (b.shape[0],), "one scale per output channel of b")
    _check.choice(op, "out_dtype", out_dtype, OUT_DTYPES)
    _check.same_device(op, a=a, a_scale=a_scale, b=b, b_scale=b_scale)
    _check.scales(op, a_scale=a_scale, b_scale=b_scale)
    return dispatch(op)(a, a_scale, b, b_scale, out_dtype)
