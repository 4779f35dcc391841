"""Triton kernels that attend over, and score against, an FP8 KV cache (ops/kv_cache.py) by reading
its bytes: the e4m3 NoPE codes, their scales (ue8m0 or float32 powers of two) and the BF16 RoPE
values of only the rows each query selects, dequantized in registers. Imports triton, so only
`backends/cuda/kv_cache.py` loads it, lazily, and only for arguments the contracts have validated.

A row is found from its slot (`block * block_size + offset`) by the layout's byte geometry
(`geometry`): the NoPE codes at `block * block_stride + offset * row_stride`, the RoPE bytes
`rope_at` further, the scales at `scale_base + offset * scale_stride` inside the block. The codes
are decoded by integer arithmetic (sign, exponent, mantissa: exact, NaN for 0x7F / 0xFF as e4m3fn),
the same on every GPU (the hardware FP8 conversion exists from sm89 only) and in the interpreter.

sparse_attention_fp8kv: the structure of `triton_attention._sparse_attention` (one program per
query and block of heads, index list in blocks of BLOCK_K, online softmax, split-K slices merged by
`combine_splits`, the sink at the end), except that each block of rows is dequantized once, whole
(NoPE tiles times their scales, then RoPE), and serves both the logits and the values. A slot
past the cache's end (reachable only with V4HAL_CHECKS=shapes) counts as -1, so no byte outside
the cache is read.

indexer_scores_fp8kv: one program per (batch row, block of queries, block of keys); the keys are
dequantized once and scored against every index head, `acc += w_h * relu(q_h . k)`.
"""

import torch
import triton
import triton.language as tl

from v4hal.backends.cuda.triton_attention import SIZES, SplitRun, _block, dot, dot_precision, softmax_finish, softmax_step

SIZES = SIZES + ["n_slots", "block_size", "block_stride", "scale_base", "n_keys"]
E4M3_SUBNORMAL = tl.constexpr(2.0 ** -9)  # the value of mantissa step 1 at exponent field 0


def geometry(lay, cache: torch.Tensor) -> dict:
    """Byte offsets of a token's parts (see the module doc) for the kernels' arguments."""
    bs = cache.shape[1]
    row_stride = lay.row_bytes if lay.split else lay.token_bytes
    if lay.split:  # every token's row, then every token's scale record
        scale_base, scale_stride, rope_at = bs * lay.row_bytes, lay.scale_record, lay.nope
    else:  # one record per token: NoPE, scales, RoPE
        scale_base, scale_stride, rope_at = lay.nope, lay.token_bytes, lay.nope + lay.scale_record
    return dict(block_size=bs, block_stride=cache.stride(0), scale_base=scale_base,
                ROW_STRIDE=row_stride, SCALE_STRIDE=scale_stride, ROPE_AT=rope_at, NOPE=lay.nope,
                TILE=lay.tile, TILES=lay.tiles, TILES_PAD=triton.next_power_of_2(lay.tiles),
                SCALE_BYTES=lay.scale_bytes, ROPE=lay.rope, ROPE_PAD=max(triton.next_power_of_2(lay.rope), 1))


@triton.jit
def _e4m3(code):
    """float32 values of e4m3fn bytes (int32)."""
    exp = (code >> 3) & 15
    mant = code & 7
    normal = (((exp + 120) << 23) | (mant << 20)).to(tl.float32, bitcast=True)
    value = tl.where(exp == 0, mant.to(tl.float32) * E4M3_SUBNORMAL, normal)
    value = tl.where((code & 0x7F) == 0x7F, float("nan"), value)
    return tl.where(code >= 128, -value, value)


@triton.jit
def _bytes_le(ptr, mask, N: tl.constexpr):
    """The little-endian int32 of N bytes at `ptr` (N = 1, 2 or 4)."""
    word = tl.load(ptr, mask=mask, other=0).to(tl.int32)
    for i in tl.static_range(1, N):
        word |= tl.load(ptr + i, mask=mask, other=0).to(tl.int32) << (8 * i)
    return word


