"""Fast mHC on CPU: batched over tokens, no Python loop per token.

At V4 sizes the time is memory traffic over the streams (T x n x D). Everything mHC does to a
token depends on that token alone, so the streams are processed in blocks of `CPU_BLOCK` tokens:
a block is widened to float32 once and, while it is in cache, projected (the RMS factor is
applied to the (2+n)*n mixes, not to the n*D inputs, so no normalised copy is built) and
collapsed; hc_post likewise builds each block's new streams in cache. The per-token n x n mixes
are n fused multiply-adds (`addcmul_`) over a block, not batched matmuls (torch runs those on CPU
as one tiny GEMM per token). Sinkhorn runs on all tokens at once, laid out `[n, n, T]`.

The code is device-agnostic torch: on a GPU or NPU (cuda inherits it; ascend runs it where its
fused kernels do not apply) all tokens go in one pass, as with `block=None`: a device pays per
kernel launch, not per cache miss.
"""

import math

import torch

from v4hal.backends.cpu_fast import cast, eager_on_cpu

CPU_BLOCK = 64  # tokens per block: 64 x 4 x 4096 float32 = 4 MiB, cache-resident on a server CPU


def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def _blocks(xs: torch.Tensor, block: int | None):
    """Slices of `block` tokens over xs's first dim; one slice when block is None or off the CPU."""
    tokens = xs.shape[0]
    step = tokens if block is None or xs.device.type != "cpu" else block
    return [slice(s, min(s + step, tokens)) for s in range(0, tokens, max(step, 1))]


SCALAR_TOKENS = 4  # at most this many matrices (decode) take the scalar path


def _few(t):
    """Decode-sized input (`[..., a, b]` per token, a few tokens, on the CPU). Its mixes are a few
    dozen numbers per token, and the ~40 tensor ops of a Sinkhorn (plus ~30 around it) cost a few
    microseconds each; on Python floats (double precision, rounded once) the same math costs
    about a fifth of that (docs/model.md, decode)."""
    return eager_on_cpu(t) and t.numel() <= SCALAR_TOKENS * t.shape[-1] * t.shape[-2]


def _sinkhorn_rows(logits, iters, eps):
    """One n x n matrix given as Python rows -> the Sinkhorn projection, as Python rows."""
    m = []
    for r in logits:
        top = max(r)
        e = [math.exp(v - top) for v in r]
        total = sum(e)
        m.append([v / total + eps for v in e])
    n = len(m)
    for it in range(2 * iters - 1):
        if it % 2:
            for r in m:
                total = sum(r) + eps
                r[:] = [v / total for v in r]
        else:
            for j in range(n):
                total = sum(r[j] for r in m) + eps
                for r in m:
                    r[j] /= total
    return m


def _sigmoid(v):
    return 1.0 / (1.0 + math.exp(-v)) if v >= 0 else math.exp(v) / (1.0 + math.exp(v))


def _mixes_few(x, fn):
    """(streams as [T, n, D] in the compute dtype, per-token mixes as Python lists)."""
    cd = _compute_dtype(x)
    n, d = x.shape[-2:]
    xf = x.reshape(-1, n, d)
    xf = cast(xf, cd)
    flat = xf.reshape(xf.shape[0], n * d)  # a copy only for streams that are not contiguous
    raw = torch.mm(flat, cast(fn, cd).T).tolist()
    norms = torch.linalg.vector_norm(flat, dim=-1).tolist()
    return xf, raw, norms


def _pre_few(x, fn, scale, base, norm_eps, hc_eps):
    """The projection for a few tokens: (streams [T, n, D], pre [T][n], mixes [T][rows of fn],
    scale and base as lists)."""
    n, d = x.shape[-2:]
    xf, raw, norms = _mixes_few(x, fn)
    s, b = scale.tolist(), base.tolist()
    mixes, pres = [], []
    for row, norm in zip(raw, norms):
        inv = 1.0 / math.sqrt(norm * norm / (n * d) + norm_eps)
        m = [v * inv for v in row]
        mixes.append(m)
        pres.append([_sigmoid(m[i] * s[0] + b[i]) + hc_eps for i in range(n)])
    return xf, pres, mixes, s, b


def _collapse_few(x, xf, pres):
    pre = torch.tensor(pres, dtype=xf.dtype).unsqueeze(1)
    return cast(torch.bmm(pre, xf).reshape(*x.shape[:-2], x.shape[-1]), x.dtype)


def _hc_pre_few(x, fn, scale, base, norm_eps, hc_eps, iters):
    n = x.shape[-2]
    xf, pres, mixes, s, b = _pre_few(x, fn, scale, base, norm_eps, hc_eps)
    posts, combs = [], []
    for m in mixes:
        posts.append([2.0 * _sigmoid(m[n + i] * s[1] + b[n + i]) for i in range(n)])
        logits = [[m[2 * n + i * n + j] * s[2] + b[2 * n + i * n + j] for j in range(n)] for i in range(n)]
        combs.append(_sinkhorn_rows(logits, iters, hc_eps))
    lead = x.shape[:-2]
    return (_collapse_few(x, xf, pres), torch.tensor(posts, dtype=xf.dtype).reshape(*lead, n),
            torch.tensor(combs, dtype=xf.dtype).reshape(*lead, n, n))


