"""Attention over an FP8 cache that dequantizes only the rows the queries select (decode reads
the bytes of its top-k + window rows, not the whole cache), then runs `sparse_attention` on
whichever backend the registry picks for it. Writing and reading are the reference's."""

import torch

from v4hal.backends import registry

reference = registry.parent_family(__name__)


def sparse_attention_fp8kv(q, cache, slots, scale, lay, sink, v_dim, need_lse=True):
    if slots.shape[1] == 1 or slots.device.type == "meta":
        # Decode (and shape-only runs: unique has no Meta kernel): each query's own rows, in
        # order, with no host synchronisation; a row two batch rows pick is read twice.
        b, s, k = slots.shape
        rows = reference.kv_cache_fp8_read(cache, slots.clamp(min=0).reshape(b, s * k), lay)
        local = torch.arange(s * k, device=slots.device).view(1, s, k).expand(b, -1, -1)
    else:  # prefill: queries share rows, so each distinct row is read once
        picked, local = torch.unique(slots.clamp(min=0), return_inverse=True)
        rows = reference.kv_cache_fp8_read(cache, picked, lay).unsqueeze(0).expand(q.shape[0], -1, -1)
    local = torch.where(slots >= 0, local, -1)
    return registry.dispatch("sparse_attention")(q, rows, local, scale, sink, v_dim)


def indexer_scores_fp8kv(q, cache, slots, weights, scale, lay):
    keys = reference.kv_cache_fp8_read(cache, slots, lay)
    return registry.dispatch("indexer_scores")(q, keys.to(q.dtype), weights, scale)