@triton.jit
def _rows(cache, rows, picked, block_size, block_stride, scale_base, ROW_STRIDE: tl.constexpr,
          SCALE_STRIDE: tl.constexpr, ROPE_AT: tl.constexpr, NOPE: tl.constexpr, TILE: tl.constexpr,
          TILES: tl.constexpr, TILES_PAD: tl.constexpr, SCALE_BYTES: tl.constexpr, ROPE: tl.constexpr,
          ROPE_PAD: tl.constexpr):
    """Dequantized rows at slots `rows` `[R]` (int64; rows not `picked` read as zeros, never
    loaded): NoPE `[R, TILES_PAD * TILE]` float32 (padding columns 0) and RoPE `[R, ROPE_PAD]`."""
    block = rows // block_size
    offset = rows % block_size
    base = cache + block * block_stride
    cols = tl.arange(0, TILES_PAD * TILE)
    codes = tl.load(base[:, None] + offset[:, None] * ROW_STRIDE + cols[None, :],
                    mask=picked[:, None] & (cols < NOPE)[None, :], other=0).to(tl.int32)
    tiles = tl.arange(0, TILES_PAD)
    at = base[:, None] + scale_base + offset[:, None] * SCALE_STRIDE + tiles[None, :] * SCALE_BYTES
    s_ok = picked[:, None] & (tiles < TILES)[None, :]
    if SCALE_BYTES == 1:  # ue8m0: the float32 whose exponent field is the byte (0 reads as 0)
        scales = (_bytes_le(at, s_ok, 1) << 23).to(tl.float32, bitcast=True)
    else:  # float32, little-endian
        scales = _bytes_le(at, s_ok, 4).to(tl.float32, bitcast=True)
    per_col = tl.reshape(tl.broadcast_to(scales[:, :, None], (rows.shape[0], TILES_PAD, TILE)),
                         (rows.shape[0], TILES_PAD * TILE))
    nope = _e4m3(codes) * per_col
    rs = tl.arange(0, ROPE_PAD)
    rope_bits = _bytes_le(base[:, None] + offset[:, None] * ROW_STRIDE + ROPE_AT + 2 * rs[None, :],
                          picked[:, None] & (rs < ROPE)[None, :], 2)
    rope = (rope_bits << 16).to(tl.float32, bitcast=True)  # BF16 is the top half of a float32
    return nope, rope


