"""Triton kernel for mHC's `hc_pre` after its one GEMM: the RMS factor, the pre / post sigmoids,
the comb Sinkhorn (all `iters` normalisations) and the collapse `sum_i pre_i x_i`, in one launch
instead of some fifty small torch kernels per sub-layer (what a decode step pays, twice a layer).
Imports triton, so only `backends/cuda/mhc.py` loads it, lazily, for arguments `ops.mhc.hc_pre`
has validated.

One program per token: it reads the token's n streams twice (the sum of squares, then the
collapse, D in chunks), and keeps the n x n comb in registers through the Sinkhorn. n need not be
a power of two: the streams are padded to NP with masked loads, the padding held at 0 through
every normalisation. Runs in Triton's interpreter (`TRITON_INTERPRET=1`) on CPU tensors, which is
how the tests check it against the float64 reference.
"""

import torch
import triton
import triton.language as tl


@triton.jit(do_not_specialize=["n", "d", "iters"])  # sizes: one compile serves all
def _hc_pre(x, mixes, scale, base, layer_in, post, comb, n, d, norm_eps, hc_eps, iters,
            sx_t, sx_n, sx_d, sm_t, sl_t, sp_t, sc_t,
            NP: tl.constexpr, BLOCK_D: tl.constexpr):
    t = tl.program_id(0)
    i = tl.arange(0, NP)
    j = tl.arange(0, NP)
    i_ok, j_ok = i < n, j < n
    x_tok = x + t * sx_t
    squares = tl.zeros((NP, BLOCK_D), tl.float32)
    for d0 in range(0, d, BLOCK_D):
        ds = d0 + tl.arange(0, BLOCK_D)
        xs = tl.load(x_tok + i[:, None] * sx_n + ds[None, :] * sx_d, mask=i_ok[:, None] & (ds < d)[None, :],
                     other=0.0).to(tl.float32)
        squares += xs * xs
    inv_rms = 1.0 / tl.sqrt(tl.sum(tl.sum(squares, 1), 0) / (n * d) + norm_eps)
    m_tok = mixes + t * sm_t
    s_pre, s_post, s_comb = tl.load(scale), tl.load(scale + 1), tl.load(scale + 2)
    pre = tl.sigmoid(tl.load(m_tok + i, mask=i_ok, other=0.0) * inv_rms * s_pre
                     + tl.load(base + i, mask=i_ok, other=0.0)) + hc_eps
    post_w = 2.0 * tl.sigmoid(tl.load(m_tok + n + i, mask=i_ok, other=0.0) * inv_rms * s_post
                              + tl.load(base + n + i, mask=i_ok, other=0.0))
    tl.store(post + t * sp_t + i, post_w, mask=i_ok)
    cell = 2 * n + i[:, None] * n + j[None, :]
    inside = i_ok[:, None] & j_ok[None, :]
    logits = tl.load(m_tok + cell, mask=inside, other=0.0) * inv_rms * s_comb + tl.load(base + cell, mask=inside, other=0.0)
    logits = tl.where(inside, logits, float("-inf"))
    # Sinkhorn: row softmax + eps, a column normalisation, then iters - 1 (row, column) ones.
    row_max = tl.where(i_ok, tl.max(logits, 1), 0.0)  # padding rows are all -inf: keep them NaN-free
    e = tl.exp(logits - row_max[:, None])
    m = tl.where(inside, e / tl.where(i_ok, tl.sum(e, 1), 1.0)[:, None] + hc_eps, 0.0)
    m = m / (tl.sum(m, 0)[None, :] + hc_eps)
    for _ in range(1, iters):
        m = m / (tl.sum(m, 1)[:, None] + hc_eps)
        m = m / (tl.sum(m, 0)[None, :] + hc_eps)
    tl.store(comb + t * sc_t + i[:, None] * n + j[None, :], m, mask=inside)
    for d0 in range(0, d, BLOCK_D):
        ds = d0 + tl.arange(0, BLOCK_D)
        d_ok = ds < d
        xs = tl.load(x_tok + i[:, None] * sx_n + ds[None, :] * sx_d, mask=i_ok[:, None] & d_ok[None, :],
                     other=0.0).to(tl.float32)
        tl.store(layer_in + t * sl_t + ds, tl.sum(pre[:, None] * xs, 0).to(layer_in.dtype.element_ty), mask=d_ok)


def in_domain(x) -> bool:
    return x.dtype != torch.float64  # float64 stays on the torch path, in float64


def hc_pre(x, fn, scale, base, norm_eps, hc_eps, iters, block_d=256):
    """`(layer_input [..., D] in x.dtype, post [..., n], comb [..., n, n])` float32, as the contract."""
    n, d = x.shape[-2:]
    lead = x.shape[:-2]
    xs = x.reshape(-1, n, d)
    tokens = xs.shape[0]
    mixes = torch.matmul(xs.reshape(tokens, n * d).float(), fn.float().T)  # [T, (2+n)n], unnormalised
    layer_in = torch.empty(tokens, d, dtype=x.dtype, device=x.device)
    post = torch.empty(tokens, n, dtype=torch.float32, device=x.device)
    comb = torch.empty(tokens, n, n, dtype=torch.float32, device=x.device)
    if tokens:
        _hc_pre[(tokens,)](xs, mixes, scale.float().contiguous(), base.float().contiguous(), layer_in, post, comb,
                           n, d, float(norm_eps), float(hc_eps), int(iters), *xs.stride(), mixes.stride(0),
                           layer_in.stride(0), post.stride(0), comb.stride(0),
                           NP=max(2, triton.next_power_of_2(n)), BLOCK_D=min(block_d, triton.next_power_of_2(d)))
    return layer_in.view(*lead, d), post.view(*lead, n), comb.view(*lead, n, n)
