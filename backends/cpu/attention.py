"""Reference sparse-attention family: straight from the formulas (attention over each query's
gathered rows, the indexer with dense masks), float32 (float64 when given float64)."""

import torch


def compute_dtype(x):
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def apply_rope(x, cos, sin, interleaved):
    cd = compute_dtype(x)
    xf, c, s = x.to(cd), cos.to(cd), sin.to(cd)
    half = x.shape[-1] // 2
    if interleaved:
        a, b = xf[..., 0::2], xf[..., 1::2]
        out = torch.stack([a * c - b * s, b * c + a * s], dim=-1).flatten(-2)
    else:
        a, b = xf[..., :half], xf[..., half:]
        out = torch.cat([a * c - b * s, b * c + a * s], dim=-1)
    return out.to(x.dtype)


def layer_norm(x, weight, bias, eps):
    cd = compute_dtype(x)
    xf = x.to(cd)
    y = (xf - xf.mean(-1, keepdim=True)) * torch.rsqrt(xf.var(-1, unbiased=False, keepdim=True) + eps)
    y = y * weight.to(cd)
    if bias is not None:
        y = y + bias.to(cd)
    return y.to(x.dtype)


def kv_compress(kv, gate, position_bias, norm_weight, ratio, overlap, eps, prev_kv, prev_gate):
    cd = compute_dtype(kv)
    b, length, c = kv.shape
    w = length // ratio
    kvw = kv.to(cd).view(b, w, ratio, c)
    gw = gate.to(cd).view(b, w, ratio, c) + position_bias.to(cd)
    if overlap:
        d = c // 2
        # Slot layout per entry: [series a of the previous window | series b of this window].
        prev_a = torch.zeros(b, w, ratio, d, dtype=cd, device=kv.device)
        prev_g = torch.full((b, w, ratio, d), float("-inf"), dtype=cd, device=kv.device)
        prev_a[:, 1:], prev_g[:, 1:] = kvw[:, :-1, :, :d], gw[:, :-1, :, :d]
        if prev_kv is not None:
            prev_a[:, 0], prev_g[:, 0] = prev_kv.to(cd), prev_gate.to(cd)
        kvw = torch.cat([prev_a, kvw[..., d:]], dim=2)
        gw = torch.cat([prev_g, gw[..., d:]], dim=2)
    pooled = (torch.softmax(gw, dim=2) * kvw).sum(2)
    normed = pooled * torch.rsqrt(pooled.pow(2).mean(-1, keepdim=True) + eps) * norm_weight.to(cd)
    return normed.to(kv.dtype)


def indexer_scores(q, k, weights, scale):
    cd = compute_dtype(q)
    dots = torch.einsum("bshd,btd->bsht", q.to(cd), k.to(cd))
    return scale * (torch.relu(dots) * weights.to(cd).unsqueeze(-1)).sum(2)


def _visible(positions, ratio, t, shape, device):
    if positions is None:
        return torch.ones(shape, dtype=torch.bool, device=device)
    limit = (positions.long() + 1) // ratio
    return torch.arange(t, device=device).view(1, 1, t) < limit.unsqueeze(-1)


def indexer_topk(scores, k, positions, ratio):
    visible = _visible(positions, ratio, scores.shape[-1], scores.shape, scores.device)
    # The visible entries are a prefix (t < limit): hidden ones masked to -inf sort after every
    # visible one (a stable sort keeps index order among ties), then slots past the visible
    # count become -1. No shape depends on the data, so torch.compile traces it whole.
    order = torch.argsort(scores.masked_fill(~visible, float("-inf")), dim=-1, descending=True, stable=True)[..., :k]
    seen = torch.arange(k, device=scores.device) < visible.sum(-1, keepdim=True)
    return torch.where(seen, order, -1).to(torch.int32)


def indexer_select(q, k, weights, scale, topk, positions, ratio):
    return indexer_topk(indexer_scores(q, k, weights, scale), topk, positions, ratio)


def sparse_attention(q, kv, indices, scale, sink, v_dim):
    cd = compute_dtype(q)
    b, s, h, _ = q.shape
    valid = indices >= 0  # [B, S, K]
    # Each query's own rows (duplicates twice); empty slots read zeros, so no row outside its list
    # (NaN or Inf included) can reach its sums.
    rows = kv[torch.arange(b, device=kv.device).view(b, 1, 1), indices.long().clamp(min=0)].to(cd)  # [B, S, K, D]
    rows = torch.where(valid.unsqueeze(-1), rows, 0.0)
    logits = scale * torch.einsum("bshd,bskd->bshk", q.to(cd), rows)
    logits = torch.where(valid.unsqueeze(2), logits, float("-inf"))
    m = logits.amax(-1, keepdim=True)
    if sink is not None:
        m = torch.maximum(m, sink.to(cd).view(1, 1, h, 1))
    m = torch.where(torch.isfinite(m), m, 0.0)
    p = torch.exp(logits - m)
    denom = p.sum(-1, keepdim=True)
    if sink is not None:
        denom = denom + torch.exp(sink.to(cd).view(1, 1, h, 1) - m)
    out = torch.einsum("bshk,bskd->bshd", p, rows[..., :v_dim]) / torch.where(denom > 0, denom, 1.0)
    lse = (torch.log(denom) + m).squeeze(-1)
    return out.to(q.dtype), lse


def window_indices_for(b, s, n, window, device):
    """Rows each of the last s queries of an n-row KV sees: [B, S, window], -1 before row 0."""
    rows = torch.arange(n - s, n, device=device).view(s, 1) - (window - 1) + torch.arange(window, device=device)
    return torch.where(rows >= 0, rows, -1).expand(b, s, window)


def window_attention(q, kv, window, scale, sink):
    idx = window_indices_for(q.shape[0], q.shape[1], kv.shape[1], window, q.device)
    return sparse_attention(q, kv, idx, scale, sink, kv.shape[-1])
