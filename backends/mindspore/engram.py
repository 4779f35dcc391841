"""Engram in MindSpore: int64 n-gram hashing with mindspore bitwise ops, one gather over the
shared table, the stream gate with mindspore math; torch tensors converted at the boundary.

A table is converted to MindSpore once and kept while the same torch tensor (same storage and
version) comes back, since tables are large and lookups frequent."""

import torch

from v4hal.backends.mindspore import ms, to_ms, to_torch
from v4hal.backends.mindspore.mhc import mops

_table_cache: dict = {}


def engram_hash(token_ids, compress, multipliers, primes, pad_id, prefix):
    ops = mops()
    ids = token_ids.long() if prefix is None else torch.cat([prefix.long(), token_ids.long()], 1)
    batch, length = ids.shape
    comp = to_ms(compress)
    c = ops.gather(comp, to_ms(ids.reshape(-1)), 0)
    c = ops.reshape(c, (batch, length))
    span = multipliers.shape[0] - 1
    pad = ops.fill(ms().int64, (batch, span), int(compress[pad_id]))
    padded = ops.concat((pad, c), 1)
    mult = [int(m) for m in multipliers]
    mix = c * mult[0]
    heads = []
    for k in range(1, span + 1):
        mix = ops.bitwise_xor(mix, padded[:, span - k:span - k + length] * mult[k])
        for size in primes[k - 1].tolist():
            heads.append(ops.floor_mod(mix, size))
    out = to_torch(ops.stack(heads, -1))
    return out[:, length - token_ids.shape[1]:].to(token_ids.device)


def _ms_table(table):
    key = (table.data_ptr(), tuple(table.shape), table.dtype, table._version)
    if key not in _table_cache:
        _table_cache.clear()
        _table_cache[key] = to_ms(table)
    return _table_cache[key]


def engram_lookup(hashes, table, offsets, device):
    ops = mops()
    heads, d = hashes.shape[-1], table.shape[1]
    rows = to_ms((hashes.cpu() + offsets.cpu()).reshape(-1))
    out = ops.gather(_ms_table(table), rows, 0)
    return to_torch(out, table.dtype).reshape(*hashes.shape[:-1], heads * d).to(device)


def engram_gate(hidden, key, value, key_norm, query_norm, eps, inv_sqrt_d):
    ops = mops()
    cd = ms().float64 if hidden.dtype == torch.float64 else ms().float32
    h, k = to_ms(hidden).astype(cd), to_ms(key).astype(cd)
    v = ops.expand_dims(to_ms(value).astype(cd), -2)

    def normed(x, w):
        return x * ops.rsqrt(ops.mean(x * x, -1, keep_dims=True) + eps) * to_ms(w).astype(cd)

    g = ops.sum(normed(k, key_norm) * normed(h, query_norm), -1) * inv_sqrt_d
    g = ops.sigmoid(ops.sign(g) * ops.sqrt(ops.clamp(ops.abs(g), min=1e-6)))
    return to_torch(ops.expand_dims(g, -1) * v, hidden.dtype).to(hidden.device)
