"""DeepSeek-V4.1's compressed attention (docs/engram.md, "V4.1's attention topology"): layers of
ratio 1 or 2 attend to their sliding window plus the top-k entries of a compressed cache that only
the KV source layers build, picked by an indexer that only the index source layers run.

A source keeps what it shares in its own cache (the compressed entries and index keys once, the
picks of the current call); the layers after it read them through `V41Cache.peers`, the list of
every layer's cache that `model.ModelCache` hands each V4.1 cache. Layers run in order, so a
source has written this call's entries and picks before a reader needs them.

Weights (HF names, DeepSeek's in brackets): KV sources `self_attn.compressor.kv_proj` [wkv],
`.gate_proj` [wgate] (ratio 2 only), `.kv_norm` [norm]; index sources
`self_attn.compressor.indexer.q_b_proj` [indexer.wq_b], `.scorer.weights_proj`
[indexer.weights_proj] and, on a layer that is also a KV source, `.k_proj` [indexer.wk] and
`.k_norm` [indexer.k_norm]. A reader has none of them.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
from torch import nn

from v4hal import ops
from v4hal.model.attention import _check_call, _check_static_call, _chunked, _index_select
from v4hal.model.attention_v4 import V4Attention, V4AttentionConfig, _rope_tail, _Scorer
from v4hal.model.cache import StaticV4Cache, StaticWindow, V4Cache, _concat, _write_if
from v4hal.model.cache_fp8 import FP8Rows, check_dims, check_dtype
from v4hal.model.collectives import SOLO, Collectives
from v4hal.model.layers import Linear, RMSNorm


class V41Cache(V4Cache):
    """A V4.1 compressed layer's eager cache: its window (`raw`), and on a source what it shares:
    `compressed` / `comp_state` / `index_keys` (KV source), `picks` `[B, S, index_topk]` (index
    source) and `blocks` `[B, S, candidate_topk_blocks]` (candidate source) of the current call,
    whose first query sits at position `call_start`; a list of the chunks while the call runs."""

    def __init__(self):
        super().__init__()
        self.peers: list | None = None
        self.picks = self.blocks = None
        self.call_start = 0

    def published(self, name: str, reader: "V41Cache", s: int) -> torch.Tensor:
        """`picks` / `blocks` of the `s` queries `reader` (a layer's cache) is running now."""
        value = getattr(self, name)
        if isinstance(value, list):  # the publishing layer itself, mid-call: this chunk's
            return value[-1]
        at = reader.length - self.call_start
        return value[:, at:at + s]


@dataclass(frozen=True)
class Candidates:
    """V4.1's two-level selection (docs/engram.md): the source's indexer publishes, per query, the
    `topk_blocks` best blocks of `block_size` entries (a block scores its best visible entry; the
    newest visible block always stays); a later indexer scores only entries in those blocks."""

    source: int
    topk_blocks: int
    block_size: int
    writes: bool

    def select(self, scores: torch.Tensor, visible: torch.Tensor) -> torch.Tensor:
        """scores `[B, S, T]`, visible `[B, S]` entries each query sees -> block ids `[B, S,
        topk_blocks]`, best first, -1 past the blocks a query has."""
        t, size = scores.shape[-1], self.block_size
        n = -(-t // size)
        entry = torch.arange(t, device=scores.device)
        seen = scores.masked_fill(entry >= visible.unsqueeze(-1), float("-inf"))
        best = torch.nn.functional.pad(seen, (0, n * size - t), value=float("-inf")).unflatten(-1, (n, size)).amax(-1)
        newest = torch.arange(n, device=scores.device) == ((visible - 1) // size).unsqueeze(-1)
        best = torch.where(newest & (visible > 0).unsqueeze(-1), float("inf"), best)
        top = best.topk(min(self.topk_blocks, n), dim=-1)
        blocks = torch.where(top.values == float("-inf"), -1, top.indices)
        return torch.nn.functional.pad(blocks, (0, self.topk_blocks - blocks.shape[-1]), value=-1)

    def mask(self, scores: torch.Tensor, blocks: torch.Tensor) -> torch.Tensor:
        """scores with every entry outside `blocks` set to -inf."""
        t, size = scores.shape[-1], self.block_size
        n = -(-t // size)
        kept = scores.new_zeros(*scores.shape[:-1], n + 1, dtype=torch.bool)  # slot n: the -1s
        kept.scatter_(-1, torch.where(blocks >= 0, blocks, n).long().clamp_max(n), True)
        return scores.masked_fill(~kept[..., torch.arange(t, device=scores.device) // size], float("-inf"))


class StaticV41Cache(StaticV4Cache):
    """`V41Cache` at fixed shapes: `rows` `[B, E + window, D]` on a KV source (entries, then the
    ring), `[B, window, D]` (the ring, E = 0) on a reader; `picks` `[B, 1, min(topk, E)]`."""

    def __init__(self, rows, entries: int, comp=None, index_keys=None):
        super().__init__(rows, entries, comp, index_keys)
        self.peers: list | None = None
        self.picks = self.blocks = None

    def published(self, name: str, reader, s: int) -> torch.Tensor:
        return getattr(self, name)  # one decode step: this step's


class V41Indexer(nn.Module):
    """An index source's indexer: query heads from the query LoRA residual, per-head weights, and
    (on a KV source) the keys `k_norm(k_proj(latent))` of the compressor's un-roped entries."""

    def __init__(self, c: V4AttentionConfig, owns_keys: bool, tp: Collectives = SOLO):
        super().__init__()
        self.heads, self.dim, self.topk, self.tp = c.index_heads // tp.size, c.index_dim, c.index_topk, tp
        self.q_b_proj = Linear(c.q_lora, self.heads * c.index_dim)
        self.scorer = _Scorer(c.hidden, self.heads)
        self.scale = (c.index_dim * c.index_heads) ** -0.5  # over all heads, wherever they are
        if owns_keys:
            self.k_proj = Linear(c.head_dim, c.index_dim)
            self.k_norm = RMSNorm(c.index_dim, c.eps)


class V41Compressor(nn.Module):
    """What a source layer owns: the compressor (KV source: `kv_proj`, `gate_proj` for ratio 2,
    `kv_norm`; no position bias, no overlap) and the indexer (index source)."""

    def __init__(self, c: V4AttentionConfig, owns_kv: bool, owns_index: bool, tp: Collectives = SOLO):
        super().__init__()
        self.ratio, self.owns_kv = c.ratio, owns_kv
        if owns_kv:
            self.kv_proj = Linear(c.hidden, c.head_dim)
            self.gate_proj = Linear(c.hidden, c.head_dim) if c.ratio > 1 else None
            self.kv_norm = RMSNorm(c.head_dim, c.eps)
        self.indexer = V41Indexer(c, owns_kv, tp) if owns_index else None

    def _compress(self, kv: torch.Tensor, gate: torch.Tensor, state):
        # V4's plain compressor with a zero position bias is V4.1's: a per-channel softmax of the
        # group's gates weighs its rows (ratio 1: the row itself), then the norm.
        bias = kv.new_zeros(self.ratio, kv.shape[-1])
        return ops.kv_compress(kv, gate, bias, self.kv_norm.weight, self.ratio, eps=self.kv_norm.eps, state=state)

    def _gate(self, x: torch.Tensor, kv: torch.Tensor) -> torch.Tensor:
        return torch.zeros_like(kv) if self.gate_proj is None else self.gate_proj(x)

    def latents(self, x: torch.Tensor, state):
        """(the un-roped entries closed by these tokens `[B, W, D]`, their first index, new state)."""
        kv = self.kv_proj(x)
        first = 0 if state is None else state.emitted
        latent, state = self._compress(kv, self._gate(x, kv), state)
        return latent, first, state

    def static_latent(self, x: torch.Tensor, win: StaticWindow, position: torch.Tensor):
        """Decode at fixed shapes: token `position` (`[1]`) into `win`; (the un-roped entry of its
        group as if the group closed now `[B, 1, D]`, the entry index `[1]`, whether it closes)."""
        r = self.ratio
        kv = self.kv_proj(x)
        win.kv.index_copy_(1, position % r, kv)
        win.gate.index_copy_(1, position % r, self._gate(x, kv))
        latent, _ = self._compress(win.kv, win.gate, None)
        return latent, position // r, ((position + 1) % r == 0).squeeze(0)

    def index_keys(self, latent: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, rope_dim: int) -> torch.Tensor:
        ix = self.indexer
        return _rope_tail(ix.k_norm(ix.k_proj(latent)), cos, sin, rope_dim)


class V41Attention(V4Attention):
    """A V4.1 layer of ratio 1 or 2 (`layer`'s sources from `args.kv_source` / `args.index_source`).
    Same call as `V4Attention`; its cache is linked to the other layers' (module doc)."""

    def __init__(self, c: V4AttentionConfig, args, layer: int, prefill_chunk: int = 512, tp: Collectives = SOLO):
        super().__init__(dataclasses.replace(c, ratio=0), prefill_chunk, tp)  # no V4 compressor
        self.c = c
        self.kv_source, self.index_source = args.kv_source(layer), args.index_source(layer)
        owns_kv, owns_index = self.kv_source == layer, self.index_source == layer
        self.compressor = V41Compressor(c, owns_kv, owns_index, tp) if owns_kv or owns_index else None
        self.keys_source = args.kv_source(self.index_source)  # the cache whose keys the index source scores
        # Candidate blocks: published by the candidate source's indexer, obeyed by the later ones.
        source = args.candidate_source_layer_id
        self.candidates = (None if not owns_index or source < 0 or layer < source else
                           Candidates(source, args.candidate_topk_blocks, args.candidate_block_size,
                                      writes=layer == source))

    @property
    def _owns_kv(self) -> bool:
        return self.compressor is not None and self.compressor.owns_kv

    @property
    def _indexer(self) -> V41Indexer | None:
        return None if self.compressor is None else self.compressor.indexer

    def new_cache(self, kv_cache_dtype: str = "auto") -> V41Cache:
        """kv_cache_dtype "fp8": the window ring (and on a KV source the shared entries after it)
        in DeepSeek's V4 FP8 layout, a source's index keys in the FP8 key layout (model.cache_fp8)."""
        cache = V41Cache()
        if check_dtype(kv_cache_dtype):
            c = self.c
            check_dims("V41Attention", "v4", head_dim=("dim", c.head_dim), qk_rope_head_dim=("rope", c.rope_dim))
            cache.fp8 = FP8Rows("v4", ring=c.window - 1 + self.prefill_chunk)
            if self._owns_kv and self._indexer is not None:
                check_dims("V41Attention indexer", "index", index_head_dim=("dim", c.index_dim))
                cache.index_keys = FP8Rows("index")
        return cache

    def static_cache(self, cache: V41Cache, batch: int, capacity: int, like: torch.Tensor) -> StaticV41Cache:
        c = self.c
        entries = -(-capacity // c.ratio) if self._owns_kv else 0
        if cache.fp8 is not None:  # the same positions: ring, then entries
            out = StaticV41Cache(cache.fp8.fixed(batch, entries, like.device), entries)
            if self._owns_kv:
                out.comp = StaticWindow.from_state(cache.comp_state, batch, c.ratio, c.head_dim, False, like)
                if self._indexer is not None:
                    out.index_keys = cache.index_keys.fixed(batch, entries, like.device)
            return out
        rows = like.new_zeros(batch, entries + c.window, c.head_dim)
        if len(cache.compressed):
            rows[:, :len(cache.compressed)] = cache.compressed.tensor
        if cache.raw is not None:
            first = cache.length - cache.raw.shape[1]
            rows[:, entries + torch.arange(first, cache.length, device=rows.device) % c.window] = cache.raw
        out = StaticV41Cache(rows, entries)
        if self._owns_kv:
            out.comp = StaticWindow.from_state(cache.comp_state, batch, c.ratio, c.head_dim, False, like)
            if self._indexer is not None:
                out.index_keys = like.new_zeros(batch, entries, c.index_dim)
                if len(cache.index_keys):
                    out.index_keys[:, :len(cache.index_keys)] = cache.index_keys.tensor
        return out

    def forward(self, x: torch.Tensor, positions: torch.Tensor, cache: V41Cache | None = None) -> torch.Tensor:
        if cache is None or cache.peers is None:
            raise ValueError("V41Attention: needs a cache linked to the other layers' (model.ModelCache): "
                             "it reads its sources' compressed entries and picks from them")
        if isinstance(cache, StaticV41Cache):
            return self._static_step(x, positions, cache)
        _check_call("V41Attention", x, positions, cache)
        cache.call_start = cache.length
        if self._indexer is not None:
            cache.picks = []
            cache.blocks = [] if self.candidates is not None and self.candidates.writes else None
        out = _chunked(self._step, x, positions, cache, self.prefill_chunk)
        for name in ("picks", "blocks"):
            if isinstance(getattr(cache, name), list):
                setattr(cache, name, torch.cat(getattr(cache, name), dim=1))
        return out

    def _pad(self, picks: torch.Tensor) -> torch.Tensor:
        """Picks padded with -1 to `index_topk` columns, so chunks of a call concatenate."""
        return torch.nn.functional.pad(picks, (0, self.c.index_topk - picks.shape[-1]), value=-1)

    def _pick(self, x, q_res, positions, keys: torch.Tensor, cache):
        """(the indexer's picks among `keys`, the candidate blocks it publishes or None)."""
        c, ix = self.c, self._indexer
        b, s, _ = x.shape
        cos, sin = c.rope_compress.cos_sin(positions, x.dtype)
        qi = ix.q_b_proj(q_res).view(b, s, ix.heads, ix.dim)
        qi = _rope_tail(qi, cos.unsqueeze(2), sin.unsqueeze(2), c.rope_dim)
        weights = ix.scorer.weights_proj(x)
        if self.candidates is None:
            return _index_select(qi, keys, weights, ix.scale, ix.topk, positions, c.ratio, ix.tp), None
        scores = keys.scores(qi, weights, ix.scale) if isinstance(keys, FP8Rows) else \
            ops.indexer_scores(qi, keys, weights, ix.scale)
        scores = ix.tp.all_reduce(scores)
        blocks = None
        if self.candidates.writes:
            blocks = self.candidates.select(scores, (positions + 1) // c.ratio)
        else:
            source = cache.peers[self.candidates.source]
            scores = self.candidates.mask(scores, source.published("blocks", cache, s))
        picks = ops.indexer_topk(scores, min(ix.topk, scores.shape[-1]), positions, c.ratio)
        dropped = scores.gather(-1, picks.clamp_min(0).long()) == float("-inf")  # outside the candidates
        return torch.where(dropped, -1, picks), blocks

    def _step(self, x: torch.Tensor, positions: torch.Tensor, cache: V41Cache) -> torch.Tensor:
        c = self.c
        q, q_res, kv, cos, sin = self._project(x, positions)
        if cache.fp8 is not None:
            cache.fp8.put_ring(positions, kv)
        if self._owns_kv:
            latent, first, cache.comp_state = self.compressor.latents(x, cache.comp_state)
            if latent.shape[1]:
                starts = (first + torch.arange(latent.shape[1], device=x.device)) * c.ratio
                ecos, esin = c.rope_compress.cos_sin(starts, x.dtype)
                (cache.compressed if cache.fp8 is None else cache.fp8).append(_rope_tail(latent, ecos, esin, c.rope_dim))
                if self._indexer is not None:
                    cache.index_keys.append(self.compressor.index_keys(latent, ecos, esin, c.rope_dim))
        if self._indexer is not None:
            keys = cache.peers[self.keys_source].index_keys
            picks, blocks = (self._pick(x, q_res, positions, keys.tensor, cache) if len(keys) else (None, None))
            if picks is None:  # nothing compressed yet
                picks = positions.new_full((*x.shape[:2], 0), -1, dtype=torch.int32)
                if cache.blocks is not None:
                    blocks = positions.new_full((*x.shape[:2], self.candidates.topk_blocks), -1)
            cache.picks.append(self._pad(picks))
            if cache.blocks is not None:
                cache.blocks.append(blocks)
        if cache.fp8 is not None:
            source = cache.peers[self.kv_source].fp8
            picks = cache.peers[self.index_source].published("picks", cache, x.shape[1]) if len(source) else None
            o = self._attend_fp8(q, cache.fp8, cache.fp8.window(positions, c.window), source, picks)
            cache.length += x.shape[1]
            return self._output(o, cos, sin)
        raw = _concat(cache.raw, kv)
        indices = ops.window_indices(positions, c.window, cache.length - (raw.shape[1] - x.shape[1]))
        source = cache.peers[self.kv_source].compressed
        t, scale = len(source), c.head_dim ** -0.5
        if t:
            picks = cache.peers[self.index_source].published("picks", cache, x.shape[1])
            indices = torch.cat([torch.where(indices >= 0, indices + t, -1), picks], dim=-1)
            o = ops.sparse_attention(q, source.followed_by(raw), indices, scale, sink=self.sinks)
        else:
            o = ops.sparse_attention(q, raw, indices, scale, sink=self.sinks)
        cache.raw = raw[:, -(c.window - 1):] if c.window > 1 else raw[:, :0]
        cache.length += x.shape[1]
        return self._output(o, cos, sin)

    def _static_step(self, x: torch.Tensor, positions: torch.Tensor, cache: StaticV41Cache) -> torch.Tensor:
        c = self.c
        _check_static_call("V41Attention", x, positions)
        q, q_res, kv, cos, sin = self._project(x, positions)
        position, fp8 = positions[0], isinstance(cache.rows, FP8Rows)
        if fp8:
            cache.rows.put_ring(positions, kv)
        if self._owns_kv:
            latent, index, closes = self.compressor.static_latent(x, cache.comp, position)
            ecos, esin = c.rope_compress.cos_sin(index * c.ratio, x.dtype)
            entry = _rope_tail(latent, ecos, esin, c.rope_dim)
            keys = None if self._indexer is None else self.compressor.index_keys(latent, ecos, esin, c.rope_dim)
            if fp8:  # FP8 stores write at positions, under `closes`
                b = x.shape[0]
                cache.rows.write((cache.rows.ring + index).expand(b, 1), entry, keep=closes)
                if keys is not None:
                    cache.index_keys.write(index.expand(b, 1), keys, keep=closes)
            else:
                _write_if(cache.rows, index, entry, closes)
                if keys is not None:
                    _write_if(cache.index_keys, index, keys, closes)
        if self._indexer is not None:
            keys = cache.peers[self.keys_source].index_keys
            cache.picks, cache.blocks = self._pick(x, q_res, positions, keys, cache)
        if fp8:
            source = cache.peers[self.kv_source].rows
            o = self._attend_fp8(q, cache.rows, cache.rows.window(positions, c.window), source,
                                 cache.peers[self.index_source].picks)
            return self._output(o, cos, sin)
        cache.rows.index_copy_(1, cache.entries + position % c.window, kv)
        ring = torch.arange(c.window, device=x.device)
        window = torch.where(ring <= position, ring, -1).expand(x.shape[0], 1, c.window)
        source = cache.peers[self.kv_source]
        entries = source.rows[:, :source.entries]
        rows = torch.cat([entries, cache.rows[:, cache.entries:]], dim=1)
        picks = cache.peers[self.index_source].picks
        indices = torch.cat([picks, torch.where(window >= 0, window + source.entries, -1).to(picks.dtype)], dim=-1)
        o = ops.sparse_attention(q, rows, indices, c.head_dim ** -0.5, sink=self.sinks)
        return self._output(o, cos, sin)


    def _attend_fp8(self, q: torch.Tensor, own: FP8Rows, window: torch.Tensor, source: FP8Rows,
                    picks: torch.Tensor | None) -> torch.Tensor:
        """Attention over this layer's window (ring positions `window` of `own`) and the KV
        source's entries `picks` (-1 = none; None before any entry closed). A reader's window and
        its source's entries live in two FP8 stores: each is attended apart (the sink with the
        window) and the two merged by their log-sum-exps, which is the one softmax over both."""
        scale = self.c.head_dim ** -0.5
        if picks is None:
            return own.attend(q, window, scale, sink=self.sinks)
        if source is own:
            return own.attend(q, torch.cat([window, own.after_ring(picks).to(torch.int32)], -1), scale, sink=self.sinks)
        o_w, lse_w = ops.sparse_attention_fp8kv(q, own.cache, window, scale, own.layout, block_table=own.table,
                                                sink=self.sinks, return_lse=True)
        o_e, lse_e = ops.sparse_attention_fp8kv(q, source.cache, source.after_ring(picks).to(torch.int32), scale,
                                                source.layout, block_table=source.table, return_lse=True)
        lse = torch.logaddexp(lse_w, lse_e)  # lse_w is finite: the window holds the token itself
        w_w, w_e = torch.exp(lse_w - lse).unsqueeze(-1), torch.exp(lse_e - lse).unsqueeze(-1)
        return (o_w * w_w + torch.nan_to_num(o_e) * w_e).to(q.dtype)


def link(caches: list) -> None:
    """Give every V4.1 cache the list of all layers' caches (its sources among them)."""
    for cache in caches:
        if isinstance(cache, (V41Cache, StaticV41Cache)):
            cache.peers = caches
