"""Dense building blocks every layer uses: RMSNorm and the (possibly quantized) linear layer."""

from __future__ import annotations

import math

import torch

from v4hal.backends.registry import dispatch, register_op
from v4hal.ops import _check, quant
from v4hal.ops.quant import FP4_BLOCK, FLOAT_IN, WEIGHT_BLOCK

__all__ = ["rms_norm", "linear", "weight_format", "dequantize_weight"]

FAMILY = "basic"
for _op in ("rms_norm", "linear"):
    register_op(_op, FAMILY)


def rms_norm(x: torch.Tensor, weight: torch.Tensor | None = None, eps: float = 1e-6) -> torch.Tensor:
    """`x * rsqrt(mean(x**2, -1) + eps) * weight`, computed in float32 (float64 if x is), cast
    back to x's dtype once at the end. weight: `[D]` or None (unweighted, as V4's q/kv norms in
    the indexer). x: `[..., D]`."""
    op = "rms_norm"
    _check.tensor(op, "x", x, dtypes=FLOAT_IN, ndim=range(1, 9))
    if weight is not None:
        _check.tensor(op, "weight", weight, dtypes=FLOAT_IN, ndim=1)
        _check.equal(op, "weight", weight.shape[0], x.shape[-1], "length = last dim of x")
    if not (isinstance(eps, float) and eps > 0):
        raise _check.OpInputError(op, "eps", "a positive float", repr(eps))
    return dispatch(op)(x, weight, eps)


def weight_format(weight: torch.Tensor, scale: torch.Tensor | None) -> str:
    """'dense' (float weight), 'fp8' (e4m3 + 128x128 block scales), 'fp4' (packed MXFP4 + 1x32
    ue8m0 scales) or 'int8' (W8A8: int8 + one scale per output channel)."""
    if weight.dtype in FLOAT_IN:
        return "dense"
    return {torch.float8_e4m3fn: "fp8", torch.uint8: "fp4", torch.int8: "int8"}.get(weight.dtype, "?")


def dequantize_weight(weight: torch.Tensor, scale: torch.Tensor | None, out_dtype: torch.dtype) -> torch.Tensor:
    """A `linear` weight of any format as a float `[N, K]` matrix in out_dtype: FP8 and FP4 through
    their dequantize contracts, int8 as `q * scale[n]`, a float weight cast. For code that needs
    the matrix itself (absorbed MLA) and for loading into float slots."""
    fmt = weight_format(weight, scale)
    if fmt == "fp8":
        return quant.dequantize_fp8(weight, scale.float(), out_dtype=out_dtype)
    if fmt == "fp4":
        return quant.dequantize_fp4(weight, scale, out_dtype=out_dtype)
    if fmt == "int8":
        cd = torch.float64 if out_dtype == torch.float64 else torch.float32
        return (weight.to(cd) * scale.to(cd).reshape(-1, 1)).to(out_dtype)
    return weight.to(out_dtype)


def linear(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor | None = None,
           bias: torch.Tensor | None = None, act_scale_fmt: str = "fp32") -> torch.Tensor:
    """`y = x @ W.T (+ bias)` for every weight format a DeepSeek checkpoint ships.

    weight `[N, K]` (fp4: `[N, K/2]` packed), format chosen by dtype (see `weight_format`):
    dense -> plain GEMM in x's dtype; fp8 -> activations quantized per 1x128 block then
    `fp8_matmul` (DeepSeek's act_quant + fp8_gemm); fp4 -> `fp4_matmul` with float activations;
    int8 -> activations quantized per token then `int8_matmul`. Returns `[..., N]` in x's dtype.
    act_scale_fmt: the FP8 activation scales, "fp32" or "ue8m0" (rounded up to powers of two, as
    DeepSeek's inference does for checkpoints whose config says `scale_fmt: ue8m0`); other
    formats take no activation scales and ignore it.
    """
    op = "linear"
    _check.tensor(op, "x", x, dtypes=FLOAT_IN, ndim=range(1, 9))
    _check.choice(op, "act_scale_fmt", act_scale_fmt, quant.SCALE_FMTS)
    fmt = weight_format(_check.tensor(op, "weight", weight, ndim=2), scale)
    if fmt == "?":
        raise _check.OpInputError(op, "weight", "dtype float, float8_e4m3fn, uint8 (fp4) or int8", _check.describe(weight))
    n, k = weight.shape[0], weight.shape[1] * (2 if fmt == "fp4" else 1)
    _check.equal(op, "weight", k, x.shape[-1], "K (input features) = last dim of x")
    expected_scale = {"dense": None, "fp8": (math.ceil(n / WEIGHT_BLOCK[0]), math.ceil(k / WEIGHT_BLOCK[1])),
                      "fp4": (n, math.ceil(k / FP4_BLOCK)), "int8": (n,)}[fmt]
    if expected_scale is None and scale is not None:
        raise _check.OpInputError(op, "scale", "None for a float weight", _check.describe(scale))
    if expected_scale is not None:
        if scale is None:
            raise _check.OpInputError(op, "scale", f"a scale tensor of shape {expected_scale} for a {fmt} weight", "None")
        _check.tensor(op, "scale", scale)
        _check.shape(op, "scale", scale, expected_scale, f"{fmt} weight [{n}, {k}]")
        _check.scales(op, scale=scale)
    if bias is not None:
        _check.tensor(op, "bias", bias, dtypes=FLOAT_IN, ndim=1)
        _check.equal(op, "bias", bias.shape[0], n, "length = output features")
    return dispatch(op)(x, weight, scale, bias, fmt, act_scale_fmt)
