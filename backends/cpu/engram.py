"""Reference Engram: one n-gram order and one head at a time, one stream at a time."""

import torch


def _shifted(c, k, pad):
    """c[:, t - k], with `pad` before the start."""
    if k == 0:
        return c
    return torch.cat([torch.full_like(c[:, :k], pad), c[:, :-k]], 1)[:, :c.shape[1]]


def engram_hash(token_ids, compress, multipliers, primes, pad_id, prefix):
    ids = token_ids.long() if prefix is None else torch.cat([prefix.long(), token_ids.long()], 1)
    c = compress[ids]
    pad = int(compress[pad_id])
    hashes = []
    for order in range(2, multipliers.shape[0] + 1):
        mix = c * multipliers[0]
        for k in range(1, order):
            mix = torch.bitwise_xor(mix, _shifted(c, k, pad) * multipliers[k])
        for size in primes[order - 2]:
            hashes.append(torch.remainder(mix, size))
    return torch.stack(hashes, -1)[:, ids.shape[1] - token_ids.shape[1]:]


def engram_lookup(hashes, table, offsets, device):
    hashes, offsets = hashes.to(table.device), offsets.to(table.device)
    rows = [table[offsets[h] + hashes[..., h]] for h in range(hashes.shape[-1])]
    return torch.cat(rows, -1).to(device)


def _rms(x, w, eps):
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * w


def engram_gate(hidden, key, value, key_norm, query_norm, eps, inv_sqrt_d):
    cd = torch.float64 if hidden.dtype == torch.float64 else torch.float32
    out = []
    for s in range(hidden.shape[-2]):
        k = _rms(key[..., s, :].to(cd), key_norm[s].to(cd), eps)
        q = _rms(hidden[..., s, :].to(cd), query_norm[s].to(cd), eps)
        g = (k * q).sum(-1) * inv_sqrt_d
        g = torch.sigmoid(torch.sign(g) * g.abs().clamp_min(1e-6).sqrt())
        out.append(g.unsqueeze(-1) * value.to(cd))
    return torch.stack(out, -2).to(hidden.dtype)
