"""Reference FP8 KV cache (layouts: v4hal/ops/kv_cache.py): one token record of `token_bytes`
bytes per row (nope e4m3 | rope BF16 | scales for v4, nope | scales | rope for v3.2, nope int8 |
rope | scales for int8, each layout's physical order), read as rows of the views its parts occupy
(`regions`), written by one byte-indexed `index_put_` on the cache itself (`_record_places`).
Attention dequantizes the whole cache, then runs the reference `sparse_attention`."""

import torch

from v4hal.backends.cpu.attention import indexer_scores as scores
from v4hal.backends.cpu.attention import sparse_attention as attend

E4M3_MAX = 448.0
INT8_MAX = 127.0
MIN_SCALE = 1e-4  # FlashMLA's floor on amax / 448 (an all-zero tile gets scale 2**-13)


def _pieces(lay):
    """(start, width) of nope, scales and rope inside a token record."""
    if lay.split or lay.scales_last:
        return (0, lay.nope), (lay.row_bytes, lay.tiles * lay.scale_bytes), (lay.nope, 2 * lay.rope)
    return (0, lay.nope), (lay.nope, lay.tiles * lay.scale_bytes), (lay.nope + lay.scale_record, 2 * lay.rope)


def regions(cache, lay):
    """Views `[blocks, block_size, width]` of the cache's bytes whose rows, side by side, are the
    token records: the whole record (v3.2), or the e4m3 + rope rows, then the scale records (v4,
    each block holding all its rows before its scales). A token's part is one contiguous row of
    a view, so records are read by row gathers, not per byte."""
    data = cache.view(torch.uint8)
    if not lay.split:
        return [data]
    blocks, bs = data.shape[0], data.shape[1]
    flat = data.flatten(1)  # [blocks, block_size * token_bytes]: each block's bytes
    rows = flat[:, :bs * lay.row_bytes].unflatten(1, (bs, lay.row_bytes))
    scales = flat[:, bs * lay.row_bytes:].unflatten(1, (bs, lay.scale_record))
    return [rows, scales]


def _records(cache, lay, slots):
    """Token records `[M, token_bytes]` at flat `slots` `[M]` (all valid)."""
    bs = cache.shape[1]
    block, offset = slots // bs, slots % bs
    return torch.cat([view[block, offset] for view in regions(cache, lay)], -1)


def round_to_bf16(x):
    """float32 values rounded to the nearest BF16 (ties to even), by integer arithmetic on the
    bits: inside a compiled graph inductor may drop a `.to(bfloat16).float()` pair (its
    emulate_precision_casts is off by default), which would change the bytes written."""
    bits = x.float().view(torch.int32)
    bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & -0x10000
    return bits.view(torch.float32)


def encode(kv, lay):
    """Token records `[M, token_bytes]` uint8 of rows `[M, D]`."""
    x = round_to_bf16(kv)
    nope = x[:, :lay.nope].view(-1, lay.tiles, lay.tile)
    amax = nope.abs().amax(-1)
    codes, scale_bytes = (_int8_codes if lay.codes == "int8" else _e4m3_codes)(nope, amax, lay)
    pad = scale_bytes.new_zeros(scale_bytes.shape[0], lay.scale_pad)
    rope = x[:, lay.nope:].to(torch.bfloat16).contiguous().view(torch.uint8)  # exact: already BF16 values
    record = torch.empty(kv.shape[0], lay.token_bytes, dtype=torch.uint8, device=kv.device)
    (n0, nw), (s0, sw), (r0, rw) = _pieces(lay)
    record[:, n0:n0 + nw] = codes
    record[:, s0:s0 + sw + lay.scale_pad] = torch.cat([scale_bytes, pad], 1)
    record[:, r0:r0 + rw] = rope
    return record


def _e4m3_codes(nope, amax, lay):
    """e4m3 codes and the scales' bytes (ue8m0 or float32) of tiles `[M, tiles, tile]`."""
    mant, exp = torch.frexp(torch.clamp_min(amax / E4M3_MAX, MIN_SCALE))
    exp = exp - (mant == 0.5).to(exp.dtype)  # ceil(log2): an exact power of two keeps its exponent
    scale = torch.ldexp(torch.ones_like(amax), exp)
    codes = (nope / scale.unsqueeze(-1)).to(torch.float8_e4m3fn).view(torch.uint8).flatten(1)
    if lay.scale_bytes == 1:
        return codes, (exp + 127).to(torch.uint8)
    return codes, scale.contiguous().view(torch.uint8)


