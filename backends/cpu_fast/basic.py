"""Fast CPU RMSNorm and linear: fused PyTorch kernels; quantized linears go through the quant
contracts, so they run on whatever backend each quant op selects (cpu_fast's by default)."""

import torch
import torch.nn.functional as F

from v4hal.backends.cpu import basic as ref
from v4hal.backends.cpu_fast import cast


def rms_norm(x, weight, eps):
    if x.dtype == torch.float64:
        return ref.rms_norm(x, weight, eps)
    # F.rms_norm runs one fused kernel; in float32 it matches the contract's float32 math and
    # its single cast back at the end.
    w = None if weight is None else cast(weight, torch.float32)
    return cast(F.rms_norm(cast(x, torch.float32), (x.shape[-1],), w, eps), x.dtype)


def linear(x, weight, scale, bias, fmt):
    if fmt == "dense":
        return F.linear(x, cast(weight, x.dtype), None if bias is None else cast(bias, x.dtype))
    return ref.linear(x, weight, scale, bias, fmt)
