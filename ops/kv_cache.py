"""The KV cache in DeepSeek's FP8 layouts (sparse FP8 decoding) and an int8 layout for Ascend,
paged, and attention over it (the ops keep their `fp8` names for either).

Source of the byte layouts: FlashMLA's public tests, `tests/quant.py` in deepseek-ai/FlashMLA
(`FP8KVCacheLayout`, `quantize_k_cache`, `dequantize_k_cache`; read at commit 520fec6a), which
the FlashMLA sparse FP8 decode kernels read. A cache is a uint8 (or float8_e4m3fn) tensor
`[blocks, block_size, token_bytes]`: FlashMLA's shape without its head dim of 1. Each block's
`block_size * token_bytes` bytes are contiguous; the block stride may be larger (padding).

Per token one KV row of D = nope + rope values is stored as
- NoPE part: `nope` e4m3 bytes, one per value, in tiles of `tile` values; each tile's scale is
  `2**ceil(log2(max(amax / 448, 1e-4)))` (ue8m0: rounded UP to a power of two, amax over the
  tile's BF16 values) and its bytes are `e4m3(value / scale)` (round to nearest even);
- RoPE part: the last `rope` values in BF16, two little-endian bytes each.

Layout "v4" (FlashMLA's MODEL1_FP8Sparse, DeepSeek-V4): D = 512 = 448 nope + 64 rope, tile 64 (7
scales), 584 bytes per token. Inside a block, token t's 448 e4m3 bytes then its 128 rope bytes
sit at `t * 576`; after all block_size of those come the scales, 8 bytes per token at
`block_size * 576 + t * 8`: 7 ue8m0 bytes (the exponent + 127) and one padding byte (written 0).
FlashMLA allocates blocks rounded up to a multiple of 576 bytes (`kv_cache_fp8_empty` does too).

Layout "v3.2" (V32_FP8Sparse): D = 576 = 512 nope + 64 rope, tile 128 (4 scales), 656 bytes per
token, token t at `t * 656`: 512 e4m3 bytes, the 4 scales as little-endian float32 (powers of
two), then the 128 rope bytes.

Layout "int8" (V3.2's latent for Ascend's `npu_kv_quant_sparse_flash_attention`, torch-npu 2.13.0's
docs: "int8的k_nope、query相同dtype的k_rope和float32的量化参数按D维度拼接得到", per tile of 128,
combine mode): D = 576 = 512 nope + 64 rope, 656 bytes per token, token t at `t * 656`: 512 int8
codes, the 128 rope bytes, then the 4 float32 scales. Not DeepSeek's: an int8 cache of our own for
chips without FP8 (A2 / A3). Each 128-value tile's scale is `amax / 127` in float32 (amax over the
tile's BF16 values; `npu_dynamic_block_quant`'s documented per-block int8 quantization) and its
codes `rint(value / scale)` (an all-zero tile: scale 0, codes 0); a value reads back as
`code * scale`, within half a step (`scale / 2`).

Layout "index" (the lightning indexer's keys, as DeepSeek's V3.2 inference caches them: e4m3
values with one float32 power-of-two scale per 128, no RoPE part; the paged order of DeepGEMM's
`fp8_paged_mqa_logits`): D = 128, 132 bytes per token, per block every token's 128 e4m3 bytes,
then the scales, 4 bytes per token. DeepSeek rotates the keys (Hadamard) before quantizing; the
model here does not (its indexer is transformers', which has no rotation).

Rows are addressed by slot `block * block_size + offset` (FlashMLA's "indices in kvcache"). A
block table `[B, max_blocks]` maps sequence b's position p to slot
`block_table[b, p // block_size] * block_size + p % block_size`; a contiguous per-sequence cache
is the special case of one block per sequence (block_size = its length).

Values are taken as BF16 before quantizing (what a BF16 model writes, and what FlashMLA's
quantizer takes), so every backend rounds the same bytes; dequantized values are exact in float32.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from v4hal.backends.registry import dispatch, register_op
from v4hal.ops import _check

__all__ = ["KVLayout", "KV_LAYOUTS", "kv_cache_fp8_empty", "kv_cache_fp8_write", "kv_cache_fp8_read",
           "sparse_attention_fp8kv", "indexer_scores_fp8kv"]

FAMILY = "kv_cache"
for _op in ("kv_cache_fp8_write", "kv_cache_fp8_read", "sparse_attention_fp8kv", "indexer_scores_fp8kv"):
    register_op(_op, FAMILY)

FLOATS = (torch.float32, torch.float64, torch.bfloat16, torch.float16)
INDEX = (torch.int32, torch.int64)
E4M3_CACHE = (torch.uint8, torch.float8_e4m3fn)


@dataclass(frozen=True)
class KVLayout:
    """One FP8 cache layout (see the module doc). scale_bytes: 1 (ue8m0) or 4 (float32);
    scale_pad: bytes after a token's scales; split: rows then scales per block (v4) instead of
    one record per token (v3.2); block_align: FlashMLA's block allocation granule in bytes;
    codes: "e4m3" (power-of-two scales) or "int8" (`amax / 127` scales); scales_last: a token
    record is nope, rope, scales (int8) instead of nope, scales, rope (v3.2)."""

    name: str
    nope: int
    rope: int
    tile: int
    scale_bytes: int
    scale_pad: int
    split: bool
    block_align: int = 1
    codes: str = "e4m3"
    scales_last: bool = False

    @property
    def cache_dtypes(self) -> tuple[torch.dtype, ...]:
        """What a cache of this layout may be: int8 for the int8 layout (the tensor Ascend's kernel
        takes; the dtype tells it from v3.2's cache of the same width), uint8 / float8 bytes else."""
        return (torch.int8,) if self.codes == "int8" else E4M3_CACHE

    @property
    def tiles(self) -> int:
        return self.nope // self.tile

    @property
    def dim(self) -> int:
        return self.nope + self.rope

    @property
    def row_bytes(self) -> int:
        """e4m3 + BF16 bytes of a token (the part before the scales in v4)."""
        return self.nope + 2 * self.rope

    @property
    def scale_record(self) -> int:
        return self.tiles * self.scale_bytes + self.scale_pad

    @property
    def token_bytes(self) -> int:
        return self.row_bytes + self.scale_record


KV_LAYOUTS = {
    "v4": KVLayout("v4", nope=448, rope=64, tile=64, scale_bytes=1, scale_pad=1, split=True, block_align=576),
    "v3.2": KVLayout("v3.2", nope=512, rope=64, tile=128, scale_bytes=4, scale_pad=0, split=False),
    "int8": KVLayout("int8", nope=512, rope=64, tile=128, scale_bytes=4, scale_pad=0, split=False, codes="int8",
                     scales_last=True),
    "index": KVLayout("index", nope=128, rope=0, tile=128, scale_bytes=4, scale_pad=0, split=True),
}


def _layout(op: str, layout: object) -> KVLayout:
    if isinstance(layout, KVLayout):
        return layout
    if layout not in KV_LAYOUTS:
        raise _check.OpInputError(op, "layout", f"one of {tuple(KV_LAYOUTS)}", repr(layout))
    return KV_LAYOUTS[layout]


def kv_cache_fp8_empty(blocks: int, block_size: int, layout: str = "v4",
                       device: torch.device | str | None = None) -> torch.Tensor:
    """A zeroed cache `[blocks, block_size, token_bytes]` uint8 (int8 for the int8 layout), each block allocated rounded up to
    the layout's granule as FlashMLA does (so the block stride may exceed block_size * token_bytes),
    on `device` (None: torch's current default device). A helper, not an op (nothing dispatched)."""
    op = "kv_cache_fp8_empty"
    lay = _layout(op, layout)
    blocks, block_size = _check.positive_int(op, "blocks", blocks), _check.positive_int(op, "block_size", block_size)
    used = block_size * lay.token_bytes
    stride = -(-used // lay.block_align) * lay.block_align
    pool = torch.zeros(blocks, stride, dtype=lay.cache_dtypes[0], device=device)
    return pool[:, :used].view(blocks, block_size, -1)


def _cache(op: str, cache: torch.Tensor, lay: KVLayout) -> None:
    _check.tensor(op, "cache", cache, dtypes=lay.cache_dtypes, ndim=3)
    width = cache.shape[2]
    if width != lay.token_bytes:
        other = [n for n, o in KV_LAYOUTS.items() if o.token_bytes == width]
        hint = f" (the {other[0]} layout's width: a cache of the other layout?)" if other else ""
        raise _check.OpInputError(op, "cache", f"{lay.token_bytes} bytes per token (layout {lay.name!r}), "
                                  f"shape [blocks, block_size, {lay.token_bytes}]", _check.describe(cache) + hint)
    if cache.stride(2) != 1 or cache.stride(1) != width:
        raise _check.OpInputError(op, "cache", "each block's bytes contiguous (strides [*, token_bytes, 1])",
                                  f"strides {cache.stride()}")


def _slots(op: str, arg: str, t: torch.Tensor, cache: torch.Tensor, values: _check.Values) -> None:
    _check.tensor(op, arg, t, dtypes=INDEX, nonempty=False)
    n = cache.shape[0] * cache.shape[1]
    values.in_range(arg, t, -1, n, f"-1 = none; slot = block * block_size + offset, cache has {n} slots")


def kv_cache_fp8_write(cache: torch.Tensor, kv: torch.Tensor, slots: torch.Tensor, layout: str = "v4") -> torch.Tensor:
    """Quantize KV rows and store them in `cache` in place (returns cache).

    cache `[blocks, block_size, token_bytes]` uint8/float8_e4m3fn (int8 for the int8 layout); kv `[..., D]` float (D =
    layout's nope + rope; taken as BF16); slots `[...]` int (kv's leading shape): where each row
    goes, -1 = drop the row. Two rows to one slot: one of them wins (unspecified which).
    """
    op = "kv_cache_fp8_write"
    lay = _layout(op, layout)
    _cache(op, cache, lay)
    _check.tensor(op, "kv", kv, dtypes=FLOATS, ndim=range(1, 9), nonempty=False)
    _check.equal(op, "kv", kv.shape[-1], lay.dim, f"last dim = {lay.nope} nope + {lay.rope} rope ({lay.name})")
    values = _check.Values(op)
    _slots(op, "slots", slots, cache, values)
    _check.shape(op, "slots", slots, tuple(kv.shape[:-1]), "kv's leading shape")
    _check.same_device(op, cache=cache, kv=kv, slots=slots)
    values.finite("kv", kv).decide()
    if kv.numel():
        dispatch(op)(cache, kv.reshape(-1, lay.dim), slots.reshape(-1), lay)
    return cache


def kv_cache_fp8_read(cache: torch.Tensor, slots: torch.Tensor, layout: str = "v4") -> torch.Tensor:
    """Dequantize the rows at `slots` (any shape, -1 = none: a zero row). Returns
    `[*slots.shape, D]` float32: each code (e4m3 or int8) times its tile's scale, then the BF16 rope."""
    op = "kv_cache_fp8_read"
    lay = _layout(op, layout)
    _cache(op, cache, lay)
    values = _check.Values(op)
    _slots(op, "slots", slots, cache, values)
    _check.same_device(op, cache=cache, slots=slots)
    values.decide()
    return dispatch(op)(cache, slots, lay)


def sparse_attention_fp8kv(q: torch.Tensor, cache: torch.Tensor, indices: torch.Tensor, scale: float,
                           layout: str = "v4", *, block_table: torch.Tensor | None = None,
                           sink: torch.Tensor | None = None, v_dim: int | None = None,
                           return_lse: bool = False) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """`sparse_attention` with its KV rows read from an FP8 (or int8) cache: the same math, dtypes,
    sink and LSE over the dequantized rows (`kv_cache_fp8_read`). q `[B, S, H, D]` (D = layout's nope +
    rope; BF16 is what the kernels take); indices `[B, S, K]` int, -1 = no entry: without
    block_table, slots of the cache; with block_table `[B, max_blocks]` int (block ids, unused
    entries any valid id), sequence b's positions in [0, max_blocks * block_size).
    V4: v_dim = D (shared-KV MQA); V3.2 (MLA absorbed): v_dim = 512 (the latent).
    """
    op = "sparse_attention_fp8kv"
    lay = _layout(op, layout)
    _cache(op, cache, lay)
    _check.tensor(op, "q", q, dtypes=FLOATS, ndim=4)
    b, s, h, d = q.shape
    _check.equal(op, "q", d, lay.dim, f"head dim = {lay.nope} nope + {lay.rope} rope ({lay.name})")
    _check.tensor(op, "indices", indices, dtypes=INDEX, ndim=3)
    if tuple(indices.shape[:2]) != (b, s):
        raise _check.OpInputError(op, "indices", f"shape [{b}, {s}, K] ([B, S] of q)", _check.describe(indices))
    _check.positive_float(op, "scale", scale)
    if sink is not None:
        _check.tensor(op, "sink", sink, dtypes=FLOATS, ndim=1)
        _check.shape(op, "sink", sink, (h,), "one logit per query head")
    v_dim = d if v_dim is None else _check.positive_int(op, "v_dim", v_dim)
    if v_dim > d:
        raise _check.OpInputError(op, "v_dim", f"at most the head dim {d}", v_dim)
    values = _check.Values(op)
    if block_table is None:
        _slots(op, "indices", indices, cache, values)
    else:
        _block_table(op, block_table, cache, b, values)
        bs = cache.shape[1]
        span = block_table.shape[1] * bs
        values.in_range("indices", indices, -1, span, f"-1 = none; positions of the {block_table.shape[1]} "
                        f"blocks of {bs} tokens a sequence's block table names")
    _check.same_device(op, q=q, cache=cache, indices=indices, block_table=block_table, sink=sink)
    values.decide()
    slots = indices if block_table is None else paged_slots(indices, block_table, cache.shape[1])
    # need_lse: a backend may run a kernel that has no LSE output when none is asked for.
    out, lse = dispatch(op)(q, cache, slots, float(scale), lay, sink, v_dim, need_lse=return_lse)
    return (out, lse) if return_lse else out


def _block_table(op: str, block_table: torch.Tensor, cache: torch.Tensor, batch: int, values: _check.Values) -> None:
    _check.tensor(op, "block_table", block_table, dtypes=INDEX, ndim=2)
    if block_table.shape[0] != batch:
        raise _check.OpInputError(op, "block_table", f"shape [{batch}, max_blocks] (batch of q)",
                                  _check.describe(block_table))
    blocks = cache.shape[0]
    values.in_range("block_table", block_table, 0, blocks, f"block ids; cache has {blocks} blocks")


def indexer_scores_fp8kv(q: torch.Tensor, cache: torch.Tensor, weights: torch.Tensor, scale: float,
                         block_table: torch.Tensor, layout: str = "index") -> torch.Tensor:
    """`indexer_scores` with the keys read from an FP8 cache: sequence b's key t is the dequantized
    row at position t of its block table `[B, M]` (T = M * block_size positions; positions never
    written read as zero rows, score 0: mask them with `indexer_topk`'s positions). q `[B, S, H, D]`
    (D = the layout's row), weights `[B, S, H]`. Returns `[B, S, T]` float32 (float64 if q is)."""
    op = "indexer_scores_fp8kv"
    lay = _layout(op, layout)
    _cache(op, cache, lay)
    _check.tensor(op, "q", q, dtypes=FLOATS, ndim=4)
    b, s, h, d = q.shape
    _check.equal(op, "q", d, lay.dim, f"head dim = the {lay.name} layout's {lay.dim} values")
    _check.tensor(op, "weights", weights, dtypes=FLOATS, ndim=3)
    _check.shape(op, "weights", weights, (b, s, h), "[B, S, H] of q")
    _check.positive_float(op, "scale", scale)
    values = _check.Values(op)
    _block_table(op, block_table, cache, b, values)
    _check.same_device(op, q=q, cache=cache, weights=weights, block_table=block_table)
    values.decide()
    t = block_table.shape[1] * cache.shape[1]
    positions = torch.arange(t, device=q.device).expand(b, 1, t)
    return dispatch(op)(q, cache, paged_slots(positions, block_table, cache.shape[1]).squeeze(1), weights,
                        float(scale), lay)


def paged_slots(indices: torch.Tensor, block_table: torch.Tensor, block_size: int) -> torch.Tensor:
    """Cache slots of positions `indices` `[B, S, K]` (-1 kept) through `block_table` `[B, M]`.
    Index arithmetic (checked by the caller), nothing dispatched."""
    pos = indices.long().clamp(min=0)
    blocks = block_table.long().gather(1, (pos // block_size).flatten(1)).view_as(pos)
    return torch.where(indices >= 0, blocks * block_size + pos % block_size, -1)
