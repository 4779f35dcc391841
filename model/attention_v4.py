"""DeepSeek-V4's attention layer (transformers' DeepseekV4Attention): a sliding window alone, or
with compressed entries: CSA (overlapping compressor windows, entries picked by the indexer) or
HCA (every entry). Called as `model.attention` describes; its caches are in `model.cache`.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from v4hal import ops
from v4hal.model.attention import _check_call, _check_static_call, _chunked, _get, _index_select
from v4hal.model.collectives import SOLO, Collectives
from v4hal.model.cache import StaticV4Cache, StaticWindow, V4Cache, _concat, _write_if
from v4hal.model.cache_fp8 import FP8Rows, check_dims, check_dtype
from v4hal.model.layers import Linear, RMSNorm
from v4hal.model.rope import Rope


def _rope_tail(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, rope_dim: int) -> torch.Tensor:
    """V4 layout: RoPE (interleaved) on the trailing `rope_dim` channels of every head."""
    return torch.cat([x[..., :-rope_dim], ops.apply_rope(x[..., -rope_dim:], cos, sin)], dim=-1)


@dataclass(frozen=True)
class V4AttentionConfig:
    """One V4 attention layer. ratio: 0 = sliding only, else the compression ratio (4 = CSA with
    the indexer and overlapping windows, 128 = HCA); `csa` says which (set by from_hf)."""

    hidden: int = 4096
    heads: int = 64
    head_dim: int = 512
    rope_dim: int = 64
    q_lora: int = 1024
    o_groups: int = 8
    o_lora: int = 1024
    window: int = 128
    ratio: int = 0
    csa: bool = False
    index_heads: int = 64
    index_dim: int = 128
    index_topk: int = 512
    eps: float = 1e-6
    rope_main: Rope = field(default_factory=lambda: Rope(64, 10000.0))
    rope_compress: Rope = field(default_factory=lambda: Rope(64, 160000.0))

    @classmethod
    def from_hf(cls, cfg, layer_idx: int) -> "V4AttentionConfig":
        """From a transformers DeepseekV4Config (or its config.json dict, once normalised)."""
        kind = _get(cfg, "layer_types")[layer_idx]
        rates = _get(cfg, "compress_rates") or {"compressed_sparse_attention": 4, "heavily_compressed_attention": 128}
        head_dim = _get(cfg, "head_dim")
        rope_dim = int(head_dim * _get(cfg, "partial_rotary_factor", 64 / 512))
        rp = _get(cfg, "rope_parameters")
        max_pos = _get(cfg, "max_position_embeddings")
        return cls(hidden=_get(cfg, "hidden_size"), heads=_get(cfg, "num_attention_heads"), head_dim=head_dim,
                   rope_dim=rope_dim, q_lora=_get(cfg, "q_lora_rank"), o_groups=_get(cfg, "o_groups"),
                   o_lora=_get(cfg, "o_lora_rank"), window=_get(cfg, "sliding_window"),
                   ratio=rates.get(kind, 0), csa=kind == "compressed_sparse_attention",
                   index_heads=_get(cfg, "index_n_heads"), index_dim=_get(cfg, "index_head_dim"),
                   index_topk=_get(cfg, "index_topk"), eps=_get(cfg, "rms_norm_eps", 1e-6),
                   rope_main=Rope.from_params(rope_dim, rp["main"], max_pos),
                   rope_compress=Rope.from_params(rope_dim, rp["compress"], max_pos))


class V4Compressor(nn.Module):
    """Weights of transformers' DeepseekV4{CSA,HCA}Compressor (and of the indexer's own
    compressor): kv_proj, gate_proj, position_bias, kv_norm."""

    def __init__(self, hidden: int, dim: int, ratio: int, overlap: bool, eps: float):
        super().__init__()
        width = 2 * dim if overlap else dim
        self.kv_proj = Linear(hidden, width)
        self.gate_proj = Linear(hidden, width)
        self.position_bias = nn.Parameter(torch.zeros(ratio, width), requires_grad=False)
        self.kv_norm = RMSNorm(dim, eps)
        self.ratio, self.overlap = ratio, overlap

    def entries(self, x, state, rope: Rope):
        """(new roped entries [B, W, dim], new state)."""
        first = 0 if state is None else state.emitted
        out, state = ops.kv_compress(self.kv_proj(x), self.gate_proj(x), self.position_bias, self.kv_norm.weight,
                                     self.ratio, overlap=self.overlap, eps=self.kv_norm.eps, state=state)
        if out.shape[1]:
            pos = (first + torch.arange(out.shape[1], device=out.device)) * self.ratio
            cos, sin = rope.cos_sin(pos, out.dtype)
            out = _rope_tail(out, cos, sin, 2 * cos.shape[-1])
        return out, state

    def static_entry(self, x, win: StaticWindow, position: torch.Tensor, rope: Rope):
        """Decode at fixed shapes: writes token `position` (a `[1]` tensor) into `win` and returns
        (the roped entry of its window as if the window closed now `[B, 1, dim]`, the entry index
        `[1]`, whether the window closes at this token: a bool scalar tensor)."""
        r = self.ratio
        slot = position % r
        win.kv.index_copy_(1, slot, self.kv_proj(x))
        win.gate.index_copy_(1, slot, self.gate_proj(x))
        state = ops.CompressState(win.kv[:, :0], win.gate[:, :0], win.prev_kv, win.prev_gate) if self.overlap else None
        entry, _ = ops.kv_compress(win.kv, win.gate, self.position_bias, self.kv_norm.weight, r,
                                   overlap=self.overlap, eps=self.kv_norm.eps, state=state)
        index = position // r
        closes = ((position + 1) % r == 0).squeeze(0)
        cos, sin = rope.cos_sin(index * r, entry.dtype)
        entry = _rope_tail(entry, cos, sin, 2 * cos.shape[-1])
        if self.overlap:  # a closing window's series a is the previous window of the next entry
            d = win.prev_kv.shape[-1]
            biased = win.gate[..., :d] + self.position_bias[:, :d].to(win.gate.dtype)
            win.prev_kv.copy_(torch.where(closes, win.kv[..., :d], win.prev_kv))
            win.prev_gate.copy_(torch.where(closes, biased, win.prev_gate))
        return entry, index, closes


class _Scorer(nn.Module):
    def __init__(self, hidden: int, heads: int):
        super().__init__()
        self.weights_proj = Linear(hidden, heads)


class V4Indexer(V4Compressor):
    """transformers' DeepseekV4Indexer: its own overlapping compressor at index_dim, q_b_proj
    from the query LoRA residual, and scorer.weights_proj. Under tensor parallelism a rank holds
    `index_heads / tp` heads; their partial scores are summed over `tp` before the top-k."""

    def __init__(self, c: V4AttentionConfig, tp: Collectives = SOLO):
        super().__init__(c.hidden, c.index_dim, c.ratio, True, c.eps)
        self.heads, self.dim, self.topk, self.tp = c.index_heads // tp.size, c.index_dim, c.index_topk, tp
        self.q_b_proj = Linear(c.q_lora, self.heads * c.index_dim)
        self.scorer = _Scorer(c.hidden, self.heads)
        self.scale = (c.index_dim * c.index_heads) ** -0.5  # over all heads, wherever they are


class V4CompressorWithIndexer(V4Compressor):
    def __init__(self, c: V4AttentionConfig, tp: Collectives = SOLO):
        super().__init__(c.hidden, c.head_dim, c.ratio, True, c.eps)
        self.indexer = V4Indexer(c, tp)


class V4Attention(nn.Module):
    """transformers' DeepseekV4Attention, from v4hal ops (the call: see `model.attention`).
    `prefill_chunk`: queries per step of a long prefill (bounds temporaries, not results).
    `tp`: tensor parallelism; a rank holds `heads / tp` query heads, `o_groups / tp` whole output
    groups and `index_heads / tp` indexer heads; the KV head and the compressors stay whole."""

    def __init__(self, c: V4AttentionConfig, prefill_chunk: int = 512, tp: Collectives = SOLO):
        super().__init__()
        self.c, self.prefill_chunk = c, prefill_chunk
        self.heads, self.o_groups = c.heads // tp.size, c.o_groups // tp.size
        self.q_a_proj = Linear(c.hidden, c.q_lora)
        self.q_a_norm = RMSNorm(c.q_lora, c.eps)
        self.q_b_proj = Linear(c.q_lora, self.heads * c.head_dim)
        self.kv_proj = Linear(c.hidden, c.head_dim)
        self.kv_norm = RMSNorm(c.head_dim, c.eps)
        self.o_a_proj = Linear(c.heads * c.head_dim // c.o_groups, self.o_groups * c.o_lora)
        self.o_b_proj = Linear(self.o_groups * c.o_lora, c.hidden, reduce=tp)
        self.sinks = nn.Parameter(torch.zeros(self.heads), requires_grad=False)
        if c.ratio == 0:
            self.compressor = None
        elif c.csa:
            self.compressor = V4CompressorWithIndexer(c, tp)
        else:
            self.compressor = V4Compressor(c.hidden, c.head_dim, c.ratio, False, c.eps)

    def new_cache(self, kv_cache_dtype: str = "auto") -> V4Cache:
        """kv_cache_dtype "fp8": the window and compressed entries in DeepSeek's V4 FP8 layout, the
        indexer keys in its FP8 key layout (`model.cache_fp8`); "auto": the compute dtype."""
        cache = V4Cache()
        if check_dtype(kv_cache_dtype):
            c = self.c
            check_dims("V4Attention", "v4", head_dim=("dim", c.head_dim), qk_rope_head_dim=("rope", c.rope_dim))
            # The ring holds a prefill chunk's rows besides the window its first query sees.
            cache.fp8 = FP8Rows("v4", ring=c.window - 1 + self.prefill_chunk)
            if c.csa:
                check_dims("V4Attention indexer", "index", index_head_dim=("dim", c.index_dim))
                cache.index_keys = FP8Rows("index")
        return cache

    def static_cache(self, cache: V4Cache, batch: int, capacity: int, like: torch.Tensor) -> StaticV4Cache:
        """`cache` (filled by earlier calls, or empty) moved into fixed-size buffers holding up to
        `capacity` tokens; `like` gives dtype and device."""
        c = self.c
        entries = -(-capacity // c.ratio) if c.ratio else 0
        if cache.fp8 is not None:  # the same positions: ring, then entries
            out = StaticV4Cache(cache.fp8.fixed(batch, entries, like.device), entries)
        else:
            rows = like.new_zeros(batch, entries + c.window, c.head_dim)
            if len(cache.compressed):
                rows[:, :len(cache.compressed)] = cache.compressed.tensor
            if cache.raw is not None:
                first = cache.length - cache.raw.shape[1]
                slots = entries + torch.arange(first, cache.length, device=rows.device) % c.window
                rows[:, slots] = cache.raw
            out = StaticV4Cache(rows, entries)
        if self.compressor is not None:
            comp = self.compressor
            out.comp = StaticWindow.from_state(cache.comp_state, batch, c.ratio, comp.kv_proj.weight.shape[0],
                                               comp.overlap, like)
        if c.csa:
            ix = self.compressor.indexer
            if isinstance(cache.index_keys, FP8Rows):
                out.index_keys = cache.index_keys.fixed(batch, entries, like.device)
            else:
                out.index_keys = like.new_zeros(batch, entries, ix.dim)
                if len(cache.index_keys):
                    out.index_keys[:, :len(cache.index_keys)] = cache.index_keys.tensor
            out.index_comp = StaticWindow.from_state(cache.index_state, batch, c.ratio, ix.kv_proj.weight.shape[0],
                                                     True, like)
        return out

    def _o_proj(self, o: torch.Tensor) -> torch.Tensor:
        """Grouped low-rank output projection: each head group has its own block of o_a_proj."""
        w, s = self.o_a_proj.weight, self.o_a_proj.weight_scale_inv
        groups = o.reshape(*o.shape[:2], self.o_groups, -1)
        rows = w.shape[0] // self.o_groups
        # FP8 scales cover 128-row blocks; int8 and FP4 scales are per row.
        block = ops.WEIGHT_BLOCK[0] if w.dtype == torch.float8_e4m3fn else 1
        if s is not None and rows % block and block % rows:
            # A group's rows straddle two 128-row scale blocks: no per-group scale slice exists,
            # so the groups run on the exactly dequantized weight.
            w, s = ops.dequantize_fp8(w, s, ops.WEIGHT_BLOCK, o.dtype), None
        parts = [ops.linear(groups[:, :, g], w[g * rows:(g + 1) * rows], self._group_scale(s, g, rows, block),
                            act_scale_fmt=self.o_a_proj.act_scale_fmt)
                 for g in range(self.o_groups)]
        return self.o_b_proj(torch.cat(parts, dim=-1))

    @staticmethod
    def _group_scale(s: torch.Tensor | None, g: int, rows: int, block: int) -> torch.Tensor | None:
        """The scales covering rows [g*rows, (g+1)*rows) of a quantized weight whose scales
        each cover `block` rows (128 for FP8, 1 for int8 / FP4)."""
        if s is None:
            return None
        first = g * rows // block
        return s[first:first + -(-rows // block)]

    def forward(self, x: torch.Tensor, positions: torch.Tensor, cache: V4Cache | None = None) -> torch.Tensor:
        cache = cache if cache is not None else V4Cache()
        if isinstance(cache, StaticV4Cache):
            return self._static_step(x, positions, cache)
        _check_call("V4Attention", x, positions, cache)
        return _chunked(self._step, x, positions, cache, self.prefill_chunk)

    def _project(self, x: torch.Tensor, positions: torch.Tensor):
        """(q [B, S, H, D], the query LoRA residual, this step's KV rows [B, S, D], cos, sin)."""
        c = self.c
        b, s, _ = x.shape
        rope = c.rope_main if c.ratio == 0 else c.rope_compress
        cos, sin = rope.cos_sin(positions, x.dtype)
        q_res = self.q_a_norm(self.q_a_proj(x))
        q = ops.rms_norm(self.q_b_proj(q_res).view(b, s, self.heads, c.head_dim), None, c.eps)
        q = _rope_tail(q, cos.unsqueeze(2), sin.unsqueeze(2), c.rope_dim)
        kv = _rope_tail(self.kv_norm(self.kv_proj(x)), cos, sin, c.rope_dim)
        return q, q_res, kv, cos, sin

    def _output(self, o: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        # K = V carries RoPE on its tail: rotate the output's tail back to the query position.
        o = _rope_tail(o, cos.unsqueeze(2), -sin.unsqueeze(2), self.c.rope_dim)
        return self._o_proj(o.reshape(*o.shape[:2], -1))

    def _step(self, x: torch.Tensor, positions: torch.Tensor, cache: V4Cache) -> torch.Tensor:
        if cache.fp8 is not None:
            return self._step_fp8(x, positions, cache)
        c = self.c
        q, q_res, kv, cos, sin = self._project(x, positions)
        raw = _concat(cache.raw, kv)
        scale = c.head_dim ** -0.5
        if self.compressor is None:
            o = ops.window_attention(q, raw, c.window, scale, sink=self.sinks)
        else:
            o = self._sparse(x, q, q_res, raw, positions, cache, scale)
        cache.raw = raw[:, -(c.window - 1):] if c.window > 1 else raw[:, :0]
        cache.length += x.shape[1]
        return self._output(o, cos, sin)

    def _step_fp8(self, x: torch.Tensor, positions: torch.Tensor, cache: V4Cache) -> torch.Tensor:
        """`_step` over the FP8 cache: this step's rows are written first, then every row attention
        reads (window and compressed entries) comes from the cache's bytes."""
        c, store = self.c, cache.fp8
        q, q_res, kv, cos, sin = self._project(x, positions)
        store.put_ring(positions, kv)
        indices = store.window(positions, c.window)
        if self.compressor is not None:
            new, cache.comp_state = self.compressor.entries(x, cache.comp_state, c.rope_compress)
            store.append(new)
            picked = self._indexer(x, q_res, positions, cache) if c.csa else None
            if len(store):
                picked = picked if c.csa else self._all_visible(positions, len(store))
                indices = torch.cat([indices, store.after_ring(picked).to(torch.int32)], dim=-1)
        o = store.attend(q, indices, c.head_dim ** -0.5, sink=self.sinks)
        cache.length += x.shape[1]
        return self._output(o, cos, sin)

    def _static_step(self, x: torch.Tensor, positions: torch.Tensor, cache: StaticV4Cache) -> torch.Tensor:
        """One decode token per sequence (`S = 1`, the same position in every row) at fixed shapes."""
        c = self.c
        _check_static_call("V4Attention", x, positions)
        if isinstance(cache.rows, FP8Rows):
            return self._static_step_fp8(x, positions, cache)
        q, q_res, kv, cos, sin = self._project(x, positions)
        position = positions[0]
        cache.rows.index_copy_(1, cache.entries + position % c.window, kv)
        ring = torch.arange(c.window, device=x.device)
        # Before the ring wraps, slots beyond the position are unwritten.
        indices = torch.where(ring <= position, cache.entries + ring, -1).expand(x.shape[0], 1, c.window)
        if self.compressor is not None:
            entry, index, closes = self.compressor.static_entry(x, cache.comp, position, c.rope_compress)
            _write_if(cache.rows, index, entry, closes)
            if c.csa:
                key, index, closes = self.compressor.indexer.static_entry(x, cache.index_comp, position,
                                                                          c.rope_compress)
                _write_if(cache.index_keys, index, key, closes)
                picked = self._select(x, q_res, positions, cache.index_keys)
            else:
                picked = self._all_visible(positions, cache.entries)
            indices = torch.cat([picked, indices.to(picked.dtype)], dim=-1)
        o = ops.sparse_attention(q, cache.rows, indices, c.head_dim ** -0.5, sink=self.sinks)
        return self._output(o, cos, sin)

    def _static_step_fp8(self, x: torch.Tensor, positions: torch.Tensor, cache: StaticV4Cache) -> torch.Tensor:
        """`_static_step` over the FP8 cache (`cache.rows` an FP8Rows: ring, then entries)."""
        c, store = self.c, cache.rows
        q, q_res, kv, cos, sin = self._project(x, positions)
        store.put_ring(positions, kv)
        indices = store.window(positions, c.window)
        if self.compressor is not None:
            b, position = x.shape[0], positions[0]
            entry, index, closes = self.compressor.static_entry(x, cache.comp, position, c.rope_compress)
            store.write((store.ring + index).expand(b, 1), entry, keep=closes)
            if c.csa:
                key, index, closes = self.compressor.indexer.static_entry(x, cache.index_comp, position,
                                                                          c.rope_compress)
                cache.index_keys.write(index.expand(b, 1), key, keep=closes)
                picked = self._select(x, q_res, positions, cache.index_keys)
            else:
                picked = self._all_visible(positions, cache.entries)
            indices = torch.cat([indices, store.after_ring(picked).to(torch.int32)], dim=-1)
        o = store.attend(q, indices, c.head_dim ** -0.5, sink=self.sinks)
        return self._output(o, cos, sin)

    def _sparse(self, x, q, q_res, raw, positions, cache, scale) -> torch.Tensor:
        """CSA / HCA: the window and the picked compressed entries as one index list over
        [raw rows | compressed entries]."""
        c = self.c
        raw_start = cache.length - (raw.shape[1] - x.shape[1])
        indices = ops.window_indices(positions, c.window, raw_start)
        new, cache.comp_state = self.compressor.entries(x, cache.comp_state, c.rope_compress)
        cache.compressed.append(new)
        t = len(cache.compressed)
        if t == 0:
            if c.csa:  # keep the indexer's compressor state in step with the main one
                self._indexer(x, q_res, positions, cache)
            return ops.sparse_attention(q, raw, indices, scale, sink=self.sinks)
        picked = self._indexer(x, q_res, positions, cache) if c.csa else self._all_visible(positions, t)
        # Rows are [compressed entries | window rows], built in the cache's spare capacity.
        indices = torch.cat([torch.where(indices >= 0, indices + t, -1), picked], dim=-1)
        rows = cache.compressed.followed_by(raw)
        return ops.sparse_attention(q, rows, indices, scale, sink=self.sinks)

    def _all_visible(self, positions: torch.Tensor, t: int) -> torch.Tensor:
        """HCA: every closed window, no selection."""
        ent = torch.arange(t, device=positions.device).view(1, 1, t)
        limit = ((positions + 1) // self.c.ratio).unsqueeze(-1)
        return torch.where(ent < limit, ent, -1).to(torch.int32)

    def _indexer(self, x, q_res, positions, cache) -> torch.Tensor | None:
        c, ix = self.c, self.compressor.indexer
        new, cache.index_state = ix.entries(x, cache.index_state, c.rope_compress)
        cache.index_keys.append(new)
        if not len(cache.index_keys):
            return None
        return self._select(x, q_res, positions, cache.index_keys.tensor)

    def _select(self, x, q_res, positions, keys: torch.Tensor) -> torch.Tensor:
        """The indexer's picks among `keys` `[B, T, index_dim]` (entries a query may not see yet,
        including unwritten static slots, come back -1)."""
        c, ix = self.c, self.compressor.indexer
        b, s, _ = x.shape
        cos, sin = c.rope_compress.cos_sin(positions, x.dtype)
        qi = ix.q_b_proj(q_res).view(b, s, ix.heads, ix.dim)
        qi = _rope_tail(qi, cos.unsqueeze(2), sin.unsqueeze(2), c.rope_dim)
        weights = ix.scorer.weights_proj(x)
        return _index_select(qi, keys, weights, ix.scale, ix.topk, positions, c.ratio, ix.tp)
