"""Fast Engram on CPU: the shifted ids built once by padding, every head's modulus in one
broadcast, one gather for all heads, the gate over all streams at once.

Device-agnostic torch, inherited by cuda and ascend (torch_npu has no Engram kernel: no `npu_*` op
in the pinned wheel hashes n-grams or gathers multi-head tables). A table in host memory is
gathered on the host and the rows copied to the device from pinned memory without blocking (what
`EngramPrefetcher` overlaps with earlier layers); a table in device memory is gathered in place."""

import torch
import torch.nn.functional as F


def engram_hash(token_ids, compress, multipliers, primes, pad_id, prefix):
    ids = token_ids.long() if prefix is None else torch.cat([prefix.long(), token_ids.long()], 1)
    c = compress[ids]
    span = multipliers.shape[0] - 1
    padded = F.pad(c, (span, 0), value=int(compress[pad_id]))
    length = c.shape[1]
    mix = c * multipliers[0]
    mixes = []
    for k in range(1, span + 1):
        mix = mix ^ (padded[:, span - k:span - k + length] * multipliers[k])
        mixes.append(mix)
    hashes = torch.remainder(torch.stack(mixes, -1).unsqueeze(-1), primes).flatten(-2)
    return hashes[:, length - token_ids.shape[1]:]


def _pinned(t):
    return t.pin_memory() if torch.cuda.is_available() or hasattr(torch, "npu") else t


def engram_lookup(hashes, table, offsets, device):
    rows = (hashes.to(table.device) + offsets.to(table.device)).flatten()
    out = table.index_select(0, rows).view(*hashes.shape[:-1], hashes.shape[-1] * table.shape[1])
    if out.device == device:
        return out
    if out.device.type == "cpu":  # host-resident table: copy the gathered rows from pinned memory
        return _pinned(out).to(device, non_blocking=True)
    return out.to(device)


def engram_gate(hidden, key, value, key_norm, query_norm, eps, inv_sqrt_d):
    cd = torch.float64 if hidden.dtype == torch.float64 else torch.float32
    k, q = key.to(cd), hidden.to(cd)
    k_inv = torch.rsqrt(k.pow(2).mean(-1) + eps)
    q_inv = torch.rsqrt(q.pow(2).mean(-1) + eps)
    w = key_norm.to(cd) * query_norm.to(cd)
    g = (k * q * w).sum(-1) * (k_inv * q_inv * inv_sqrt_d)
    g = torch.sigmoid(torch.sign(g) * g.abs().clamp_min(1e-6).sqrt())
    return (g.unsqueeze(-1) * value.to(cd).unsqueeze(-2)).to(hidden.dtype)
