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
        if scale.dtype not in quant.FP8_STORED_SCALE_DTYPES:  # uint8 exponent bytes would read as 0-255
            raise _check.OpInputError("dequantize_weight", "scale", " or ".join(map(str, quant.FP8_STORED_SCALE_DTYPES)),
                                      _check.describe(scale))
        return quant.dequantize_fp8(weight, scale.float(), out_dtype=out_dtype)
    if fmt == "fp4":
        return quant.dequantize_fp4(weight, scale, out_dtype=out_dtype)
    if fmt == "int8":
        cd = torch.float64 if out_dtype == torch.float64 else torch.float32
        return (weight.to(cd) * scale.to(cd).reshape(-1, 1)).to(out_dtype)
    return weight.to(out_dtype)


def check_linear_weight(op: str, arg: str, weight: torch.Tensor, scale: torch.Tensor | None,
                        k: int) -> tuple[str, int]:
    """(format, N) of a `linear` weight meeting activations with `k` features, after checking it
    and its scale's shape (not its values). The scale's argument is `scale` for `weight`, else
    `<arg>_scale`."""
    scale_arg = "scale" if arg == "weight" else f"{arg}_scale"
    fmt = weight_format(_check.tensor(op, arg, weight, ndim=2), scale)
    if fmt == "?":
        raise _check.OpInputError(op, arg, "dtype float, float8_e4m3fn, uint8 (fp4) or int8", _check.describe(weight))
    n, wk = weight.shape[0], weight.shape[1] * (2 if fmt == "fp4" else 1)
    _check.equal(op, arg, wk, k, "K (input features) = last dim of x")
    expected_scale = {"dense": None, "fp8": (math.ceil(n / WEIGHT_BLOCK[0]), math.ceil(k / WEIGHT_BLOCK[1])),
                      "fp4": (n, math.ceil(k / FP4_BLOCK)), "int8": (n,)}[fmt]
    if expected_scale is None and scale is not None:
        raise _check.OpInputError(op, scale_arg, "None for a float weight", _check.describe(scale))
    if expected_scale is not None:
        if scale is None:
            raise _check.OpInputError(op, scale_arg, f"a scale tensor of shape {expected_scale} for a {fmt} weight",
                                      "None")
        _check.tensor(op, scale_arg, scale)
        _check.shape(op, scale_arg, scale, expected_scale, f"{fmt} weight [{n}, {k}]")
    return fmt, n


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
    fmt, n = check_linear_weight(op, "weight", weight, scale, x.shape[-1])
    if bias is not None:
        _check.tensor(op, "bias", bias, dtypes=FLOAT_IN, ndim=1)
        _check.equal(op, "bias", bias.shape[0], n, "length = output features")
    # The activation quantizers refuse NaN/Inf, so formats that quantize x check it here, with the
    # scales, in one host read (the composite below runs the quantizer unchecked).
    _check.Values(op).finite("x", x if fmt in ("fp8", "int8") else None).scales(scale=scale).decide()
    return dispatch(op)(x, weight, scale, bias, fmt, act_scale_fmt)


def composed_linear(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None,
                    fmt: str, act_scale_fmt: str) -> torch.Tensor:
    """The quantized formats of `linear` composed from the quant family's primitives, each run on
    the backend the registry picks for it (so `V4HAL_OP_BACKENDS=fp8_matmul=cpu` reaches inside).
    Unchecked: for backends whose `linear` has no fused kernel for `fmt`, after `linear` validated.
    fp8: quantize_fp8 (1x128 blocks) + fp8_matmul; fp4: fp4_matmul on float activations; int8:
    quantize_int8 (per token) + int8_matmul. Output in x's dtype, bias added last."""
    if fmt == "fp8":
        a, a_scale = dispatch("quantize_fp8")(x, quant.ACT_BLOCK, act_scale_fmt)
        y = dispatch("fp8_matmul")(a, a_scale, weight, scale, x.dtype)
    elif fmt == "fp4":
        y = dispatch("fp4_matmul")(x, weight, scale, None, x.dtype)
    else:
        a, a_scale = dispatch("quantize_int8")(x)
        y = dispatch("int8_matmul")(a, a_scale, weight, scale.float(), x.dtype)
    return y if bias is None else y + bias.to(y.dtype)
