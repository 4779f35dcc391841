"""Triton kernels for the sparse-attention family: attention over each query's selected KV rows
(sink, log-sum-exp, -1 = no entry) and the lightning-indexer scores. Imports triton, so only
`backends/cuda/attention.py` loads it, lazily, and only for arguments the contracts in
`ops.attention` have already validated.

sparse_attention: one program per (query, block of heads). It walks the query's index list in
blocks of BLOCK_K, gathers those rows of kv (never a row outside the list: -1 slots and the ragged
tail are masked loads), scores them against its heads in D-chunks of BLOCK_D (V3.2's 576-wide
head needs no power-of-two padding of the whole row), and keeps an online softmax (running max,
running denominator, rescaled fp32 accumulator of the first v_dim channels). The sink enters the
denominator once at the end. Decode (S = 1) and prefill (S > 1) are the same kernel: the queries
are independent. A decode step has too few (query, head block) programs to fill a GPU, so there
each index list is cut into slices (split-K, as flash-decoding does): each slice's program stores
its running max, denominator and accumulator, and `combine_splits` merges them (and adds the sink)
in torch. An index >= N (possible only with V4HAL_CHECKS=shapes, which skips the range
check) is treated as -1, so the kernel never reads outside kv.

indexer_scores: one program per (batch row, block of queries, block of entries); it loops over
the index heads, `acc += w_h * relu(q_h . k)`, so the per-head [S, H, T] products are never
stored.

Both run in Triton's interpreter (`TRITON_INTERPRET=1`) on CPU tensors, which is how the tests
check them against the float64 reference.
"""

import torch
import triton
import triton.language as tl

MIN_DOT = 16  # tl.dot wants every tile dimension >= 16
# Size arguments Triton should not specialise on (== 1, divisible by 16): each value would be
# another JIT compile, seconds each, and the masks make them irrelevant to the code.
SIZES = ["n_rows", "heads", "n_idx", "per_split", "d", "v_dim", "seq", "n_keys"]
SIXTEEN_BIT = (torch.bfloat16, torch.float16)


def dot_precision(*tensors) -> str:
    """How tl.dot multiplies (fp32 sums either way): 16-bit inputs are exact in TF32 (bf16's 7 and
    fp16's 10 mantissa bits fit in TF32's 10), so tensor cores lose nothing; fp32 inputs need IEEE
    products. The tiles go in as fp32 rather than as bf16 because Triton's interpreter multiplies
    bf16 tiles wrongly (3.9: it reads their bits as integers), and the tests run this source there."""
    return "tf32" if all(t.dtype in SIXTEEN_BIT for t in tensors) else "ieee"


@triton.jit
def dot(a, b, PRECISION: tl.constexpr):
    return tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision=PRECISION)


@triton.jit
def softmax_step(logits, picked, scale, m_run, l_run):
    """One block of raw logits `[H, K]` (columns not `picked` masked out) into the online softmax:
    returns the probabilities relative to the new running max, the factor that rescales what was
    accumulated so far, and the new running max and denominator."""
    logits = tl.where(picked[None, :], logits * scale, float("-inf"))
    m_new = tl.maximum(m_run, tl.max(logits, 1))
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # nothing picked yet: exp(-inf) = 0
    p = tl.exp(logits - m_safe[:, None])
    alpha = tl.exp(m_run - m_safe)
    return p, alpha, m_new, l_run * alpha + tl.sum(p, 1)


@triton.jit
def softmax_finish(m_run, l_run, sink, hs, h_ok, HAS_SINK: tl.constexpr):
    """The end of a one-pass row: adds the sink to the denominator and returns the factor the
    accumulator is multiplied by to give the output, and the LSE (-inf for an empty row without
    sink, whose output is 0)."""
    alpha = tl.full(m_run.shape, 1.0, tl.float32)
    if HAS_SINK:
        s_h = tl.load(sink + hs, mask=h_ok, other=0.0).to(tl.float32)
        m_fin = tl.maximum(m_run, s_h)
        alpha = tl.exp(m_run - m_fin)
        l_run = l_run * alpha + tl.exp(s_h - m_fin)
        m_run = m_fin
    m_safe = tl.where(m_run == float("-inf"), 0.0, m_run)
    filled = l_run > 0
    l_safe = tl.where(filled, l_run, 1.0)
    return alpha / l_safe, tl.where(filled, tl.log(l_safe) + m_safe, float("-inf"))