def _sinkhorn_few(logits, iters, eps):
    n = logits.shape[-1]
    out = [_sinkhorn_rows(m, iters, eps) for m in logits.reshape(-1, n, n).tolist()]
    return torch.tensor(out, dtype=logits.dtype).reshape(logits.shape)


def sinkhorn(logits, iters, eps):
    if _few(logits):
        return _sinkhorn_few(logits, iters, eps)
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


def _collapse(xf, pre):
    """sum_i pre_i x_i over one block, as n fused multiply-adds."""
    acc = pre[:, 0:1] * xf[:, 0]
    for i in range(1, xf.shape[1]):
        acc.addcmul_(pre[:, i:i + 1], xf[:, i])
    return acc


def _project(x, fn, scale, base, norm_eps, hc_eps, block):
    """Per token: mixes = (flat @ fn.T) * rsqrt(mean(flat**2) + eps) and the collapse with
    pre = sigmoid(mixes[:n] * scale[0] + base[:n]) + hc_eps. Returns (layer_input, mixes)."""
    cd = _compute_dtype(x)
    n, d = x.shape[-2:]
    xs = x.reshape(-1, n, d)
    fn_t = fn.to(cd).T
    scale, base = scale.to(cd), base.to(cd)
    mixes = torch.empty(xs.shape[0], fn.shape[0], dtype=cd, device=x.device)
    layer_input = torch.empty(xs.shape[0], d, dtype=x.dtype, device=x.device)
    for b in _blocks(xs, block):
        xf = xs[b].to(cd)
        flat = xf.reshape(xf.shape[0], n * d)  # a copy only for streams that are not contiguous
        inv_rms = torch.rsqrt(torch.linalg.vector_norm(flat, dim=-1, keepdim=True).square_()
                              .div_(n * d).add_(norm_eps))
        m = torch.mm(flat, fn_t).mul_(inv_rms)
        mixes[b] = m
        pre = torch.sigmoid(m[:, :n] * scale[0] + base[:n]).add_(hc_eps)
        layer_input[b] = _collapse(xf, pre)
    return layer_input.reshape(*x.shape[:-2], d), mixes.reshape(*x.shape[:-2], fn.shape[0])


def hc_pre_logits(x, fn, scale, base, norm_eps, hc_eps, block=CPU_BLOCK):
    """hc_pre up to the Sinkhorn: (layer_input, post, comb logits), the split `npu_mhc_pre` makes."""
    n = x.shape[-2]
    layer_input, mixes = _project(x, fn, scale, base, norm_eps, hc_eps, block)
    cd = mixes.dtype
    scale, base = scale.to(cd), base.to(cd)
    post = torch.sigmoid(mixes[..., n:2 * n] * scale[1] + base[n:2 * n]).mul_(2)
    logits = (mixes[..., 2 * n:] * scale[2] + base[2 * n:]).unflatten(-1, (n, n))
    return layer_input, post, logits


def hc_pre(x, fn, scale, base, norm_eps, hc_eps, iters, block=CPU_BLOCK):
    if block is not None and _few(x):
        return _hc_pre_few(x, fn, scale, base, norm_eps, hc_eps, iters)
    layer_input, post, logits = hc_pre_logits(x, fn, scale, base, norm_eps, hc_eps, block)
    return layer_input, post, sinkhorn(logits, iters, hc_eps)


def hc_post(out, x, post, comb, block=CPU_BLOCK):
    cd = _compute_dtype(x)
    n, d = x.shape[-2:]
    if block is not None and _few(x):  # one small batched GEMM: new = post * out + comb^T x
        xs = x.reshape(-1, n, d)
        mixed = cast(post.reshape(-1, n, 1), cd) * cast(out.reshape(-1, 1, d), cd)
        new = torch.baddbmm(mixed, cast(comb.reshape(-1, n, n), cd).transpose(1, 2), cast(xs, cd))
        return cast(new, x.dtype).reshape(x.shape)
    xs, outs = x.reshape(-1, n, d), out.reshape(-1, 1, d)
    posts, combs = post.to(cd).reshape(-1, n, 1), comb.to(cd).reshape(-1, n, n)
    new = torch.empty_like(xs)
    for b in _blocks(xs, block):
        xf = xs[b].to(cd)
        mixed = posts[b] * outs[b].to(cd)
        for i in range(n):  # new_j += comb[i, j] * x_i, for every j at once
            mixed.addcmul_(combs[b, i].unsqueeze(-1), xf[:, i:i + 1])
        new[b] = mixed
    return new.reshape(x.shape)


def hc_head(x, fn, scale, base, norm_eps, hc_eps, block=CPU_BLOCK):
    if block is not None and _few(x):
        xf, pres, _, _, _ = _pre_few(x, fn, scale, base, norm_eps, hc_eps)
        return _collapse_few(x, xf, pres)
    return _project(x, fn, scale, base, norm_eps, hc_eps, block)[0]
