"""Emulated attention kernels: `npu_lightning_indexer`, `npu_sparse_flash_attention`,
`npu_fused_infer_attention_score_v2` (BSND layout, contiguous KV: what the backend passes).

Precision (our reading, docs/ascend.md): Q.K^T from half inputs accumulates in float32; softmax and
the probabilities' product with V stay in float32 (FIA's inner_precise=0 is documented as the
high-precision mode; the backend never asks for the high-performance one); the output is rounded
to the output dtype once.
Paged KV (PA_BSND + block_table), TND packing and per-batch actual lengths are not emulated.
"""

from __future__ import annotations

import torch

from v4hal.tools.ascend.emulator import HALF, contiguous, dims_in, dtype_in, f32, op, require, shape_is, unsupported

INT64_MAX = 9223372036854775807
INT32_MAX = 2147483647
SPARSE_COUNTS = set(range(1, 2049)) | {3072, 4096, 5120, 6144, 7168, 8192}
OPTIMISED_MASK = 2048  # side of the compressed mask sparse_mode 2/3/4 take
MAX_GROUP = 64  # num_query_heads / num_key_value_heads
FIA_CHIPS = ("A2", "A3")


def _bsnd_only(name, layouts, **unsupported_args):
    for arg, value in layouts.items():
        if value != "BSND":
            unsupported(name, f"{arg}={value!r} (only BSND is emulated)")
    for arg, value in unsupported_args.items():
        if value is not None:
            unsupported(name, f"{arg}")


def _half_inputs(name, **tensors):
    """bf16/fp16, contiguous, 4-D (BSND), all of one dtype."""
    dtypes = {t.dtype for t in tensors.values()}
    for arg, t in tensors.items():
        dtype_in(name, arg, t, HALF)
        contiguous(name, arg, t)
        dims_in(name, arg, t, (4,))
    require(len(dtypes) == 1, name, f"{', '.join(tensors)} must share one dtype, got {sorted(map(str, dtypes))}")


def _causal_limit(s1: int, s2: int, mode: int) -> torch.Tensor | None:
    """Per query row, the last key it may see (rightDownCausal: i + S2 - S1), None for mode 0."""
    return None if mode == 0 else torch.arange(s1) + (s2 - s1)


@op("npu_lightning_indexer")
def npu_lightning_indexer(chip, query, key, weights, *, actual_seq_lengths_query=None, actual_seq_lengths_key=None,
                          block_table=None, layout_query="BSND", layout_key="BSND", sparse_count=2048,
                          sparse_mode=3, pre_tokens=INT64_MAX, next_tokens=INT64_MAX, return_value=False):
    """score[b, s, t] = sum_h weights[b, s, h] * relu(query[b, s, h] . key[b, t]) (float32), no
    scale of its own; the top `sparse_count` keys by score, best first, -1 where fewer keys are
    visible. sparse_mode 3 (rightDownCausal): row i sees keys t <= i + S2 - S1; 0: all keys."""
    name = "npu_lightning_indexer"
    _bsnd_only(name, {"layout_query": layout_query, "layout_key": layout_key},
               actual_seq_lengths_query=actual_seq_lengths_query, actual_seq_lengths_key=actual_seq_lengths_key,
               block_table=block_table)
    _half_inputs(name, query=query, key=key)
    dtype_in(name, "weights", weights, HALF)
    contiguous(name, "weights", weights)
    b, s1, n1, d = query.shape
    s2, n2 = key.shape[1], key.shape[2]
    shape_is(name, "key", key, (b, s2, n2, d))
    shape_is(name, "weights", weights, (b, s1, n1))
    require(sparse_count in SPARSE_COUNTS, name,
            f"sparse_count must be in 1-2048 or 3072..8192 by 1024, got {sparse_count}")
    require(sparse_mode in (0, 3), name, f"sparse_mode must be 0 or 3, got {sparse_mode}")
    if n2 != 1:
        unsupported(name, f"key heads N2={n2} (only N2=1 is emulated)")
    if (pre_tokens, next_tokens) != (INT64_MAX, INT64_MAX):
        unsupported(name, "pre_tokens / next_tokens")
    logits = torch.einsum("bshd,btd->bsht", f32(query), f32(key[:, :, 0]))
    scores = (logits.relu() * f32(weights).unsqueeze(-1)).sum(2)  # [B, S1, S2]
    limit = _causal_limit(s1, s2, sparse_mode)
    if limit is not None:
        scores = scores.masked_fill(torch.arange(s2) > limit.unsqueeze(-1), float("-inf"))
    k = min(sparse_count, s2)
    values, idx = torch.sort(scores, dim=-1, descending=True, stable=True)
    values, idx = values[..., :k], idx[..., :k]
    idx = torch.where(values == float("-inf"), -1, idx)
    out = torch.full((b, s1, 1, sparse_count), -1, dtype=torch.int32)
    out[:, :, 0, :k] = idx.int()
    vals = torch.zeros(0, dtype=query.dtype)
    if return_value:
        vals = torch.zeros((b, s1, 1, sparse_count), dtype=query.dtype)
        vals[:, :, 0, :k] = values.to(query.dtype)
    return out, vals