def _int8_codes(nope, amax, lay):
    """int8 codes `rint(value / scale)`, scale = amax / 127 in float32, and the scales' bytes;
    an all-zero tile keeps scale 0 and codes 0."""
    scale = amax / INT8_MAX
    safe = torch.where(scale > 0, scale, 1.0).unsqueeze(-1)
    codes = torch.round(nope / safe).clamp(-INT8_MAX, INT8_MAX).to(torch.int8).view(torch.uint8).flatten(1)
    return codes, scale.contiguous().view(torch.uint8)


def decode(record, lay):
    """Rows `[..., D]` float32 of token records `[..., token_bytes]`."""
    (n0, nw), (s0, sw), (r0, rw) = _pieces(lay)
    lead = record.shape[:-1]
    code_dtype = torch.int8 if lay.codes == "int8" else torch.float8_e4m3fn
    codes = record[..., n0:n0 + nw].contiguous().view(code_dtype).float()
    raw = record[..., s0:s0 + sw].contiguous()
    if lay.scale_bytes == 1:
        scale = torch.ldexp(torch.ones(raw.shape, device=raw.device), raw.int() - 127)
    else:
        scale = raw.view(torch.float32)
    nope = (codes.view(*lead, lay.tiles, lay.tile) * scale.unsqueeze(-1)).flatten(-2)
    rope = record[..., r0:r0 + rw].contiguous().view(torch.bfloat16).float()
    return torch.cat([nope, rope], -1)


def kv_cache_fp8_write(cache, kv, slots, lay):
    # Fixed shapes, no host read: a dropped row (-1) repeats the first kept row's record and slot
    # (identical bytes to one place), or rewrites slot 0's own bytes when no row is kept.
    bs = cache.shape[1]
    slots = slots.long()
    keep = slots >= 0
    first = keep.to(torch.uint8).argmax().view(1)  # indexing by a tensor, not a Python int
    any_kept = keep.index_select(0, first)
    records = encode(kv, lay)
    fill_slot = torch.where(any_kept, slots.index_select(0, first), 0)
    fill = torch.where(any_kept.unsqueeze(-1), records.index_select(0, first), _records(cache, lay, fill_slot))
    slots = torch.where(keep, slots, fill_slot)
    records = torch.where(keep.unsqueeze(-1), records, fill)
    # One index_put_ on the cache itself, byte by byte: a write through views of it (`regions`)
    # is, in a compiled graph, a copy of the whole cache per write (functionalization rebuilds
    # the viewed base; inductor cannot do it in place), which made compiled FP8 decode O(cache).
    block, place = slots // bs, _record_places(lay, slots % bs, bs)
    cache.index_put_((block.unsqueeze(-1), place // lay.token_bytes, place % lay.token_bytes),
                     records.view(cache.dtype))


def _record_places(lay, offset, block_size):
    """Byte positions `[M, token_bytes]` inside their block (of block_size * token_bytes bytes)
    of the records of the tokens at `offset` `[M]` in their blocks, in record order: one run
    (v3.2), or the e4m3 + rope row, then the scale record after the block's rows (v4, index)."""
    j = torch.arange(lay.token_bytes, device=offset.device)
    at = offset.unsqueeze(-1)
    if not lay.split:
        return at * lay.token_bytes + j
    scales = block_size * lay.row_bytes + at * lay.scale_record + (j - lay.row_bytes)
    return torch.where(j < lay.row_bytes, at * lay.row_bytes + j, scales)


def kv_cache_fp8_read(cache, slots, lay):
    flat = slots.reshape(-1).long()
    rows = decode(_records(cache, lay, flat.clamp(min=0)), lay)
    rows = torch.where((flat >= 0).unsqueeze(-1), rows, 0.0)
    return rows.view(*slots.shape, lay.dim)


def sparse_attention_fp8kv(q, cache, slots, scale, lay, sink, v_dim, need_lse=True):
    every = torch.arange(cache.shape[0] * cache.shape[1], device=cache.device)
    kv = kv_cache_fp8_read(cache, every, lay).unsqueeze(0).expand(q.shape[0], -1, -1)
    return attend(q, kv, slots, scale, sink, v_dim)


def indexer_scores_fp8kv(q, cache, slots, weights, scale, lay):
    return scores(q, kv_cache_fp8_read(cache, slots, lay), weights, scale)
