"""Sparse attention on Ascend through CANN's fused kernels (torch-npu 2.13.0 schemas).

- `npu_lightning_indexer(query, key, weights, *, ..., layout_query, layout_key, sparse_count,
  sparse_mode)`: query `[B, S1, N1, D]`, key `[B, S2, N2=1, D]`, weights `[B, S1, N1]`, bf16/fp16;
  returns int32 indices `[B, S1, N2, sparse_count]` of `sum_h w_h relu(q_h . k)` (no scale: a
  positive scale does not change the ranking, so the weights go in as they are, in q's dtype).
  sparse_mode=3 is right-down causal (query i of S1 sees keys j <= i + S2 - S1), which is exactly
  V3.2's token-level causality when the queries are the last S1 keys; sparse_mode=0 sees everything. V4's compressed-granularity causality
  (t < (p + 1) // ratio) has no mode of its own, so V4's selection (ratio > 1) runs the chunked
  torch path on the NPU; so do sparse_count values the kernel does not take (1..2048, 3072..8192
  by 1024), float32 inputs and weights of another dtype than q (rounding them would move scores).
- `npu_sparse_flash_attention(query, key, value, sparse_indices, scale_value, *, ...,
  layout_query, layout_kv, sparse_mode, attention_mode, return_softmax_lse, sinks)`: indices
  `[B, S1, KV_N=1, K]` int32 with the valid ones first (we sort -1 slots to the end),
  sparse_mode=0 (our indices already encode causality and the window), `sinks` = V4's per-head
  sink. V3.2's absorbed MLA uses attention_mode=2 (query/key split into the latent part and
  query_rope/key_rope, value = key latent); V4's shared KV (value = all of K) uses mode 0.
  The log-sum-exp comes back as (softmax_max, softmax_sum) `[B, KV_N, S1, N1]`: lse = max + log(sum).
- `npu_fused_infer_attention_score_v2(query, key, value, *, atten_mask, learnable_sink,
  num_query_heads, num_key_value_heads, softmax_scale, pre_tokens, next_tokens, input_layout,
  sparse_mode, return_softmax_lse)` runs `window_attention` (sliding-only layers): band mode
  sparse_mode=4 with pre_tokens = window - 1, next_tokens = 0 and the optimised 2048x2048 mask
  the docs require; decode (one query, where the docs say pre/next tokens are ignored) passes
  only the last `window` rows. The docs cap query heads per KV head at 64, so V4-Pro's 128 heads
  run as two head groups. Its learnable_sink is documented for the TND layouts with D <= 128
  only, so a sink (V4's 512-dim heads always have one) takes the gather path; the LSE comes back
  `[B, N, S, 1]`. The docs list this kernel for A2/A3; on A5 the gather path runs. In CSA/HCA
  layers the window reaches `npu_sparse_flash_attention` as a second index list, so one sparse
  call covers window + compressed entries.
Layouts: BSND here; TND (packed variable-length batches) and PA_BSND (paged KV with a block
table) are what a paged serving cache would pass; our cache is contiguous per layer.
Not verified on hardware (no Ascend machine available): checked by schema and Meta dry run.
"""

import torch

from v4hal.backends import ascend, registry
from v4hal.backends.ascend import npu

parent = registry.parent_family(__name__)

KERNEL_DTYPES = (torch.bfloat16, torch.float16)
MAX_GROUP = 64  # query heads per KV head the fused-infer-attention kernel takes
BAND_MASK = 2048  # side of the optimised mask the band/causal sparse modes take
FIA_CHIPS = ("A2", "A3")
SPARSE_COUNTS = set(range(1, 2049)) | {3072, 4096, 5120, 6144, 7168, 8192}


def _right_down_causal(positions, s: int, t: int) -> bool:
    """The queries are the last s of t keys, in order (what sparse_mode=3 assumes)."""
    if positions.device.type == "meta":  # a Meta dry run has shapes only: take the kernel path
        return True
    want = torch.arange(t - s, t, device=positions.device)
    return bool((positions == want).all())


