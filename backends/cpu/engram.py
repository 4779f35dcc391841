"""Reference Engram: one shift at a time, one (order, head) at a time, one stream at a time."""

import torch

from v4hal.ops.engram import DEAD, dequantized_rows, engram_offsets, lookback_window


def compressed(ids, token_map):
    """token_map[id], DEAD where there is no token (id -1)."""
    return torch.where(ids >= 0, token_map[ids.clamp_min(0)], DEAD)


def engram_hash(token_ids, token_map, multipliers, primes, pad_id, lookback):
    span, length = multipliers.shape[0] - 1, token_ids.shape[1]
    c = compressed(lookback_window(token_ids, lookback, span), token_map)
    offsets = engram_offsets(primes).view(primes.shape)
    blocked = torch.zeros(c.shape[0], length, dtype=torch.bool, device=c.device)
    mix = torch.zeros(c.shape[0], length, dtype=torch.int64, device=c.device)
    rows = []
    for k in range(span + 1):
        source = c[:, span - k:span - k + length]         # the token k positions back
        blocked = blocked | (source == DEAD)              # blocked from here on
        mix = mix ^ (torch.where(blocked, pad_id, source) * multipliers[k])
        if k:
            for h in range(primes.shape[1]):
                rows.append(torch.remainder(mix, primes[k - 1, h]) + offsets[k - 1, h])
    return torch.stack(rows, -1)


def engram_lookup(rows, table, scale, device, dtype):
    rows = rows.to(table.device)
    parts = []
    for h in range(rows.shape[-1]):
        part = table[rows[..., h]]
        if scale is not None:
            part = dequantized_rows(part, scale[rows[..., h]])
        parts.append(part.to(dtype))
    return torch.cat(parts, -1).to(device)


def _rms(x, w, eps):
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * w


def engram_gate(hidden, key, value, key_norm, query_norm, eps, inv_sqrt_d, keep):
    cd = torch.float64 if hidden.dtype == torch.float64 else torch.float32
    out = []
    for s in range(hidden.shape[-2]):
        k = _rms(key[..., s, :].to(cd), key_norm[s].to(cd), eps)
        q = _rms(hidden[..., s, :].to(cd), query_norm[s].to(cd), eps)
        g = (k * q).sum(-1) * inv_sqrt_d
        g = torch.sigmoid(torch.sign(g) * g.abs().clamp_min(1e-6).sqrt())
        if keep is not None:
            g = torch.where(keep, g, 0.0)
        out.append(g.unsqueeze(-1) * value.to(cd))
    return torch.stack(out, -2).to(hidden.dtype)