def _softmax_rows(logits, valid, sink=None):
    """Row max / sum over the valid logits (and a sink logit per head, counted as one more key
    with a zero value), and the probabilities. Empty rows without sink: max -inf, sum 0."""
    masked = logits.masked_fill(~valid, float("-inf"))
    row_max = masked.amax(-1)
    if sink is not None:
        row_max = torch.maximum(row_max, sink)
    safe_max = torch.where(torch.isinf(row_max), torch.zeros_like(row_max), row_max)
    p = torch.exp(masked - safe_max.unsqueeze(-1))
    row_sum = p.sum(-1)
    if sink is not None:
        row_sum = row_sum + torch.exp(sink - safe_max)
    return p, row_max, row_sum


def _attend(p, row_sum, value_rows, out_dtype):
    """(p / sum) times the value rows in float32 (inner_precise=0, the documented high-precision
    default), rounded to the output dtype."""
    denom = torch.where(row_sum > 0, row_sum, torch.ones_like(row_sum))
    probs = p / denom.unsqueeze(-1)
    return torch.einsum("...k,...kd->...d", f32(probs), f32(value_rows)).to(out_dtype)


@op("npu_sparse_flash_attention")
def npu_sparse_flash_attention(chip, query, key, value, sparse_indices, scale_value, *, block_table=None,
                               actual_seq_lengths_query=None, actual_seq_lengths_kv=None, query_rope=None,
                               key_rope=None, sparse_block_size=1, layout_query="BSND", layout_kv="BSND",
                               sparse_mode=3, pre_tokens=INT64_MAX, next_tokens=INT64_MAX, attention_mode=0,
                               return_softmax_lse=False, sinks=None):
    """Each query row attends to the KV rows its index list names: logits = scale * (q . k
    [+ q_rope . k_rope in attention_mode 2, MLA-absorb, where value is the key latent]). The
    docs require every row's valid indices first: the kernel reads the prefix before the first
    -1. sinks [N1]: a per-head logit added to the softmax denominator. Returns (out, softmax_max,
    softmax_sum), the LSE parts `[B, KV_N, S1, N1 / KV_N]` float32 with lse = max + log(sum)."""
    name = "npu_sparse_flash_attention"
    _bsnd_only(name, {"layout_query": layout_query, "layout_kv": layout_kv}, block_table=block_table,
               actual_seq_lengths_query=actual_seq_lengths_query, actual_seq_lengths_kv=actual_seq_lengths_kv)
    value = key if value is None else value
    _half_inputs(name, query=query, key=key, value=value)
    b, s1, n1, d = query.shape
    s2, kv_n = key.shape[1], key.shape[2]
    shape_is(name, "key", key, (b, s2, kv_n, d))
    require(value.shape[:3] == key.shape[:3], name, f"value shape {tuple(value.shape)} must match key's B, S, N")
    require(value.shape[-1] == d, name, f"value D must equal query D ({d}): the output is query-shaped")
    require(kv_n >= 1 and n1 % kv_n == 0, name, f"query heads {n1} must be a multiple of KV heads {kv_n}")
    dtype_in(name, "sparse_indices", sparse_indices, (torch.int32,))
    contiguous(name, "sparse_indices", sparse_indices)
    require(sparse_indices.dim() == 4 and tuple(sparse_indices.shape[:3]) == (b, s1, kv_n), name,
            f"sparse_indices must be [B, Q_S, KV_N, K] = [{b}, {s1}, {kv_n}, K], got {tuple(sparse_indices.shape)}")
    require(sparse_mode in (0, 3), name, f"sparse_mode must be 0 or 3, got {sparse_mode}")
    require(attention_mode in (0, 2), name, f"attention_mode must be 0 or 2, got {attention_mode}")
    if sparse_block_size != 1:
        unsupported(name, f"sparse_block_size={sparse_block_size}")
    if (pre_tokens, next_tokens) != (INT64_MAX, INT64_MAX):
        unsupported(name, "pre_tokens / next_tokens")
    if kv_n != 1:
        unsupported(name, f"KV_N={kv_n} (only one KV head is emulated)")
    logits = torch.einsum("bshd,bkd->bshk", f32(query), f32(key[:, :, 0]))
    if attention_mode == 2:
        require(query_rope is not None and key_rope is not None, name, "attention_mode=2 (MLA-absorb) needs query_rope and key_rope")
        _half_inputs(name, query=query, query_rope=query_rope, key_rope=key_rope)
        r = query_rope.shape[-1]
        shape_is(name, "query_rope", query_rope, (b, s1, n1, r))
        shape_is(name, "key_rope", key_rope, (b, s2, kv_n, r))
        logits = logits + torch.einsum("bshd,bkd->bshk", f32(query_rope), f32(key_rope[:, :, 0]))
    else:
        require(query_rope is None and key_rope is None, name, "query_rope / key_rope are for attention_mode=2 only")
    logits = logits * scale_value  # [B, S1, N1, S2]
    idx = sparse_indices[:, :, 0].long()  # [B, S1, K]
    require(bool((idx < s2).all()), name, f"sparse_indices must be < KV_S ({s2}): an index past the cache")
    # The valid prefix: everything from the first -1 on is ignored.
    valid = torch.cumprod((idx >= 0).to(torch.int64), dim=-1).bool()
    limit = _causal_limit(s1, s2, sparse_mode)
    if limit is not None:
        valid &= idx <= limit.view(1, s1, 1)
    safe = idx.clamp_min(0)
    picked = torch.gather(logits, 3, safe.unsqueeze(2).expand(b, s1, n1, -1))  # [B, S1, N1, K]
    sink = None
    if sinks is not None:
        dtype_in(name, "sinks", sinks, (torch.float32, torch.bfloat16))
        shape_is(name, "sinks", sinks, (n1,))
        sink = f32(sinks).view(1, 1, n1)
    p, row_max, row_sum = _softmax_rows(picked, valid.unsqueeze(2), sink)
    rows = value[:, :, 0][torch.arange(b).view(b, 1, 1), safe]  # [B, S1, K, D]
    out = _attend(p, row_sum, rows.unsqueeze(2), query.dtype)
    if not return_softmax_lse:
        return out, torch.zeros(0), torch.zeros(0)
    return out, row_max.unsqueeze(1), row_sum.unsqueeze(1)  # [B, KV_N=1, S1, N1]


