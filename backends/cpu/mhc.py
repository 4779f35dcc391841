"""Reference mHC: the formulas of `v4hal.ops.mhc` one step at a time, Sinkhorn one matrix at a
time. float32 math (float64 when given float64), cast to the stream dtype once at the end."""

import torch


def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def _normalized_flat(x, norm_eps):
    cd = _compute_dtype(x)
    flat = x.flatten(-2).to(cd)
    return flat * torch.rsqrt(flat.pow(2).mean(-1, keepdim=True) + norm_eps)


def _collapse(x, pre):
    """sum_i pre_i * x_i over the stream axis, in pre's precision."""
    return (pre.unsqueeze(-1) * x.to(pre.dtype)).sum(-2).to(x.dtype)


def _sinkhorn_one(m, iters, eps):
    m = torch.softmax(m, -1) + eps
    m = m / (m.sum(0, keepdim=True) + eps)
    for _ in range(iters - 1):
        m = m / (m.sum(1, keepdim=True) + eps)
        m = m / (m.sum(0, keepdim=True) + eps)
    return m


def sinkhorn(logits, iters, eps):
    n = logits.shape[-1]
    flat = logits.reshape(-1, n, n)
    out = torch.stack([_sinkhorn_one(m, iters, eps) for m in flat])
    return out.reshape(logits.shape)


def hc_pre(x, fn, scale, base, norm_eps, hc_eps, iters):
    n = x.shape[-2]
    cd = _compute_dtype(x)
    mixes = _normalized_flat(x, norm_eps) @ fn.to(cd).T
    scale, base = scale.to(cd), base.to(cd)
    pre_w, post_w, comb_w = mixes.split([n, n, n * n], -1)
    pre_b, post_b, comb_b = base.split([n, n, n * n])
    pre = torch.sigmoid(pre_w * scale[0] + pre_b) + hc_eps
    post = 2 * torch.sigmoid(post_w * scale[1] + post_b)
    comb_logits = (comb_w * scale[2] + comb_b).unflatten(-1, (n, n))
    comb = sinkhorn(comb_logits, iters, hc_eps)
    return _collapse(x, pre), post, comb


def hc_post(out, x, post, comb):
    cd = _compute_dtype(x)
    n = x.shape[-2]
    xs = x.to(cd)
    expanded = post.to(cd).unsqueeze(-1) * out.to(cd).unsqueeze(-2)
    residual = torch.zeros_like(xs)
    for i in range(n):
        for j in range(n):
            residual[..., j, :] += comb[..., i, j].to(cd).unsqueeze(-1) * xs[..., i, :]
    return (expanded + residual).to(x.dtype)


def hc_head(x, fn, scale, base, norm_eps, hc_eps):
    cd = _compute_dtype(x)
    mixes = _normalized_flat(x, norm_eps) @ fn.to(cd).T
    pre = torch.sigmoid(mixes * scale.to(cd) + base.to(cd)) + hc_eps
    return _collapse(x, pre)
