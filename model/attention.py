"""What DeepSeek's attention layers share: V4's (`model.attention_v4`: sliding / CSA / HCA) and
V3.2's (`model.attention_v32`: MLA + DSA), both built only from `v4hal.ops`, holding their weights
under the official HF tensor names, and called the same way:

    cfg = V4AttentionConfig.from_hf(hf_config, layer_idx)     # or V4AttentionConfig(...) from ints
    attn = V4Attention(cfg)                                   # state_dict keys = transformers'
    cache = attn.new_cache()                                  # one per layer and sequence batch
    out = attn(hidden_states, positions, cache)               # prefill: S tokens
    out = attn(next_hidden, next_positions, cache)            # decode: S = 1 (or more) tokens

    hidden_states: [B, S, hidden] float; positions: [B, S] int64 absolute positions that continue
    the cache (row b = cache.length + arange(S)); cache: the layer's cache (`model.cache`),
    filled/extended in place, or None for a one-shot prefill. Returns [B, S, hidden] in
    hidden_states' dtype. V32Attention / V32AttentionConfig have the same interface (weights named
    as transformers' DeepseekV32Attention, with its `indexer` submodule; index_heads=0 builds it
    without indexer, attending every causal token: V3's MLA).

This module holds what that call shares: reading a layer's fields from an HF config, the checks
of the call's inputs, and long prefills run in chunks.
"""

from __future__ import annotations

import torch

from v4hal import ops
from v4hal.model.cache_fp8 import FP8Rows


def _get(cfg, name, default=None):
    if isinstance(cfg, dict):
        return cfg.get(name, default)
    return getattr(cfg, name, default)


def _check_call(layer: str, x: torch.Tensor, positions: torch.Tensor, cache) -> None:
    if x.dim() != 3:
        raise ValueError(f"{layer}: hidden_states must be [B, S, hidden], got shape {tuple(x.shape)}")
    if tuple(positions.shape) != tuple(x.shape[:2]):
        raise ValueError(f"{layer}: positions must be [B, S] = {tuple(x.shape[:2])}, got {tuple(positions.shape)}")
    if not ops.may_read_values(positions):  # meta device, or V4HAL_CHECKS=shapes
        return
    want = list(range(cache.length, cache.length + x.shape[1]))
    if any(row != want for row in positions.tolist()):
        raise ValueError(f"{layer}: positions must continue the cache, which holds {cache.length} token(s) "
                         f"(expected {cache.length}..{cache.length + x.shape[1] - 1}, got first position "
                         f"{int(positions[0, 0])}); pass the cache the earlier tokens filled")


def _check_static_call(layer: str, x: torch.Tensor, positions: torch.Tensor) -> None:
    if x.dim() != 3 or x.shape[1] != 1:
        raise ValueError(f"{layer}: a static cache decodes one token per sequence: hidden_states must be "
                         f"[B, 1, hidden], got shape {tuple(x.shape)}")
    if tuple(positions.shape) != tuple(x.shape[:2]):
        raise ValueError(f"{layer}: positions must be [B, 1] = {tuple(x.shape[:2])}, got {tuple(positions.shape)}")
    if ops.may_read_values(positions) and bool((positions != positions[0]).any()):
        raise ValueError(f"{layer}: a static cache decodes every sequence at the same position, got positions "
                         f"{positions.flatten().tolist()}")


def _index_select(qi: torch.Tensor, keys, weights: torch.Tensor, scale: float, topk: int,
                  positions: torch.Tensor, ratio: int, tp) -> torch.Tensor:
    """The indexer's top-k picks among `keys` (a `[B, T, D]` tensor, or an FP8 cache:
    `model.cache_fp8.FP8Rows`); under tensor parallelism (`tp`, a `model.collectives` group)
    this rank's heads give partial scores, summed over the group before the selection."""
    if isinstance(keys, FP8Rows):
        scores = keys.scores(qi, weights, scale)
    elif tp.size == 1:
        return ops.indexer_select(qi, keys, weights, scale, topk, positions, ratio)
    else:
        scores = ops.indexer_scores(qi, keys, weights, scale)
    scores = tp.all_reduce(scores)
    return ops.indexer_topk(scores, min(topk, scores.shape[-1]), positions, ratio)


def _chunked(step, x: torch.Tensor, positions: torch.Tensor, cache, chunk: int) -> torch.Tensor:
    """Long prefills run `chunk` queries at a time through the cache: same result, and the
    per-query temporaries (q of every head, gathered rows) stay bounded."""
    if x.shape[1] <= chunk:
        return step(x, positions, cache)
    first = step(x[:, :chunk], positions[:, :chunk], cache)
    out = first.new_empty(x.shape[0], x.shape[1], first.shape[-1])
    out[:, :chunk] = first
    for i in range(chunk, x.shape[1], chunk):
        out[:, i:i + chunk] = step(x[:, i:i + chunk], positions[:, i:i + chunk], cache)
    return out