def _check_mask(name, mask, mode):
    if mode in (2, 3, 4):
        require(mask is not None, name, f"sparse_mode={mode} needs the optimised 2048x2048 atten_mask")
        dtype_in(name, "atten_mask", mask, (torch.bool, torch.int8, torch.uint8))
        require(mask.shape[-2:] == (OPTIMISED_MASK, OPTIMISED_MASK) and mask.numel() == OPTIMISED_MASK ** 2, name,
                f"sparse_mode={mode}: atten_mask must be (2048, 2048), (1, 2048, 2048) or (1, 1, 2048, 2048), "
                f"got {tuple(mask.shape)}")
        want = torch.triu(torch.ones(OPTIMISED_MASK, OPTIMISED_MASK, dtype=torch.bool), diagonal=1)
        require(torch.equal(mask.reshape(OPTIMISED_MASK, OPTIMISED_MASK).bool(), want), name,
                "atten_mask must be the compressed lower-triangular matrix (1 = masked above the diagonal)")
    elif mask is not None:
        unsupported(name, f"a full atten_mask with sparse_mode={mode}")


@op("npu_fused_infer_attention_score_v2", chips=FIA_CHIPS)
def npu_fused_infer_attention_score_v2(chip, query, key, value, *, atten_mask=None, learnable_sink=None,
                                       num_query_heads=1, num_key_value_heads=0, softmax_scale=1.0,
                                       pre_tokens=INT32_MAX, next_tokens=INT32_MAX, input_layout="BSH",
                                       sparse_mode=0, return_softmax_lse=False, **rest):
    """Dense attention; masks: sparse_mode 0 (none without atten_mask), 2 leftUpCausal (j <= i),
    3 rightDownCausal (j <= i + S2 - S1), 4 band from the right-down corner (i' = i + S2 - S1 sees
    i' - pre_tokens <= j <= i' + next_tokens). With one query row the mode and pre/next tokens are
    ignored. LSE `[B, N, S, 1]` float32."""
    name = "npu_fused_infer_attention_score_v2"
    for arg, v in rest.items():
        if v not in (None, 0, False):
            unsupported(name, f"{arg}={v!r}")
    _bsnd_only(name, {"input_layout": input_layout})
    _half_inputs(name, query=query, key=key, value=value)
    b, s1, n, d = query.shape
    s2, kv_n = key.shape[1], key.shape[2]
    require(value.shape == key.shape and key.shape[-1] == d, name, "key and value must be [B, KV_S, KV_N, D] with query's D")
    require(num_query_heads == n, name, f"num_query_heads ({num_query_heads}) must equal query's N ({n})")
    kv_heads = num_key_value_heads or n
    require(kv_heads == kv_n, name, f"num_key_value_heads ({num_key_value_heads}) must equal key's N ({kv_n}) in BSND")
    require(n % kv_n == 0 and n // kv_n <= MAX_GROUP, name,
            f"num_query_heads / num_key_value_heads must be an integer <= {MAX_GROUP}, got {n} / {kv_n}")
    require(d <= 512 and d % 16 == 0 and n * d < 65535, name, f"D must be a multiple of 16, <= 512, N*D < 65535; got N={n}, D={d}")
    if learnable_sink is not None:
        require(input_layout in ("TND", "NTD_TND"), name, f"learnable_sink is only supported with TND / NTD_TND, not {input_layout}")
    if s1 > 1:
        require(sparse_mode in (0, 1, 2, 3, 4), name, f"sparse_mode must be 0-4, got {sparse_mode}")
        if sparse_mode == 1:
            unsupported(name, "sparse_mode=1 (allMask)")
        _check_mask(name, atten_mask, sparse_mode)
    elif atten_mask is not None:
        unsupported(name, "atten_mask with one query row")
    i = torch.arange(s1).unsqueeze(-1)
    j = torch.arange(s2)
    if s1 == 1 or sparse_mode == 0:
        valid = torch.ones(s1, s2, dtype=torch.bool)
    elif sparse_mode == 2:
        valid = j <= i
    elif sparse_mode == 3:
        valid = j <= i + (s2 - s1)
    else:
        require(pre_tokens + next_tokens >= 0, name, "band: pre_tokens and next_tokens must overlap")
        diag = i + (s2 - s1)
        valid = (j >= diag - pre_tokens) & (j <= diag + next_tokens)
    group = n // kv_n
    k_rows = key.repeat_interleave(group, dim=2)
    v_rows = value.repeat_interleave(group, dim=2)
    logits = torch.einsum("bshd,bthd->bhst", f32(query), f32(k_rows)) * softmax_scale
    p, row_max, row_sum = _softmax_rows(logits, valid)
    out = _attend(p, row_sum, v_rows.transpose(1, 2).unsqueeze(2), query.dtype).transpose(1, 2).contiguous()
    if not return_softmax_lse:
        return out, torch.zeros(1)
    return out, (row_max + torch.log(row_sum)).unsqueeze(-1)
