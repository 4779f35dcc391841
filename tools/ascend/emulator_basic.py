"""Emulated `npu_rms_norm` and the mHC ops (`npu_mhc_pre`, `npu_mhc_sinkhorn`, `npu_mhc_post`).

Sources: the pinned wheel's `_op_plugin_docs.py` entries and Meta kernels of each op. The mHC ops
are documented for the Ascend 950 (A5) only, with n (streams) "usually 4, 6, 8" for pre/post and
"only 4, 6, 8" for sinkhorn.
"""

from __future__ import annotations

import torch

from v4hal.tools.ascend.emulator import FLOATS, HALF, dims_in, dtype_in, f32, op, require, shape_is, unsupported

MHC_CHIPS = ("A5",)
MHC_STREAMS = (4, 6, 8)
SINKHORN_ITERS = range(1, 101)


@op("npu_rms_norm")
def npu_rms_norm(chip, x, gamma, epsilon=1e-6):
    name = "npu_rms_norm"
    dtype_in(name, "self", x, FLOATS)
    require(2 <= x.dim() <= 8, name, f"self must have 2-8 dims, got {x.dim()}")
    require(gamma.dtype == x.dtype, name, f"gamma dtype must equal self's ({x.dtype}), got {gamma.dtype}")
    g = gamma.dim()
    require(tuple(x.shape[-g:]) == tuple(gamma.shape), name,
            f"gamma shape {tuple(gamma.shape)} must be self's trailing dims {tuple(x.shape[-g:])}")
    dims = tuple(range(x.dim() - g, x.dim()))
    rstd = torch.rsqrt(f32(x).pow(2).mean(dims, keepdim=True) + epsilon)
    return (f32(x) * rstd * f32(gamma)).to(x.dtype), rstd


def _streams(name: str, x: torch.Tensor) -> int:
    dtype_in(name, "x", x, HALF)
    dims_in(name, "x", x, (3, 4))
    n = x.shape[-2]
    require(n in MHC_STREAMS, name, f"n (x.shape[-2]) must be one of {MHC_STREAMS}, got {n}")
    return n


@op("npu_mhc_pre", chips=MHC_CHIPS)
def npu_mhc_pre(chip, x, phi, alpha, bias, *, gamma=None, norm_eps=1e-6, hc_eps=1e-6, out_flag=0, inner_precise=0):
    """Parts of phi / bias in the order pre (n), post (n), res (n*n) (the docs' example builds bias
    that way). alpha [3] scales the three parts; alpha [2] (Meta: "3 or 2 elements") computes pre
    and post only, with phi/bias of 2n rows. mix = (x @ phi^T) * invRms; h_pre = sigmoid + hc_eps,
    h_post = 2 * sigmoid, h_res = the logits before Sinkhorn; h_in = sum_i h_pre_i x_i."""
    name = "npu_mhc_pre"
    n = _streams(name, x)
    d = x.shape[-1]
    require(out_flag in (0, 1) and inner_precise in (0, 1), name,
            f"out_flag and inner_precise must be 0 or 1, got {out_flag}, {inner_precise}")
    if out_flag or inner_precise:
        unsupported(name, "out_flag=1 / inner_precise=1 (HF32 cube)")
    for arg, t in (("phi", phi), ("alpha", alpha), ("bias", bias)):
        dtype_in(name, arg, t, (torch.float32,))
    require(alpha.numel() in (2, 3), name, f"alpha must have 3 or 2 elements, got {alpha.numel()}")
    rows = 2 * n + (n * n if alpha.numel() == 3 else 0)
    shape_is(name, "phi", phi, (rows, n * d))
    shape_is(name, "bias", bias, (rows,))
    flat = f32(x).flatten(-2)
    if gamma is not None:
        dtype_in(name, "gamma", gamma, (torch.float32,))
        shape_is(name, "gamma", gamma, (n, d))
        flat = flat * gamma.flatten()
    inv_rms = torch.rsqrt(f32(x).flatten(-2).pow(2).mean(-1) + norm_eps)
    h_mix = flat @ phi.t()
    mix = h_mix * inv_rms.unsqueeze(-1)
    h_pre = torch.sigmoid(alpha[0] * mix[..., :n] + bias[:n]) + hc_eps
    h_post = 2 * torch.sigmoid(alpha[1] * mix[..., n:2 * n] + bias[n:2 * n])
    if alpha.numel() == 3:
        h_res = (alpha[2] * mix[..., 2 * n:] + bias[2 * n:]).unflatten(-1, (n, n))
    else:
        h_res = torch.zeros(1)
    h_in = (h_pre.unsqueeze(-1) * f32(x)).sum(-2).to(x.dtype)
    return h_in, h_post, h_res, inv_rms, h_mix, h_pre


@op("npu_mhc_sinkhorn", chips=MHC_CHIPS)
def npu_mhc_sinkhorn(chip, x, *, eps=1e-6, num_iters=20, out_flag=0):
    """softmax over rows + eps, a column normalisation, then num_iters - 1 (row, column) rounds,
    each dividing by (sum + eps) (the DeepSeek-V4 mHC recipe the op's docs describe in words:
    a doubly stochastic H_res)."""
    name = "npu_mhc_sinkhorn"
    dtype_in(name, "x", x, (torch.float32,))
    dims_in(name, "x", x, (3, 4))
    n = x.shape[-1]
    require(x.shape[-2] == n and n in MHC_STREAMS, name, f"x must end in (n, n) with n in {MHC_STREAMS}, got {tuple(x.shape)}")
    require(num_iters in SINKHORN_ITERS, name, f"num_iters must be in [1, 100], got {num_iters}")
    if out_flag:
        unsupported(name, "out_flag=1 (the backward's norm/sum intermediates)")
    y = torch.softmax(x, -1) + eps
    y = y / (y.sum(-2, keepdim=True) + eps)
    for _ in range(num_iters - 1):
        y = y / (y.sum(-1, keepdim=True) + eps)
        y = y / (y.sum(-2, keepdim=True) + eps)
    return y, torch.zeros(1), torch.zeros(1)


@op("npu_mhc_post", chips=MHC_CHIPS)
def npu_mhc_post(chip, x, h_res, h_out, h_post):
    """x_next[j] = sum_i h_res[i, j] x[i] + h_post[j] * h_out (the docs: (H_res)^T x + h_out (x) H_post)."""
    name = "npu_mhc_post"
    n = _streams(name, x)
    lead = tuple(x.shape[:-2])
    require(h_out.dtype == x.dtype, name, f"h_out dtype must equal x's ({x.dtype}), got {h_out.dtype}")
    shape_is(name, "h_out", h_out, lead + (x.shape[-1],))
    dtype_in(name, "h_post", h_post, (torch.float32,))
    shape_is(name, "h_post", h_post, lead + (n,))
    if h_res is None:
        require(chip == "A5", name, "h_res=None is only supported on Ascend 950")
        mixed = f32(x)
    else:
        dtype_in(name, "h_res", h_res, (torch.float32,))
        shape_is(name, "h_res", h_res, lead + (n, n))
        mixed = h_res.transpose(-1, -2) @ f32(x)
    return (mixed + h_post.unsqueeze(-1) * f32(h_out).unsqueeze(-2)).to(x.dtype)

