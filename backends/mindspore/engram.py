"""Engram in MindSpore: int64 n-gram hashing with mindspore bitwise ops (the lookback window is
assembled in torch), one gather over the layer's table (float8 ones dequantized here),
the stream gate with mindspore math; torch tensors converted at the boundary.

A table is converted to MindSpore once and kept while the same torch tensor object comes back
unmodified, since tables are large and lookups frequent."""

import weakref

import torch

from v4hal.backends.mindspore import keep_nan, mops, ms, to_ms, to_torch
from v4hal.ops.engram import DEAD, SCALE_BLOCK, engram_offsets, lookback_window

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


def engram_hash(token_ids, token_map, multipliers, primes, pad_id, lookback):
    ops, mst = mops(), ms()
    span, length = multipliers.shape[0] - 1, token_ids.shape[1]
    ids = to_ms(lookback_window(token_ids, lookback, span))    # the chunk after `span` lookback ids (-1: none)
    batch = ids.shape[0]
    found = ops.gather(to_ms(token_map), ops.reshape(ops.clamp(ids, min=0), (-1,)), 0)
    dead_id = mst.Tensor(DEAD, mst.int64)
    c = ops.where(ids >= 0, ops.reshape(found, ids.shape), dead_id)
    pad = ops.fill(mst.int64, (batch, length), pad_id)
    # int64 tensors, not Python ints: a Python scalar may be taken as a float.
    mult = [mst.Tensor(int(m), mst.int64) for m in multipliers]
    offsets = engram_offsets(primes).view(primes.shape).tolist()
    blocked, mix, rows = None, None, []
    for k in range(span + 1):
        source = c[:, span - k:span - k + length]
        dead = ops.equal(source, dead_id)
        blocked = dead if blocked is None else ops.logical_or(blocked, dead)
        term = ops.where(blocked, pad, source) * mult[k]
        mix = term if mix is None else ops.bitwise_xor(mix, term)
        if k:
            chunks = _chunks(mix)
            for size, offset in zip(primes[k - 1].tolist(), offsets[k - 1]):
                rows.append(_remainder(chunks, size) + mst.Tensor(offset, mst.int64))
    return to_torch(ops.stack(rows, -1)).to(token_ids.device)


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


def engram_lookup(rows, table, scale, device, dtype):
    ops, mst = mops(), ms()
    heads, d = rows.shape[-1], table.shape[1]
    flat = to_ms(rows.cpu().reshape(-1))
    out = ops.gather(_ms_table(table), flat, 0)            # float8 arrives as float32 (exact)
    if scale is not None:
        s = ops.gather(to_ms(scale.view(torch.uint8) if scale.dtype != torch.float32 else scale), flat, 0)
        if scale.dtype != torch.float32:                   # ue8m0 exponent bytes: 2 ** (byte - 127)
            s = ops.pow(mst.Tensor(2.0, mst.float32), s.astype(mst.float32) - 127)
        out = out.astype(mst.float32) * ops.repeat_interleave(s, SCALE_BLOCK, 1)
    return to_torch(out, dtype).reshape(*rows.shape[:-1], heads * d).to(device)


def engram_gate(hidden, key, value, key_norm, query_norm, eps, inv_sqrt_d, keep):
    ops = mops()
    cd = ms().float64 if hidden.dtype == torch.float64 else ms().float32
    h, k = to_ms(hidden).astype(cd), to_ms(key).astype(cd)
    v = ops.expand_dims(to_ms(value).astype(cd), -2)

    def normed(x, w):
        return x * ops.rsqrt(ops.mean(x * x, -1, keep_dims=True) + eps) * to_ms(w).astype(cd)

    g = ops.sum(normed(k, key_norm) * normed(h, query_norm), -1) * inv_sqrt_d
    g = keep_nan(ops.sigmoid(ops.sign(g) * ops.sqrt(ops.clamp(ops.abs(g), min=1e-6))), g)
    if keep is not None:
        g = ops.where(ops.expand_dims(to_ms(keep), -1), g, ops.zeros_like(g))
    return to_torch(ops.expand_dims(g, -1) * v, hidden.dtype).to(hidden.device)
