"""Reference RMSNorm and linear: straight from the formulas. Quantized weights take the contract's
composite (`v4hal.ops.basic.composed_linear`: each quant primitive on its own backend)."""

import torch

from v4hal.ops.basic import composed_linear


def rms_norm(x, weight, eps):
    cd = torch.float64 if x.dtype == torch.float64 else torch.float32
    xf = x.to(cd)
    y = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    if weight is not None:
        y = weight.to(cd) * y
    return y.to(x.dtype)


def linear(x, weight, scale, bias, fmt, act_scale_fmt):
    if fmt != "dense":
        return composed_linear(x, weight, scale, bias, fmt, act_scale_fmt)
    y = x @ weight.to(x.dtype).T
    return y if bias is None else y + bias.to(y.dtype)
