"""Fast CPU RMSNorm and linear: fused PyTorch kernels; quantized linears are the contract's
composite (`composed_linear`), so each quant primitive runs on the backend it selects (cpu_fast's
by default).

Float32 products avoid `F.linear`, which runs MKL: on the AMD EPYC this project measures on,
MKL's SGEMM reaches about half of oneDNN's rate (a 512-row GEMM 1536x512: 7.3 ms vs 3.3 ms on one
thread) and its matrix-vector product reads the weight at ~15 GB/s on one thread and no faster
on two (docs/model.md, "Speed on this CPU"). `dense_linear` picks per call:
  - one row (decode), weight up to GEMV_ELEMENTS: multiply by the broadcast row and sum each
    weight row (ATen's vectorised kernels, parallel over threads; the product stays cache-sized);
    under torch.compile any one-row product, which inductor turns into one fused reduction;
  - otherwise oneDNN's linear when this torch build has it (probed once, at the first such call);
  - F.linear where neither applies (other dtypes, autograd, tracing for ONNX, several rows
    under torch.compile, where inductor picks the GEMM).
"""

import torch
import torch.nn.functional as F
from torch.compiler import is_compiling

from v4hal.backends import registry
from v4hal.backends.cpu_fast import cast, eager_on_cpu
from v4hal.ops.basic import composed_linear

ref = registry.parent_family(__name__)

GEMV_ELEMENTS = 1 << 20  # 4 MiB of float32 weight: its elementwise product fits the L2 + L3 share


def _probe_onednn():
    """oneDNN's linear (`mkldnn::_linear_pointwise`) if this build has it and it agrees with
    F.linear on a small product; None otherwise."""
    try:
        op = torch.ops.mkldnn._linear_pointwise
        x = torch.randn(3, 8, generator=torch.Generator().manual_seed(0), device="cpu", dtype=torch.float32)
        ok = torch.equal(op(x, torch.eye(5, 8, device="cpu", dtype=torch.float32), None, "none", [], ""), x[:, :5])
    except (AttributeError, RuntimeError):
        return None
    return op if ok else None


_UNPROBED = object()
_ONEDNN = _UNPROBED


def _onednn():
    """The probed oneDNN linear or None, probed at the first eager product rather than at import:
    the registry imports this module at an op's first dispatch, which may be inside a
    torch.jit.trace (the ONNX exporter), whose graph would record the probe's ops and break."""
    global _ONEDNN
    if _ONEDNN is _UNPROBED:
        _ONEDNN = _probe_onednn()
    return _ONEDNN


def dense_linear(x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """`x @ w.T (+ bias)` for float weights already in x's dtype."""
    compiled = is_compiling()
    fast = (x.dtype == torch.float32 and w.dtype == torch.float32 and w.dim() == 2 and x.dim() >= 2
            and (eager_on_cpu(x) or compiled and x.device.type == "cpu") and w.device.type == "cpu"
            and not (torch.is_grad_enabled() and (x.requires_grad or w.requires_grad)))
    if not fast:
        return F.linear(x, w, bias)
    # One row as multiply-and-sum: eager, ATen's kernels stream the weight faster than MKL's GEMV
    # (up to a 4 MiB product buffer); compiled, inductor fuses it into one reduction over the
    # weight (no buffer), which also beats the MKL call inductor would make for a matmul.
    if x.numel() == x.shape[-1] and (compiled or w.numel() <= GEMV_ELEMENTS):
        y = (w * x.reshape(1, -1)).sum(-1).view(*x.shape[:-1], w.shape[0])
        return y if bias is None else y + bias
    onednn = None if compiled or not x.numel() else _onednn()
    if onednn is not None:
        return onednn(x, w.contiguous(), bias, "none", [], "")
    return F.linear(x, w, bias)


def kernel() -> str:
    """What float32 products run on, for `v4hal info`."""
    return "oneDNN + ATen GEMV" if _onednn() is not None else "torch (MKL) + ATen GEMV"


def rms_norm(x, weight, eps):
    if x.dtype == torch.float64:
        return ref.rms_norm(x, weight, eps)
    # F.rms_norm runs one fused kernel; in float32 it matches the contract's float32 math and
    # its single cast back at the end.
    w = None if weight is None else cast(weight, torch.float32)
    return cast(F.rms_norm(cast(x, torch.float32), (x.shape[-1],), w, eps), x.dtype)


def linear(x, weight, scale, bias, fmt, act_scale_fmt):
    if fmt == "dense":
        return dense_linear(x, cast(weight, x.dtype), None if bias is None else cast(bias, x.dtype))
    return composed_linear(x, weight, scale, bias, fmt, act_scale_fmt)
