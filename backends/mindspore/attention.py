"""Sparse attention in MindSpore: the contracts' math with `mindspore.ops`, converted at the
boundary. Computes in float32 (float64 stays float64). Attention gathers the selected rows per
batch row (`ops.gather`) and runs batched matmuls over queries; the indexer masks invisible
entries with -inf before `ops.topk`."""

import numpy as np
import torch

from v4hal.backends.mindspore import keep_nan, mops, ms, to_ms, to_torch


def _cd(x: torch.Tensor):
    return ms().float64 if x.dtype == torch.float64 else ms().float32


def _t(t: torch.Tensor, cd):
    return to_ms(t).astype(cd)


def apply_rope(x, cos, sin, interleaved):
    ops, cd = mops(), _cd(x)
    xs = _t(x, cd)
    half = x.shape[-1] // 2
    c = ops.broadcast_to(_t(cos, cd), tuple(x.shape[:-1]) + (half,))
    s = ops.broadcast_to(_t(sin, cd), tuple(x.shape[:-1]) + (half,))
    if interleaved:
        pairs = ops.reshape(xs, tuple(x.shape[:-1]) + (half, 2))
        a, b = pairs[..., 0], pairs[..., 1]
        out = ops.reshape(ops.stack([a * c - b * s, b * c + a * s], -1), tuple(x.shape))
    else:
        a, b = xs[..., :half], xs[..., half:]
        out = ops.cat([a * c - b * s, b * c + a * s], -1)
    return to_torch(out, x.dtype)


def layer_norm(x, weight, bias, eps):
    ops, cd = mops(), _cd(x)
    xs = _t(x, cd)
    centred = xs - ops.mean(xs, -1, keep_dims=True)
    y = centred * ops.rsqrt(ops.mean(centred * centred, -1, keep_dims=True) + eps) * _t(weight, cd)
    if bias is not None:
        y = y + _t(bias, cd)
    return to_torch(y, x.dtype)


def kv_compress(kv, gate, position_bias, norm_weight, ratio, overlap, eps, prev_kv, prev_gate):
    ops, cd = mops(), _cd(kv)
    b, length, c = kv.shape
    w = length // ratio
    kvw = ops.reshape(_t(kv, cd), (b, w, ratio, c))
    gw = ops.reshape(_t(gate, cd), (b, w, ratio, c)) + _t(position_bias, cd)
    if overlap:
        d = c // 2
        first_kv = _t(prev_kv, cd) if prev_kv is not None else ops.zeros((b, ratio, d), cd)
        first_g = _t(prev_gate, cd) if prev_gate is not None else ops.full((b, ratio, d), float("-inf"), dtype=cd)
        # Series a of window w-1 (the first window takes the carried one), series b of window w.
        a_kv = ops.cat([ops.expand_dims(first_kv, 1), kvw[:, :-1, :, :d]], 1)
        a_g = ops.cat([ops.expand_dims(first_g, 1), gw[:, :-1, :, :d]], 1)
        kvw = ops.cat([a_kv, kvw[..., d:]], 2)
        gw = ops.cat([a_g, gw[..., d:]], 2)
    pooled = ops.sum(ops.softmax(gw, 2) * kvw, 2)
    normed = pooled * ops.rsqrt(ops.mean(pooled * pooled, -1, keep_dims=True) + eps) * _t(norm_weight, cd)
    return to_torch(normed, kv.dtype)


def _scores(q, k, weights, scale, cd):
    ops = mops()
    b, s, h, d = q.shape
    qs = ops.reshape(_t(q, cd), (b, s * h, d))
    dots = ops.bmm(qs, ops.transpose(_t(k, cd), (0, 2, 1)))  # [B, S*H, T]
    dots = keep_nan(ops.relu(dots), dots)
    dots = ops.reshape(dots, (b, s, h, -1))
    return ops.sum(dots * ops.expand_dims(_t(weights, cd), -1), 2) * scale


def indexer_scores(q, k, weights, scale):
    cd = _cd(q)
    return to_torch(_scores(q, k, weights, scale, cd), torch.float64 if cd == ms().float64 else torch.float32)


def _topk(scores_ms, k, positions, ratio):
    ops = mops()
    b, s, t = scores_ms.shape
    if positions is None:
        return to_torch(ops.topk(scores_ms, k, -1, True, True)[1]).to(torch.int32)
    limit = ops.expand_dims(ms().Tensor(((positions.long() + 1) // ratio).numpy().astype(np.int64)), -1)
    entries = ms().Tensor(np.arange(t, dtype=np.int64)).reshape((1, 1, t))
    masked = ops.where(entries < limit, scores_ms, ops.full_like(scores_ms, float("-inf")))
    idx = ops.topk(masked, k, -1, True, True)[1].astype(ms().int64)
    idx = ops.where(idx < limit, idx, ops.full_like(idx, -1))
    return to_torch(idx).to(torch.int32)


def indexer_topk(scores, k, positions, ratio):
    return _topk(_t(scores, _cd(scores)), k, positions, ratio)


def indexer_select(q, k, weights, scale, topk, positions, ratio):
    return _topk(_scores(q, k, weights, scale, _cd(q)), topk, positions, ratio)


def window_attention(q, kv, window, scale, sink):
    b, s, n = q.shape[0], q.shape[1], kv.shape[1]
    rows = np.arange(n - s, n).reshape(s, 1) - (window - 1) + np.arange(window)
    idx = torch.from_numpy(np.broadcast_to(np.where(rows >= 0, rows, -1), (b, s, window)).copy())
    return sparse_attention(q, kv, idx, scale, sink, kv.shape[-1])


def sparse_attention(q, kv, indices, scale, sink, v_dim):
    ops, cd = mops(), _cd(q)
    b, s, h, d = q.shape
    kk = indices.shape[-1]
    idx = ms().Tensor(indices.long().clamp(min=0).numpy())
    valid = ms().Tensor((indices >= 0).numpy())
    kvs, qs = _t(kv, cd), _t(q, cd)
    outs, lses = [], []
    for bi in range(b):
        rows = ops.reshape(ops.gather(kvs[bi], ops.reshape(idx[bi], (-1,)), 0), (s, kk, d))  # [S, K, D]
        # Empty slots read row 0: zero them so a NaN/Inf there stays out of the weighted sum.
        rows = ops.where(ops.expand_dims(valid[bi], -1), rows, ops.zeros_like(rows))
        logits = ops.bmm(qs[bi], ops.transpose(rows, (0, 2, 1))) * scale  # [S, H, K]
        logits = ops.where(ops.expand_dims(valid[bi], 1), logits, ops.full_like(logits, float("-inf")))
        m = ops.amax(logits, -1, True)
        if sink is not None:
            m = ops.maximum(m, ops.reshape(_t(sink, cd), (1, h, 1)))
        m = ops.where(ops.isfinite(m), m, ops.zeros_like(m))
        p = ops.exp(logits - m)
        denom = ops.sum(p, -1, keepdim=True)
        if sink is not None:
            denom = denom + ops.exp(ops.reshape(_t(sink, cd), (1, h, 1)) - m)
        safe = ops.where(denom > 0, denom, ops.ones_like(denom))
        outs.append(ops.bmm(p, rows[..., :v_dim]) / safe)
        lses.append(ops.squeeze(ops.log(denom) + m, -1))
    lse_dtype = torch.float64 if cd == ms().float64 else torch.float32
    return to_torch(ops.stack(outs), q.dtype), to_torch(ops.stack(lses), lse_dtype)