@triton.jit(do_not_specialize=SIZES)
def _sparse_attention(q, kv, idx, sink, out, lse, part_acc, part_m, part_l, n_rows, heads, n_idx, per_split, d,
                      v_dim, scale, sq_b, sq_s, sq_h, sq_d, skv_b, skv_n, skv_d, si_b, si_s, si_k,
                      so_b, so_s, so_h, so_d, sl_b, sl_s, sl_h, seq,
                      SPLIT: tl.constexpr, HAS_SINK: tl.constexpr, PRECISION: tl.constexpr, BLOCK_H: tl.constexpr,
                      BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_V: tl.constexpr):
    query, split = tl.program_id(0), tl.program_id(2)
    bi, si = query // seq, query % seq
    hs = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    h_ok = hs < heads
    vs = tl.arange(0, BLOCK_V)
    v_ok = vs < v_dim
    q_row = q + bi * sq_b + si * sq_s
    kv_batch = kv + bi * skv_b
    m_run = tl.full((BLOCK_H,), float("-inf"), tl.float32)
    l_run = tl.zeros((BLOCK_H,), tl.float32)
    acc = tl.zeros((BLOCK_H, BLOCK_V), tl.float32)
    lo = split * per_split
    hi = tl.minimum(lo + per_split, n_idx)
    for k0 in range(lo, hi, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        rows = tl.load(idx + bi * si_b + si * si_s + ks * si_k, mask=ks < hi, other=-1).to(tl.int64)
        picked = (rows >= 0) & (rows < n_rows)
        rows = tl.where(picked, rows, 0)
        logits = tl.zeros((BLOCK_H, BLOCK_K), tl.float32)
        for d0 in range(0, d, BLOCK_D):
            ds = d0 + tl.arange(0, BLOCK_D)
            d_ok = ds < d
            q_c = tl.load(q_row + hs[:, None] * sq_h + ds[None, :] * sq_d, mask=h_ok[:, None] & d_ok[None, :], other=0.0)
            k_c = tl.load(kv_batch + rows[:, None] * skv_n + ds[None, :] * skv_d,
                          mask=picked[:, None] & d_ok[None, :], other=0.0)
            logits += dot(q_c, tl.trans(k_c), PRECISION)
        p, alpha, m_run, l_run = softmax_step(logits, picked, scale, m_run, l_run)
        values = tl.load(kv_batch + rows[:, None] * skv_n + vs[None, :] * skv_d,
                         mask=picked[:, None] & v_ok[None, :], other=0.0)
        acc = acc * alpha[:, None] + dot(p, values, PRECISION)
    if SPLIT:  # this slice's running state; combine_splits adds the sink and normalises
        part = (query * tl.num_programs(2) + split) * heads + hs
        tl.store(part_acc + part[:, None] * v_dim + vs[None, :], acc, mask=h_ok[:, None] & v_ok[None, :])
        tl.store(part_m + part, m_run, mask=h_ok)
        tl.store(part_l + part, l_run, mask=h_ok)
    else:
        factor, row_lse = softmax_finish(m_run, l_run, sink, hs, h_ok, HAS_SINK)
        tl.store(out + bi * so_b + si * so_s + hs[:, None] * so_h + vs[None, :] * so_d,
                 (acc * factor[:, None]).to(out.dtype.element_ty), mask=h_ok[:, None] & v_ok[None, :])
        tl.store(lse + bi * sl_b + si * sl_s + hs * sl_h, row_lse, mask=h_ok)


def _block(n: int, cap: int) -> int:
    return max(MIN_DOT, min(cap, triton.next_power_of_2(n)))


def sparse_attention_in_domain(q, kv, sink) -> bool:
    """float64 stays on the torch path (the reference's precision); Triton takes the 16-bit and
    fp32 inputs the model runs."""
    return q.dtype != torch.float64 and kv.dtype != torch.float64 and (sink is None or sink.dtype != torch.float64)


def split_count(programs: int, n_idx: int, block_k: int, device: torch.device) -> int:
    """Slices of each index list, so that a decode step (one query: B x H/16 programs) still fills
    the GPU: about two programs per SM, each slice at least one block of indices."""
    if device.type != "cuda":
        return 1
    target = 2 * torch.cuda.get_device_properties(device).multi_processor_count
    return max(1, min(triton.cdiv(target, programs), triton.cdiv(n_idx, block_k)))


def combine_splits(acc, m, l, sink):
    """Merge the slices' states (acc `[Q, P, H, V]`, m and l `[Q, P, H]`, each relative to its own
    running max m) into the output and LSE, adding the sink: the same algebra as the kernel's end."""
    top = m.amax(1)
    if sink is not None:
        top = torch.maximum(top, sink.float())
    top = torch.where(torch.isneginf(top), 0.0, top)
    weight = torch.exp(m - top.unsqueeze(1))
    denom = (l * weight).sum(1)
    if sink is not None:
        denom = denom + torch.exp(sink.float() - top)
    out = (acc * weight.unsqueeze(-1)).sum(1) / torch.where(denom > 0, denom, 1.0).unsqueeze(-1)
    return out, torch.log(denom) + top  # log(0) = -inf: an empty row without sink


class SplitRun:
    """The outputs and split bookkeeping of one sparse-attention launch over `[B, S, H, *]` queries
    with `n_idx` indices each: `grid` is (queries, head blocks, slices); with more than one slice
    the kernel leaves per-slice states in `parts` and `finish` merges them (`combine_splits`)."""

    def __init__(self, q, n_idx: int, v_dim: int, block_h: int, block_k: int, splits: int | None):
        b, s, self.heads, _ = q.shape
        self.n_idx, self.shape = n_idx, (b, s, self.heads, v_dim)
        self.out = torch.empty(self.shape, dtype=q.dtype, device=q.device)
        self.lse = torch.empty(b, s, self.heads, dtype=torch.float32, device=q.device)
        self.empty = b * s == 0
        head_blocks = triton.cdiv(self.heads, block_h)
        if splits is None:
            splits = split_count(b * s * head_blocks, n_idx, block_k, q.device)
        self.per_split = triton.cdiv(triton.cdiv(max(n_idx, 1), splits), block_k) * block_k
        self.splits = max(1, triton.cdiv(n_idx, self.per_split))
        self.grid = (b * s, head_blocks, self.splits)
        f32 = dict(dtype=torch.float32, device=q.device)
        self.parts = ((torch.empty(b * s, self.splits, self.heads, v_dim, **f32),
                       torch.empty(b * s, self.splits, self.heads, **f32),
                       torch.empty(b * s, self.splits, self.heads, **f32)) if self.splits > 1
                      else (self.lse, self.lse, self.lse))

    def finish(self, sink):
        if self.splits > 1:
            merged, merged_lse = combine_splits(*self.parts, sink)
            self.out.copy_(merged.view(self.shape))
            self.lse.copy_(merged_lse.view(self.shape[:-1]))
        return self.out, self.lse


def sparse_attention(q, kv, indices, scale, sink, v_dim, block_h=16, block_k=32, block_d=64, splits=None):
    """out `[B, S, H, v_dim]` in q's dtype and lse `[B, S, H]` float32, as the contract. `splits`
    slices each index list (None: `split_count`); the slices are merged by `combine_splits`."""
    d = q.shape[-1]
    run = SplitRun(q, indices.shape[-1], v_dim, block_h, block_k, splits)
    if run.empty:
        return run.out, run.lse
    _sparse_attention[run.grid](
        q, kv, indices, sink if sink is not None else q, run.out, run.lse, *run.parts,
        kv.shape[1], run.heads, run.n_idx, run.per_split, d, v_dim, float(scale),
        *q.stride(), *kv.stride(), *indices.stride(), *run.out.stride(), *run.lse.stride(), q.shape[1],
        SPLIT=run.splits > 1, HAS_SINK=sink is not None, PRECISION=dot_precision(q, kv),
        BLOCK_H=_block(run.heads, block_h), BLOCK_K=block_k, BLOCK_D=_block(d, block_d), BLOCK_V=_block(v_dim, 1 << 30))
    return run.finish(sink)


@triton.jit(do_not_specialize=SIZES)
def _indexer_scores(q, k, w, out, seq, n_keys, heads, d, scale,
                    sq_b, sq_s, sq_h, sq_d, sk_b, sk_t, sk_d, sw_b, sw_s, sw_h, so_b, so_s, so_t,
                    PRECISION: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr):
    bi = tl.program_id(0)
    ss = tl.program_id(1) * BLOCK_S + tl.arange(0, BLOCK_S)
    ts = tl.program_id(2) * BLOCK_T + tl.arange(0, BLOCK_T)
    s_ok, t_ok = ss < seq, ts < n_keys
    acc = tl.zeros((BLOCK_S, BLOCK_T), tl.float32)
    for hi in range(0, heads):
        dots = tl.zeros((BLOCK_S, BLOCK_T), tl.float32)
        for d0 in range(0, d, BLOCK_D):
            ds = d0 + tl.arange(0, BLOCK_D)
            d_ok = ds < d
            q_c = tl.load(q + bi * sq_b + ss[:, None] * sq_s + hi * sq_h + ds[None, :] * sq_d,
                          mask=s_ok[:, None] & d_ok[None, :], other=0.0)
            k_c = tl.load(k + bi * sk_b + ts[:, None] * sk_t + ds[None, :] * sk_d,
                          mask=t_ok[:, None] & d_ok[None, :], other=0.0)
            dots += dot(q_c, tl.trans(k_c), PRECISION)
        w_h = tl.load(w + bi * sw_b + ss * sw_s + hi * sw_h, mask=s_ok, other=0.0).to(tl.float32)
        acc += w_h[:, None] * tl.maximum(dots, 0.0)
    tl.store(out + bi * so_b + ss[:, None] * so_s + ts[None, :] * so_t, acc * scale,
             mask=s_ok[:, None] & t_ok[None, :])


def indexer_scores_in_domain(q, k, weights) -> bool:
    return torch.float64 not in (q.dtype, k.dtype, weights.dtype)


def indexer_scores(q, k, weights, scale, block_s=16, block_t=64, block_d=128):
    """`[B, S, T]` float32 scores, as the contract."""
    b, s, h, d = q.shape
    t = k.shape[1]
    out = torch.empty(b, s, t, dtype=torch.float32, device=q.device)
    if out.numel() == 0:
        return out
    grid = (b, triton.cdiv(s, block_s), triton.cdiv(t, block_t))
    _indexer_scores[grid](q, k, weights, out, s, t, h, d, float(scale),
                          *q.stride(), *k.stride(), *weights.stride(), *out.stride(),
                          PRECISION=dot_precision(q, k), BLOCK_S=block_s, BLOCK_T=block_t, BLOCK_D=_block(d, block_d))
    return out
