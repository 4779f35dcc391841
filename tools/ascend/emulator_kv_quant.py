"""Emulated `npu_kv_quant_sparse_flash_attention`: sparse MLA-absorb attention over an int8 KV
cache whose records hold their own scales (torch-npu 2.13.0's docs; the constraints its docs leave
out are taken from vllm-ascend's README of the same kernel, `csrc/attention/
kv_quant_sparse_flash_attention/README.md`, and marked so below).

Per key token, D = 656 bytes: 512 int8 codes ("int8的k_nope"), 64 values of the query's dtype
("query相同dtype的k_rope", 128 bytes) and 4 float32 scales ("float32的量化参数"), one per 128
codes (tile_size 128, key_quant_mode 2 = per tile, quant_scale_repo_mode 1 = combine). A code
reads back as `code * scale` (vllm-ascend's test of the op) rounded to bfloat16: the cube unit
takes 16-bit inputs (that test's reference rounds there too). attention_mode 2 (MLA-absorb, "KV是
同一份"): the value is the key's dequantized 512-value latent, the output `[B, S, N, D_q - 64]`.
Paged KV (PA_BSND) with block_table and actual_seq_lengths_kv (required there, README) is
emulated; BSND/TND KV, TND queries and sparse_block_size > 1 are not.
"""

from __future__ import annotations

import torch

from v4hal.tools.ascend.emulator import contiguous, dims_in, dtype_in, f32, op, require, shape_is, unsupported
from v4hal.tools.ascend.emulator_attention import INT64_MAX, _attend, _softmax_rows

