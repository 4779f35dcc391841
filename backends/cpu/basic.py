"""Reference RMSNorm and linear: straight from the formulas, quantized formats through the quant
contracts (so each sub-op follows its own backend selection)."""

import torch

from v4hal.ops import quant


def rms_norm(x, weight, eps):
    cd = torch.float64 if x.dtype == torch.float64 else torch.float32
    xf = x.to(cd)
    y = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    if weight is not None:
        y = weight.to(cd) * y
    return y.to(x.dtype)


def linear(x, weight, scale, bias, fmt, act_scale_fmt):
    if fmt == "dense":
        y = x @ weight.to(x.dtype).T
    elif fmt == "fp8":
        a, a_scale = quant.quantize_fp8(x, quant.ACT_BLOCK, act_scale_fmt)
        y = quant.fp8_matmul(a, a_scale, weight, scale, out_dtype=x.dtype)
    elif fmt == "fp4":
        y = quant.fp4_matmul(x, weight, scale, out_dtype=x.dtype)
    else:
        a, a_scale = quant.quantize_int8(x)
        y = quant.int8_matmul(a, a_scale, weight, scale.float(), out_dtype=x.dtype)
    return y if bias is None else y + bias.to(y.dtype)
