"""mHC in MindSpore: the contracts' math written with `mindspore.ops`, converted at the boundary.

Streams are taken to float32 (float64 stays float64) on entry; the collapse and the residual mix
are batched matmuls over the stream axis; Sinkhorn runs on the whole [T, n, n] batch.
"""

import torch

from v4hal.backends.mindspore import mops, ms, to_ms, to_torch


def _cd(x: torch.Tensor):
    return ms().float64 if x.dtype == torch.float64 else ms().float32


def _t(t: torch.Tensor, cd):
    return to_ms(t).astype(cd)


def _sinkhorn(m, iters, eps):
    ops = mops()
    m = ops.softmax(m, -1) + eps
    m = m / (ops.sum(m, -2, keepdim=True) + eps)
    for _ in range(iters - 1):
        m = m / (ops.sum(m, -1, keepdim=True) + eps)
        m = m / (ops.sum(m, -2, keepdim=True) + eps)
    return m


def _mixes(xs, fn, norm_eps):
    """xs: [T, n, D] mindspore -> (flat @ fn^T) * rsqrt(mean(flat^2) + eps): [T, rows]."""
    ops = mops()
    flat = ops.reshape(xs, (xs.shape[0], xs.shape[1] * xs.shape[2]))
    inv_rms = ops.rsqrt(ops.mean(flat * flat, -1, keep_dims=True) + norm_eps)
    return ops.matmul(flat, ops.transpose(fn, (1, 0))) * inv_rms


def _collapse(xs, pre):
    """sum_i pre_i x_i: [T, 1, n] @ [T, n, D]."""
    ops = mops()
    return ops.squeeze(ops.bmm(ops.expand_dims(pre, 1), xs), 1)


def sinkhorn(logits, iters, eps):
    n = logits.shape[-1]
    m = _sinkhorn(_t(logits.reshape(-1, n, n), _cd(logits)), iters, eps)
    return to_torch(m, logits.dtype).reshape(logits.shape).to(logits.device)


def hc_pre(x, fn, scale, base, norm_eps, hc_eps, iters):
    ops = mops()
    cd = _cd(x)
    lead, (n, d) = x.shape[:-2], x.shape[-2:]
    xs = _t(x.reshape(-1, n, d), cd)
    mixes = _mixes(xs, _t(fn, cd), norm_eps)
    s, b = _t(scale, cd), _t(base, cd)
    pre = ops.sigmoid(mixes[:, :n] * s[0] + b[:n]) + hc_eps
    post = ops.sigmoid(mixes[:, n:2 * n] * s[1] + b[n:2 * n]) * 2
    logits = ops.reshape(mixes[:, 2 * n:] * s[2] + b[2 * n:], (xs.shape[0], n, n))
    comb = _sinkhorn(logits, iters, hc_eps)
    mix_dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
    return (to_torch(_collapse(xs, pre), x.dtype).reshape(*lead, d),
            to_torch(post, mix_dtype).reshape(*lead, n), to_torch(comb, mix_dtype).reshape(*lead, n, n))


def hc_post(out, x, post, comb):
    ops = mops()
    cd = _cd(x)
    lead, (n, d) = x.shape[:-2], x.shape[-2:]
    xs = _t(x.reshape(-1, n, d), cd)
    o = _t(out.reshape(-1, 1, d), cd)
    p = _t(post.reshape(-1, n, 1), cd)
    c = _t(comb.reshape(-1, n, n), cd)
    y = ops.bmm(ops.transpose(c, (0, 2, 1)), xs) + p * o
    return to_torch(y, x.dtype).reshape(*lead, n, d)


def hc_head(x, fn, scale, base, norm_eps, hc_eps):
    ops = mops()
    cd = _cd(x)
    lead, (n, d) = x.shape[:-2], x.shape[-2:]
    xs = _t(x.reshape(-1, n, d), cd)
    pre = ops.sigmoid(_mixes(xs, _t(fn, cd), norm_eps) * _t(scale, cd) + _t(base, cd)) + hc_eps
    return to_torch(_collapse(xs, pre), x.dtype).reshape(*lead, d)