def indexer_select(q, k, weights, scale, topk, positions, ratio):
    s, t = q.shape[1], k.shape[1]
    # A positive scale multiplies every score of a row alike, so the ranking ignores it: the weights
    # go to the kernel unscaled and unrounded (folding the scale into bf16 weights moved scores by
    # up to 2^-9 relative and picked keys outside the reference's tie band).
    kernel = (q.dtype in KERNEL_DTYPES and k.dtype == q.dtype and weights.dtype == q.dtype and scale > 0
              and topk in SPARSE_COUNTS and ratio == 1 and (positions is None or _right_down_causal(positions, s, t)))
    if not kernel:
        return parent.indexer_select(q, k, weights, scale, topk, positions, ratio)
    idx, _ = npu().npu_lightning_indexer(q.contiguous(), k.unsqueeze(2).contiguous(), weights.contiguous(),
                                         layout_query="BSND", layout_key="BSND", sparse_count=topk,
                                         sparse_mode=0 if positions is None else 3)
    return idx.squeeze(2)


def sparse_attention(q, kv, indices, scale, sink, v_dim):
    if q.dtype not in KERNEL_DTYPES or kv.dtype != q.dtype:
        return parent.sparse_attention(q, kv, indices, scale, sink, v_dim)
    b, s, h, d = q.shape
    # The kernel wants every row's valid indices first.
    order = torch.argsort((indices < 0).to(torch.int8), dim=-1, stable=True)
    idx = torch.gather(indices, -1, order).to(torch.int32).unsqueeze(2).contiguous()
    sinks = None if sink is None else sink.float()
    if v_dim < d:  # absorbed MLA: latent part + rope part
        key = kv[..., :v_dim].unsqueeze(2).contiguous()
        out, smax, ssum = npu().npu_sparse_flash_attention(
            q[..., :v_dim].contiguous(), key, key, idx, scale, query_rope=q[..., v_dim:].contiguous(),
            key_rope=kv[..., v_dim:].unsqueeze(2).contiguous(), layout_query="BSND", layout_kv="BSND",
            sparse_mode=0, attention_mode=2, return_softmax_lse=True, sinks=sinks)
    else:
        key = kv.unsqueeze(2).contiguous()
        out, smax, ssum = npu().npu_sparse_flash_attention(
            q.contiguous(), key, key, idx, scale, layout_query="BSND", layout_kv="BSND", sparse_mode=0,
            attention_mode=0, return_softmax_lse=True, sinks=sinks)
    lse = (smax + torch.log(ssum)).squeeze(1)  # [B, 1, S, H] -> [B, S, H]
    return out, lse


def window_attention(q, kv, window, scale, sink):
    # The pinned docs list the v2 fused-infer kernel for A2/A3 only, and its learnable_sink for the
    # TND layouts with D <= 128 only: a sink (every V4 layer has one) takes the gather path.
    if (q.dtype not in KERNEL_DTYPES or kv.dtype != q.dtype or ascend.chip() not in FIA_CHIPS
            or sink is not None):
        return parent.window_attention(q, kv, window, scale, sink)
    s, h = q.shape[1], q.shape[2]
    if s == 1:
        key, mask, mode = kv[:, -window:].unsqueeze(2).contiguous(), None, 0
    else:
        key = kv.unsqueeze(2).contiguous()
        mask = torch.triu(torch.ones(BAND_MASK, BAND_MASK, dtype=torch.bool, device=q.device), diagonal=1)
        mode = 4
    outs, lses = [], []
    for lo in range(0, h, MAX_GROUP):
        hg = min(MAX_GROUP, h - lo)
        out, lse = npu().npu_fused_infer_attention_score_v2(
            q[:, :, lo:lo + hg].contiguous(), key, key, atten_mask=mask,
            num_query_heads=hg, num_key_value_heads=1, softmax_scale=scale, pre_tokens=window - 1,
            next_tokens=0, input_layout="BSND", sparse_mode=mode, return_softmax_lse=True)
        outs.append(out)
        lses.append(lse.squeeze(-1).transpose(1, 2))  # [B, N, S, 1] -> [B, S, N]
    return torch.cat(outs, 2), torch.cat(lses, 2)