@triton.jit(do_not_specialize=SIZES)
def _sparse_attention_fp8kv(q, cache, idx, sink, out, lse, part_acc, part_m, part_l, n_slots, block_size,
                            block_stride, scale_base, heads, n_idx, per_split, v_dim, scale,
                            sq_b, sq_s, sq_h, sq_d, si_b, si_s, si_k, so_b, so_s, so_h, so_d, sl_b, sl_s, sl_h, seq,
                            ROW_STRIDE: tl.constexpr, SCALE_STRIDE: tl.constexpr, ROPE_AT: tl.constexpr,
                            NOPE: tl.constexpr, TILE: tl.constexpr, TILES: tl.constexpr, TILES_PAD: tl.constexpr,
                            SCALE_BYTES: tl.constexpr, ROPE: tl.constexpr, ROPE_PAD: tl.constexpr,
                            SPLIT: tl.constexpr, HAS_SINK: tl.constexpr, PRECISION: tl.constexpr,
                            BLOCK_H: tl.constexpr, BLOCK_K: tl.constexpr):
    query, split = tl.program_id(0), tl.program_id(2)
    bi, si = query // seq, query % seq
    hs = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    h_ok = hs < heads
    ns = tl.arange(0, TILES_PAD * TILE)
    rs = tl.arange(0, ROPE_PAD)
    q_row = q + bi * sq_b + si * sq_s + hs[:, None] * sq_h
    q_nope = tl.load(q_row + ns[None, :] * sq_d, mask=h_ok[:, None] & (ns < NOPE)[None, :], other=0.0)
    q_rope = tl.load(q_row + (NOPE + rs[None, :]) * sq_d, mask=h_ok[:, None] & (rs < ROPE)[None, :], other=0.0)
    m_run = tl.full((BLOCK_H,), float("-inf"), tl.float32)
    l_run = tl.zeros((BLOCK_H,), tl.float32)
    acc_nope = tl.zeros((BLOCK_H, TILES_PAD * TILE), tl.float32)
    acc_rope = tl.zeros((BLOCK_H, ROPE_PAD), tl.float32)
    lo = split * per_split
    hi = tl.minimum(lo + per_split, n_idx)
    for k0 in range(lo, hi, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        rows = tl.load(idx + bi * si_b + si * si_s + ks * si_k, mask=ks < hi, other=-1).to(tl.int64)
        picked = (rows >= 0) & (rows < n_slots)
        rows = tl.where(picked, rows, 0)
        nope, rope = _rows(cache, rows, picked, block_size, block_stride, scale_base, ROW_STRIDE, SCALE_STRIDE,
                           ROPE_AT, NOPE, TILE, TILES, TILES_PAD, SCALE_BYTES, ROPE, ROPE_PAD)
        logits = dot(q_nope, tl.trans(nope), PRECISION)
        if ROPE > 0:
            logits += dot(q_rope, tl.trans(rope), PRECISION)
        p, alpha, m_run, l_run = softmax_step(logits, picked, scale, m_run, l_run)
        acc_nope = acc_nope * alpha[:, None] + dot(p, nope, PRECISION)
        if ROPE > 0:
            acc_rope = acc_rope * alpha[:, None] + dot(p, rope, PRECISION)
    # Output column c < NOPE is NoPE column c, column NOPE + r is RoPE column r; v_dim cuts both.
    n_out = h_ok[:, None] & (ns < NOPE)[None, :] & (ns < v_dim)[None, :]
    r_out = h_ok[:, None] & (rs < ROPE)[None, :] & ((NOPE + rs) < v_dim)[None, :]
    if SPLIT:  # this slice's running state; combine_splits adds the sink and normalises
        part = (query * tl.num_programs(2) + split) * heads + hs
        tl.store(part_acc + part[:, None] * v_dim + ns[None, :], acc_nope, mask=n_out)
        tl.store(part_acc + part[:, None] * v_dim + NOPE + rs[None, :], acc_rope, mask=r_out)
        tl.store(part_m + part, m_run, mask=h_ok)
        tl.store(part_l + part, l_run, mask=h_ok)
    else:
        factor, row_lse = softmax_finish(m_run, l_run, sink, hs, h_ok, HAS_SINK)
        o_row = out + bi * so_b + si * so_s + hs[:, None] * so_h
        tl.store(o_row + ns[None, :] * so_d, (acc_nope * factor[:, None]).to(out.dtype.element_ty), mask=n_out)
        tl.store(o_row + (NOPE + rs[None, :]) * so_d, (acc_rope * factor[:, None]).to(out.dtype.element_ty),
                 mask=r_out)
        tl.store(lse + bi * sl_b + si * sl_s + hs * sl_h, row_lse, mask=h_ok)


def in_domain(q, sink) -> bool:
    """float64 stays on the torch path (the reference's precision)."""
    return q.dtype != torch.float64 and (sink is None or sink.dtype != torch.float64)


def sparse_attention_fp8kv(q, cache, slots, scale, lay, sink, v_dim, block_h=16, block_k=16, splits=None):
    """out `[B, S, H, v_dim]` in q's dtype and lse `[B, S, H]` float32, as the contract; `slots`
    `[B, S, K]` (-1 = none). `splits` slices each index list (None: `split_count`)."""
    run = SplitRun(q, slots.shape[-1], v_dim, block_h, block_k, splits)
    if run.empty:
        return run.out, run.lse
    geo = geometry(lay, cache)
    _sparse_attention_fp8kv[run.grid](
        q, cache.view(torch.uint8), slots, sink if sink is not None else q, run.out, run.lse, *run.parts,
        cache.shape[0] * cache.shape[1], geo.pop("block_size"), geo.pop("block_stride"), geo.pop("scale_base"),
        run.heads, run.n_idx, run.per_split, v_dim, float(scale), *q.stride(), *slots.stride(), *run.out.stride(),
        *run.lse.stride(), q.shape[1], **geo, SPLIT=run.splits > 1, HAS_SINK=sink is not None,
        PRECISION=dot_precision(q), BLOCK_H=_block(run.heads, block_h), BLOCK_K=block_k)
    return run.finish(sink)


@triton.jit(do_not_specialize=SIZES)
def _indexer_scores_fp8kv(q, cache, slots, w, out, n_slots, block_size, block_stride, scale_base, seq, n_keys,
                          heads, scale, sq_b, sq_s, sq_h, sq_d, ss_b, ss_t, sw_b, sw_s, sw_h, so_b, so_s, so_t,
                          ROW_STRIDE: tl.constexpr, SCALE_STRIDE: tl.constexpr, ROPE_AT: tl.constexpr,
                          NOPE: tl.constexpr, TILE: tl.constexpr, TILES: tl.constexpr, TILES_PAD: tl.constexpr,
                          SCALE_BYTES: tl.constexpr, ROPE: tl.constexpr, ROPE_PAD: tl.constexpr,
                          PRECISION: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_T: tl.constexpr):
    bi = tl.program_id(0)
    ss = tl.program_id(1) * BLOCK_S + tl.arange(0, BLOCK_S)
    ts = tl.program_id(2) * BLOCK_T + tl.arange(0, BLOCK_T)
    s_ok, t_ok = ss < seq, ts < n_keys
    rows = tl.load(slots + bi * ss_b + ts * ss_t, mask=t_ok, other=-1).to(tl.int64)
    picked = (rows >= 0) & (rows < n_slots)
    rows = tl.where(picked, rows, 0)
    nope, rope = _rows(cache, rows, picked, block_size, block_stride, scale_base, ROW_STRIDE, SCALE_STRIDE,
                       ROPE_AT, NOPE, TILE, TILES, TILES_PAD, SCALE_BYTES, ROPE, ROPE_PAD)
    ns = tl.arange(0, TILES_PAD * TILE)
    rs = tl.arange(0, ROPE_PAD)
    acc = tl.zeros((BLOCK_S, BLOCK_T), tl.float32)
    for hi in range(0, heads):
        q_row = q + bi * sq_b + ss[:, None] * sq_s + hi * sq_h
        q_nope = tl.load(q_row + ns[None, :] * sq_d, mask=s_ok[:, None] & (ns < NOPE)[None, :], other=0.0)
        dots = dot(q_nope, tl.trans(nope), PRECISION)
        if ROPE > 0:
            q_rope = tl.load(q_row + (NOPE + rs[None, :]) * sq_d, mask=s_ok[:, None] & (rs < ROPE)[None, :],
                             other=0.0)
            dots += dot(q_rope, tl.trans(rope), PRECISION)
        w_h = tl.load(w + bi * sw_b + ss * sw_s + hi * sw_h, mask=s_ok, other=0.0).to(tl.float32)
        acc += w_h[:, None] * tl.maximum(dots, 0.0)
    tl.store(out + bi * so_b + ss[:, None] * so_s + ts[None, :] * so_t, acc * scale,
             mask=s_ok[:, None] & t_ok[None, :])


def indexer_in_domain(q, weights) -> bool:
    return torch.float64 not in (q.dtype, weights.dtype)


def indexer_scores_fp8kv(q, cache, slots, weights, scale, lay, block_s=16, block_t=32):
    """`[B, S, T]` float32 scores of q against the keys at `slots` `[B, T]`, as the contract."""
    b, s, h, _ = q.shape
    t = slots.shape[1]
    out = torch.empty(b, s, t, dtype=torch.float32, device=q.device)
    if out.numel() == 0:
        return out
    geo = geometry(lay, cache)
    grid = (b, triton.cdiv(s, block_s), triton.cdiv(t, block_t))
    _indexer_scores_fp8kv[grid](q, cache.view(torch.uint8), slots, weights, out, cache.shape[0] * cache.shape[1],
                                geo.pop("block_size"), geo.pop("block_stride"), geo.pop("scale_base"), s, t, h,
                                float(scale), *q.stride(), *slots.stride(), *weights.stride(), *out.stride(),
                                **geo, PRECISION=dot_precision(q), BLOCK_S=block_s, BLOCK_T=block_t)
    return out