NAME = "npu_kv_quant_sparse_flash_attention"
NOPE, ROPE, TILE = 512, 64, 128
KEY_D = NOPE + 2 * ROPE + 4 * (NOPE // TILE)  # 656
HEADS = (1, 2, 4, 8, 16, 32, 64, 128)  # README: Q_N 1/2/4/8/16/32/48/64/128, 48 not on A2/A3


def dequantize(records: torch.Tensor) -> torch.Tensor:
    """Key rows `[..., 576]` float32 (bf16-exact) of int8 records `[..., 656]`."""
    raw = records.contiguous().view(torch.uint8)
    codes = raw[..., :NOPE].view(torch.int8).float()
    rope = raw[..., NOPE:NOPE + 2 * ROPE].contiguous().view(torch.bfloat16).float()
    scale = raw[..., NOPE + 2 * ROPE:].contiguous().view(torch.float32)
    nope = (codes.unflatten(-1, (NOPE // TILE, TILE)) * scale.unsqueeze(-1)).flatten(-2)
    return torch.cat([nope.to(torch.bfloat16).float(), rope], -1)


@op(NAME)
def npu_kv_quant_sparse_flash_attention(chip, query, key, value, sparse_indices, scale_value, key_quant_mode,
                                        value_quant_mode, *, key_dequant_scale=None, value_dequant_scale=None,
                                        block_table=None, actual_seq_lengths_query=None, actual_seq_lengths_kv=None,
                                        sparse_block_size=1, layout_query="BSND", layout_kv="BSND", sparse_mode=3,
                                        pre_tokens=INT64_MAX, next_tokens=INT64_MAX, attention_mode=0,
                                        quant_scale_repo_mode=1, tile_size=128, rope_head_dim=64, key_dtype=None,
                                        value_dtype=None):
    """Each query row attends to the key tokens its index list names (positions of its sequence,
    through block_table): the valid prefix before the first -1, positions below the sequence's
    actual KV length (sparse_mode 0; 3 also cuts at the right-down causal line). Returns the
    output only (the op has no softmax max/sum outputs)."""
    dtype_in(NAME, "query", query, (torch.bfloat16,))  # the torch-npu docs: bfloat16 only
    dtype_in(NAME, "key", key, (torch.int8,))
    dtype_in(NAME, "value", value, (torch.int8,))
    for arg, t in (("query", query), ("key", key), ("value", value), ("sparse_indices", sparse_indices)):
        contiguous(NAME, arg, t)
    require(key_quant_mode == 2 and value_quant_mode == 2, NAME,
            f"key_quant_mode / value_quant_mode must be 2 (per tile), got {key_quant_mode} / {value_quant_mode}")
    require(attention_mode == 2, NAME, f"attention_mode must be 2 (MLA-absorb), got {attention_mode}")
    require(quant_scale_repo_mode == 1, NAME, f"quant_scale_repo_mode must be 1 (combine), got {quant_scale_repo_mode}")
    require(tile_size == TILE and rope_head_dim == ROPE, NAME,
            f"tile_size must be {TILE} and rope_head_dim {ROPE}, got {tile_size} / {rope_head_dim}")
    require(sparse_mode in (0, 3), NAME, f"sparse_mode must be 0 or 3, got {sparse_mode}")
    require(key_dequant_scale is None and value_dequant_scale is None, NAME,
            "key_dequant_scale / value_dequant_scale are reserved (预留参数, 当前不支持): pass None")
    require(key_dtype is None and value_dtype is None, NAME, "key_dtype / value_dtype are for hifloat8 keys only")
    require((pre_tokens, next_tokens) == (INT64_MAX, INT64_MAX), NAME, "pre_tokens / next_tokens only 2^63-1 (README)")
    if layout_query != "BSND" or layout_kv != "PA_BSND":
        unsupported(NAME, f"layout_query={layout_query!r}, layout_kv={layout_kv!r} (only BSND + PA_BSND)")
    if sparse_block_size != 1:
        unsupported(NAME, f"sparse_block_size={sparse_block_size}")
    if actual_seq_lengths_query is not None:
        unsupported(NAME, "actual_seq_lengths_query")
    dims_in(NAME, "query", query, (4,))
    b, s1, n1, d = query.shape
    require(d == NOPE + ROPE, NAME, f"query D must be {NOPE + ROPE} (q_nope 512 + q_rope 64, README), got {d}")
    require(n1 in HEADS, NAME, f"query heads must be one of {HEADS} on {chip}, got {n1}")
    dims_in(NAME, "key", key, (4,))
    blocks, block_size, kv_n, key_d = key.shape
    require(kv_n == 1 and key_d == KEY_D, NAME, f"key must be [block_num, block_size, 1, {KEY_D}] (KV_N 1, "
            f"512 + 64*2 + 4*4 bytes), got {tuple(key.shape)}")
    require(block_size % 16 == 0 and block_size <= 1024, NAME,
            f"block_size must be a multiple of 16 up to 1024 (README), got {block_size}")
    require(value.shape[:3] == key.shape[:3], NAME, f"value shape {tuple(value.shape)} must match key's first dims")
    require(block_table is not None and actual_seq_lengths_kv is not None, NAME,
            "PA_BSND needs block_table and actual_seq_lengths_kv")
    dtype_in(NAME, "block_table", block_table, (torch.int32,))
    dtype_in(NAME, "actual_seq_lengths_kv", actual_seq_lengths_kv, (torch.int32,))
    require(block_table.dim() == 2 and block_table.shape[0] == b, NAME,
            f"block_table must be [B={b}, max_blocks], got {tuple(block_table.shape)}")
    shape_is(NAME, "actual_seq_lengths_kv", actual_seq_lengths_kv, (b,))
    span = block_table.shape[1] * block_size
    require(bool(((actual_seq_lengths_kv >= 0) & (actual_seq_lengths_kv <= span)).all()), NAME,
            f"actual_seq_lengths_kv must be in [0, {span}] (the block table's positions)")
    require(bool(((block_table >= 0) & (block_table < blocks)).all()), NAME, f"block ids must be in [0, {blocks})")
    dtype_in(NAME, "sparse_indices", sparse_indices, (torch.int32,))
    require(sparse_indices.dim() == 4 and tuple(sparse_indices.shape[:3]) == (b, s1, 1) and sparse_indices.shape[3] > 0,
            NAME, f"sparse_indices must be [B, Q_S, KV_N, K] = [{b}, {s1}, 1, K>0], got {tuple(sparse_indices.shape)}")
    idx = sparse_indices[:, :, 0].long()  # [B, S1, K] positions
    valid = torch.cumprod((idx >= 0).to(torch.int64), dim=-1).bool()  # the prefix before the first -1
    limit = actual_seq_lengths_kv.long().view(b, 1, 1)
    if sparse_mode == 3:
        limit = limit - s1 + torch.arange(s1).view(1, s1, 1) + 1
    valid &= idx < limit
    pos = torch.where(valid, idx, 0)
    slots = block_table.long().gather(1, (pos // block_size).flatten(1)).view_as(pos) * block_size + pos % block_size
    rows = dequantize(key.view(blocks * block_size, KEY_D)[slots])  # [B, S1, K, 576]
    logits = torch.einsum("bshd,bskd->bshk", f32(query), rows) * scale_value
    p, _, row_sum = _softmax_rows(logits, valid.unsqueeze(2))
    return _attend(p, row_sum, rows[..., :NOPE].unsqueeze(2), query.dtype)
