"""RMSNorm and linear in MindSpore (float32 math; float64 inputs stay float64). Quantized linears
go through the quant contracts, i.e. this backend's own FP8 / MXFP4 / int8 implementations."""

import torch

from v4hal.backends import registry
from v4hal.backends.mindspore import mops, to_ms, to_torch

composite = registry.parent_family(__name__)


def _compute(t: torch.Tensor):
    return to_ms(t if t.dtype == torch.float64 else t.float())


def rms_norm(x, weight, eps):
    o = mops()
    xs = _compute(x)
    y = xs * o.rsqrt((xs * xs).mean(axis=-1, keep_dims=True) + eps)
    if weight is not None:
        y = y * _compute(weight).astype(xs.dtype)
    return to_torch(y, x.dtype)


def linear(x, weight, scale, bias, fmt, act_scale_fmt):
    if fmt != "dense":
        return composite.linear(x, weight, scale, bias, fmt, act_scale_fmt)
    xs = _compute(x)
    y = mops().matmul(xs, _compute(weight).astype(xs.dtype).T)
    if bias is not None:
        y = y + _compute(bias).astype(xs.dtype)
    return to_torch(y, x.dtype)
