"""Engram in MindSpore: int64 n-gram hashing with mindspore bitwise ops, one gather over the
shared table, the stream gate with mindspore math; torch tensors converted at the boundary.

A table is converted to MindSpore once and kept while the same torch tensor object comes back
unmodified, since tables are large and lookups frequent."""

import weakref

import torch

from v4hal.backends.mindspore import keep_nan, mops, ms, to_ms, to_torch

# (weak reference to the torch table, its layout, the MindSpore copy), replaced as one tuple so a
# prefetch thread and the caller never see half of an entry.
_cached_table: tuple | None = None


CHUNK_BITS = 16


def _chunks(mix):
    """A non-negative int64 tensor as four 16-bit digits, most significant first."""
    ops = mops()
    mask = ms().Tensor((1 << CHUNK_BITS) - 1, ms().int64)
    return [ops.bitwise_and(ops.bitwise_right_shift(mix, ms().Tensor(shift, ms().int64)), mask)
            for shift in (48, 32, 16, 0)]


def _remainder(chunks, size):
    """`mix mod size` by Horner over 16-bit digits. MindSpore 2.10's int64 remainder/floor_mod on
    CPU go through float64 and return wrong residues for values above 2**53 (the XOR mixes reach
    2**62); every intermediate here stays below 2**53."""
    ops = mops()
    p, base = ms().Tensor(size, ms().int64), ms().Tensor(1 << CHUNK_BITS, ms().int64)
    r = ops.zeros_like(chunks[0])
    for digit in chunks:
        r = ops.remainder(r * base + digit, p)
    return r


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
    # int64 tensors, not Python ints: a Python scalar may be taken as a float.
    mult = [ms().Tensor(int(m), ms().int64) for m in multipliers]
    mix = c * mult[0]
    heads = []
    for k in range(1, span + 1):
        mix = ops.bitwise_xor(mix, padded[:, span - k:span - k + length] * mult[k])
        chunks = _chunks(mix)
        for size in primes[k - 1].tolist():
            heads.append(_remainder(chunks, size))
    out = to_torch(ops.stack(heads, -1))
    return out[:, length - token_ids.shape[1]:].to(token_ids.device)


def _layout(table):
    # The version counts in-place writes (shared by every view of the storage); pointer, strides
    # and offset catch `set_` and in-place re-striding of the same object.
    return (table.data_ptr(), tuple(table.shape), table.stride(), table.storage_offset(), table.dtype,
            table._version)


def _ms_table(table):
    # Keyed on the tensor object itself (a weak reference, so a freed table's address taken by a
    # new one, or another view of the same memory, never hits), and dropped when it dies.
    global _cached_table
    entry = _cached_table
    if entry is None or entry[0]() is not table or entry[1] != _layout(table):
        entry = _cached_table = (weakref.ref(table, _forget), _layout(table), to_ms(table))
    return entry[2]


def _forget(ref):
    global _cached_table
    if _cached_table is not None and _cached_table[0] is ref:
        _cached_table = None


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
    g = keep_nan(ops.sigmoid(ops.sign(g) * ops.sqrt(ops.clamp(ops.abs(g), min=1e-6))), g)
    return to_torch(ops.expand_dims(g, -1) * v, hidden.dtype).to(hidden.device)
