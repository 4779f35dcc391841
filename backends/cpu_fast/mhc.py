"""Fast mHC on CPU: every token at once, no Python loop over tokens.

Where the time goes at V4 sizes is the streams themselves (T x n x D): hc_pre reads them once for
the projection and the RMS factor (the factor is applied to the (2+n)*n mixes instead of the n*D
inputs, and the sum of squares is a fused norm reduction, so no normalised copy is built) and once
more for the weighted collapse. The per-token n x n mixes are applied as n fused multiply-adds
over all tokens (`addcmul_`), not as batched matmuls, which torch runs on CPU as T tiny GEMMs. Sinkhorn runs on the whole batch at
once, laid out `[n, n, T]`, with in-place divisions. The code is device-agnostic torch; the cuda backend reuses it.
"""

import torch


def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def sinkhorn(logits, iters, eps):
    # Token axis last ([n, n, T]): every row/column sum is then a sum of n contiguous
    # T-vectors instead of a strided reduction over tiny n x n blocks, about 100x faster on CPU
    # at T = 2048 (docs/mhc.md).
    n = logits.shape[-1]
    m = torch.softmax(logits.reshape(-1, n, n), -1).add_(eps).permute(1, 2, 0).contiguous()
    m /= m.sum(0, keepdim=True).add_(eps)
    for _ in range(iters - 1):
        m /= m.sum(1, keepdim=True).add_(eps)
        m /= m.sum(0, keepdim=True).add_(eps)
    return m.permute(2, 0, 1).reshape(logits.shape)


def _mixes(xf, fn, norm_eps):
    """(flat @ fn.T) * rsqrt(mean(flat**2) + eps), flat = xf viewed as [T, n*D]."""
    flat = xf.flatten(-2)
    inv_rms = torch.rsqrt(torch.linalg.vector_norm(flat, dim=-1, keepdim=True).square_()
                          .div_(flat.shape[-1]).add_(norm_eps))
    return (flat @ fn.to(xf.dtype).T).mul_(inv_rms)


def _collapse(x, pre, dtype):
    """sum_i pre_i x_i as n fused multiply-adds over [T, D] (a batched [1 x n] @ [n x D] product
    runs as T tiny GEMMs on CPU, one parallel region each)."""
    acc = pre[..., 0:1] * x[..., 0, :]
    for i in range(1, x.shape[-2]):
        acc.addcmul_(pre[..., i:i + 1], x[..., i, :])
    return acc.to(dtype)


def hc_pre_logits(x, fn, scale, base, norm_eps, hc_eps):
    """hc_pre up to the Sinkhorn: (layer_input, post, comb logits), the split `npu_mhc_pre` makes."""
    n = x.shape[-2]
    cd = _compute_dtype(x)
    xf = x.to(cd)
    mixes = _mixes(xf, fn, norm_eps)
    scale, base = scale.to(cd), base.to(cd)
    pre = torch.sigmoid(mixes[..., :n] * scale[0] + base[:n]).add_(hc_eps)
    post = torch.sigmoid(mixes[..., n:2 * n] * scale[1] + base[n:2 * n]).mul_(2)
    logits = (mixes[..., 2 * n:] * scale[2] + base[2 * n:]).unflatten(-1, (n, n))
    return _collapse(xf, pre, x.dtype), post, logits


def hc_pre(x, fn, scale, base, norm_eps, hc_eps, iters):
    layer_input, post, logits = hc_pre_logits(x, fn, scale, base, norm_eps, hc_eps)
    return layer_input, post, sinkhorn(logits, iters, hc_eps)


def hc_post(out, x, post, comb):
    cd = _compute_dtype(x)
    mixed = post.to(cd).unsqueeze(-1) * out.unsqueeze(-2)
    comb = comb.to(cd)
    for i in range(x.shape[-2]):  # new_j += comb[i, j] * x_i, for all j at once
        mixed.addcmul_(comb[..., i, :].unsqueeze(-1), x[..., i, :].unsqueeze(-2))
    return mixed.to(x.dtype)


def hc_head(x, fn, scale, base, norm_eps, hc_eps):
    cd = _compute_dtype(x)
    xf = x.to(cd)
    pre = torch.sigmoid(_mixes(xf, fn, norm_eps) * scale.to(cd) + base.to(cd)).add_(hc_eps)
    return _collapse(xf, pre, x.dtype)
