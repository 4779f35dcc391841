"""Attention layers of DeepSeek-V4 (sliding / CSA / HCA) and V3.2 (MLA + DSA), built only from
`v4hal.ops`, holding their weights under the official HF tensor names.

Use:
    cfg = V4AttentionConfig.from_hf(hf_config, layer_idx)     # or V4AttentionConfig(...) from ints
    attn = V4Attention(cfg)                                   # state_dict keys = transformers'
    cache = attn.new_cache()                                  # one per layer and sequence batch
    out = attn(hidden_states, positions, cache)               # prefill: S tokens
    out = attn(next_hidden, next_positions, cache)            # decode: S = 1 (or more) tokens

    hidden_states: [B, S, hidden] float; positions: [B, S] int64 absolute positions that continue
    the cache (row b = cache.length + arange(S)); cache: the layer's cache, filled/extended in
    place, or None for a one-shot prefill. Returns [B, S, hidden] in hidden_states' dtype.
    V32Attention / V32AttentionConfig have the same interface (weights named as
    transformers' DeepseekV32Attention, with its `indexer` submodule; index_heads=0 builds it
    without indexer, attending every causal token: V3's MLA).

Linear layers are `Linear` modules calling `ops.linear`, so FP8 (`weight_scale_inv` 128x128 block
scales), FP4 and int8 weights load as they come. Norms call `ops.rms_norm`/`ops.layer_norm`.

Caches keep what decode needs and no more: the last `window - 1` raw KV rows (V4), every
compressed entry and the compressor's open window (V4), or every latent + indexer key (V3.2).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from v4hal import ops
from v4hal.ops._check import reads
from v4hal.model.rope import Rope, softmax_scale


def _get(cfg, name, default=None):
    if isinstance(cfg, dict):
        return cfg.get(name, default)
    return getattr(cfg, name, default)


class Linear(nn.Module):
    """`ops.linear` with the weight (and, for quantized checkpoints, `weight_scale_inv`) under
    HF's names. Set `weight` / `weight_scale_inv` by loading a state dict or assigning;
    `act_scale_fmt` ("fp32" or "ue8m0") is how an FP8 weight's activations are scaled (the whole
    model sets it from its config's `quantization_config.scale_fmt`)."""

    def __init__(self, in_features: int, out_features: int, bias: bool = False):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(out_features, in_features), requires_grad=False)
        self.bias = nn.Parameter(torch.zeros(out_features), requires_grad=False) if bias else None
        self.weight_scale_inv = None
        self.act_scale_fmt = "fp32"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return ops.linear(x, self.weight, self.weight_scale_inv, self.bias, self.act_scale_fmt)

    def dense_weight(self, dtype: torch.dtype) -> torch.Tensor:
        """The weight as a float matrix (dequantized if quantized), for absorbed-MLA algebra."""
        return ops.dequantize_weight(self.weight, self.weight_scale_inv, dtype)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim), requires_grad=False)
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return ops.rms_norm(x, self.weight, self.eps)


class LayerNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim), requires_grad=False)
        self.bias = nn.Parameter(torch.zeros(dim), requires_grad=False)
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return ops.layer_norm(x, self.weight, self.bias, self.eps)


def _rope_tail(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, rope_dim: int) -> torch.Tensor:
    """V4 layout: RoPE (interleaved) on the trailing `rope_dim` channels of every head."""
    return torch.cat([x[..., :-rope_dim], ops.apply_rope(x[..., -rope_dim:], cos, sin)], dim=-1)


# --------------------------------------------------------------------------------------- V4


LAYER_RATIOS = {"sliding_attention": 0, "compressed_sparse_attention": "csa", "heavily_compressed_attention": "hca"}


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


class V4Cache:
    """Per-layer decode state of a V4 attention layer (see module doc)."""

    def __init__(self):
        self.length = 0            # tokens seen
        self.raw = None            # [B, <= window-1, head_dim] roped KV of the latest tokens
        self.compressed = Rows()   # [B, T, head_dim] roped compressed entries
        self.comp_state = None     # ops.CompressState of the compressor
        self.index_keys = Rows()   # [B, T, index_dim] (CSA)
        self.index_state = None


@dataclass
class StaticWindow:
    """A compressor's open window at a fixed size: token p sits in slot p % ratio of kv / gate
    `[B, ratio, C]`. The overlapping compressor also keeps the last closed window's series a and
    its biased gate `[B, ratio, C/2]` (gate -inf before any window closed: weight 0, which is
    what `kv_compress` gives the very first window)."""

    kv: torch.Tensor
    gate: torch.Tensor
    prev_kv: torch.Tensor | None = None
    prev_gate: torch.Tensor | None = None

    @classmethod
    def from_state(cls, state, b: int, ratio: int, channels: int, overlap: bool, like: torch.Tensor) -> "StaticWindow":
        """From a `kv_compress` state (None: nothing seen yet)."""
        win = cls(like.new_zeros(b, ratio, channels), like.new_zeros(b, ratio, channels))
        if overlap:
            d = channels // 2
            win.prev_kv = like.new_zeros(b, ratio, d)
            win.prev_gate = like.new_full((b, ratio, d), float("-inf"))
        if state is not None:
            n = state.kv.shape[1]
            win.kv[:, :n], win.gate[:, :n] = state.kv, state.gate
            if overlap and state.prev_kv is not None:
                win.prev_kv.copy_(state.prev_kv)
                win.prev_gate.copy_(state.prev_gate)
        return win


class StaticV4Cache:
    """A V4 layer's decode state in fixed-size buffers (`V4Attention.static_cache`), so one decode
    step has the same shapes at every position and compiles to one graph. `rows` `[B, E + window,
    head_dim]` holds the compressed-entry slots (entry e in row e, E = ceil(capacity / ratio), 0
    for sliding layers) followed by the sliding window as a ring (position p in row E + p % window);
    slots not written yet are never indexed. The compressors' open windows are `StaticWindow`s."""

    def __init__(self, rows, entries: int, comp=None, index_keys=None, index_comp=None):
        self.rows, self.entries, self.comp = rows, entries, comp
        self.index_keys, self.index_comp = index_keys, index_comp


def _write_if(buf: torch.Tensor, index: torch.Tensor, rows: torch.Tensor, cond: torch.Tensor) -> None:
    """`buf[:, index] = rows` where `cond` (a bool scalar tensor), in place, at fixed shapes."""
    buf.index_copy_(1, index, torch.where(cond, rows, buf.index_select(1, index)))


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
    from the query LoRA residual, and scorer.weights_proj."""

    def __init__(self, c: V4AttentionConfig):
        super().__init__(c.hidden, c.index_dim, c.ratio, True, c.eps)
        self.q_b_proj = Linear(c.q_lora, c.index_heads * c.index_dim)
        self.scorer = _Scorer(c.hidden, c.index_heads)
        self.heads, self.dim, self.topk = c.index_heads, c.index_dim, c.index_topk


class V4CompressorWithIndexer(V4Compressor):
    def __init__(self, c: V4AttentionConfig):
        super().__init__(c.hidden, c.head_dim, c.ratio, True, c.eps)
        self.indexer = V4Indexer(c)


def _concat(old, new):
    return new if old is None else torch.cat([old, new], dim=1)


class Rows:
    """A cache tensor `[B, T, D]` that grows along T into spare capacity, so a decode step copies
    its new rows, not the whole cache (a 16k-token CSA layer holds 4096 entries). `tensor` is
    the filled part; `followed_by` lends the spare capacity to rows needed for one step only."""

    def __init__(self):
        self._buf, self._len = None, 0

    def __len__(self) -> int:
        return self._len

    @property
    def tensor(self) -> torch.Tensor | None:
        return None if self._buf is None else self._buf[:, :self._len]

    def _reserve(self, like: torch.Tensor, rows: int) -> None:
        if self._buf is None or rows > self._buf.shape[1]:
            # Geometric growth: every row is copied a bounded number of times overall.
            grown = like.new_empty(like.shape[0], rows + rows // 4 + 64, like.shape[2])
            if self._len:
                grown[:, :self._len] = self._buf[:, :self._len]
            self._buf = grown

    def append(self, new: torch.Tensor) -> None:
        if new.shape[1]:
            self._reserve(new, self._len + new.shape[1])
            self._buf[:, self._len:self._len + new.shape[1]] = new
            self._len += new.shape[1]

    def followed_by(self, tail: torch.Tensor) -> torch.Tensor:
        """`[rows | tail]` along T; the tail is overwritten by the next append."""
        self._reserve(tail, self._len + tail.shape[1])
        self._buf[:, self._len:self._len + tail.shape[1]] = tail
        return self._buf[:, :self._len + tail.shape[1]]


def _check_call(layer: str, x: torch.Tensor, positions: torch.Tensor, cache) -> None:
    if x.dim() != 3:
        raise ValueError(f"{layer}: hidden_states must be [B, S, hidden], got shape {tuple(x.shape)}")
    if tuple(positions.shape) != tuple(x.shape[:2]):
        raise ValueError(f"{layer}: positions must be [B, S] = {tuple(x.shape[:2])}, got {tuple(positions.shape)}")
    if not reads(positions):  # meta device, or V4HAL_CHECKS=shapes
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
    if reads(positions) and bool((positions != positions[0]).any()):
        raise ValueError(f"{layer}: a static cache decodes every sequence at the same position, got positions "
                         f"{positions.flatten().tolist()}")


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


class V4Attention(nn.Module):
    """transformers' DeepseekV4Attention, from v4hal ops (see module doc for the call).
    `prefill_chunk`: queries per step of a long prefill (bounds temporaries, not results)."""

    def __init__(self, c: V4AttentionConfig, prefill_chunk: int = 512):
        super().__init__()
        self.c, self.prefill_chunk = c, prefill_chunk
        self.q_a_proj = Linear(c.hidden, c.q_lora)
        self.q_a_norm = RMSNorm(c.q_lora, c.eps)
        self.q_b_proj = Linear(c.q_lora, c.heads * c.head_dim)
        self.kv_proj = Linear(c.hidden, c.head_dim)
        self.kv_norm = RMSNorm(c.head_dim, c.eps)
        self.o_a_proj = Linear(c.heads * c.head_dim // c.o_groups, c.o_groups * c.o_lora)
        self.o_b_proj = Linear(c.o_groups * c.o_lora, c.hidden)
        self.sinks = nn.Parameter(torch.zeros(c.heads), requires_grad=False)
        if c.ratio == 0:
            self.compressor = None
        elif c.csa:
            self.compressor = V4CompressorWithIndexer(c)
        else:
            self.compressor = V4Compressor(c.hidden, c.head_dim, c.ratio, False, c.eps)

    def new_cache(self) -> V4Cache:
        return V4Cache()

    def static_cache(self, cache: V4Cache, batch: int, capacity: int, like: torch.Tensor) -> StaticV4Cache:
        """`cache` (filled by earlier calls, or empty) moved into fixed-size buffers holding up to
        `capacity` tokens; `like` gives dtype and device."""
        c = self.c
        entries = -(-capacity // c.ratio) if c.ratio else 0
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
            out.index_keys = like.new_zeros(batch, entries, ix.dim)
            if len(cache.index_keys):
                out.index_keys[:, :len(cache.index_keys)] = cache.index_keys.tensor
            out.index_comp = StaticWindow.from_state(cache.index_state, batch, c.ratio, ix.kv_proj.weight.shape[0],
                                                     True, like)
        return out

    def _o_proj(self, o: torch.Tensor) -> torch.Tensor:
        """Grouped low-rank output projection: each head group has its own block of o_a_proj."""
        c, w, s = self.c, self.o_a_proj.weight, self.o_a_proj.weight_scale_inv
        groups = o.reshape(*o.shape[:2], c.o_groups, -1)
        rows = w.shape[0] // c.o_groups
        # FP8 scales cover 128-row blocks; int8 and FP4 scales are per row.
        block = ops.WEIGHT_BLOCK[0] if w.dtype == torch.float8_e4m3fn else 1
        if s is not None and rows % block and block % rows:
            # A group's rows straddle two 128-row scale blocks: no per-group scale slice exists,
            # so the groups run on the exactly dequantized weight.
            w, s = ops.dequantize_fp8(w, s, ops.WEIGHT_BLOCK, o.dtype), None
        parts = [ops.linear(groups[:, :, g], w[g * rows:(g + 1) * rows], self._group_scale(s, g, rows, block),
                            act_scale_fmt=self.o_a_proj.act_scale_fmt)
                 for g in range(c.o_groups)]
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
        q = ops.rms_norm(self.q_b_proj(q_res).view(b, s, c.heads, c.head_dim), None, c.eps)
        q = _rope_tail(q, cos.unsqueeze(2), sin.unsqueeze(2), c.rope_dim)
        kv = _rope_tail(self.kv_norm(self.kv_proj(x)), cos, sin, c.rope_dim)
        return q, q_res, kv, cos, sin

    def _output(self, o: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        # K = V carries RoPE on its tail: rotate the output's tail back to the query position.
        o = _rope_tail(o, cos.unsqueeze(2), -sin.unsqueeze(2), self.c.rope_dim)
        return self._o_proj(o.reshape(*o.shape[:2], -1))

    def _step(self, x: torch.Tensor, positions: torch.Tensor, cache: V4Cache) -> torch.Tensor:
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

    def _static_step(self, x: torch.Tensor, positions: torch.Tensor, cache: StaticV4Cache) -> torch.Tensor:
        """One decode token per sequence (`S = 1`, the same position in every row) at fixed shapes."""
        c = self.c
        _check_static_call("V4Attention", x, positions)
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
        return ops.indexer_select(qi, keys, weights, (ix.dim * ix.heads) ** -0.5, ix.topk, positions, c.ratio)


# ------------------------------------------------------------------------------------- V3.2


@dataclass(frozen=True)
class V32AttentionConfig:
    hidden: int = 7168
    heads: int = 128
    q_lora: int = 1536
    kv_lora: int = 512
    nope_dim: int = 128
    rope_dim: int = 64
    v_dim: int = 128
    index_heads: int = 64
    index_dim: int = 128
    index_topk: int = 2048
    eps: float = 1e-6
    bias: bool = False
    rope: Rope = field(default_factory=lambda: Rope(64, 10000.0))
    scale: float = 192 ** -0.5

    @classmethod
    def from_hf(cls, cfg, layer_idx: int = 0) -> "V32AttentionConfig":
        rope_dim = _get(cfg, "qk_rope_head_dim")
        nope = _get(cfg, "qk_nope_head_dim")
        rp = _get(cfg, "rope_parameters") or {"rope_type": "default", "rope_theta": _get(cfg, "rope_theta", 10000.0)}
        return cls(hidden=_get(cfg, "hidden_size"), heads=_get(cfg, "num_attention_heads"),
                   q_lora=_get(cfg, "q_lora_rank"), kv_lora=_get(cfg, "kv_lora_rank"), nope_dim=nope,
                   rope_dim=rope_dim, v_dim=_get(cfg, "v_head_dim"), index_heads=_get(cfg, "index_n_heads"),
                   index_dim=_get(cfg, "index_head_dim"), index_topk=_get(cfg, "index_topk"),
                   bias=bool(_get(cfg, "attention_bias", False)),
                   rope=Rope.from_params(rope_dim, rp, _get(cfg, "max_position_embeddings")),
                   scale=softmax_scale(nope + rope_dim, rp))


class V32Cache:
    def __init__(self):
        self.length = 0
        self.latent = Rows()      # [B, T, kv_lora + rope_dim]: normed latent | roped shared key
        self.index_keys = Rows()  # [B, T, index_dim]


@dataclass
class StaticV32Cache:
    """A V3.2 / V3 layer's decode state in fixed-size buffers (`V32Attention.static_cache`):
    position p's latent (and indexer key) in row p; rows not written yet are never indexed."""

    latent: torch.Tensor                # [B, capacity, kv_lora + rope_dim]
    index_keys: torch.Tensor | None     # [B, capacity, index_dim] (V3.2)


class V32Indexer(nn.Module):
    def __init__(self, c: V32AttentionConfig):
        super().__init__()
        self.wq_b = Linear(c.q_lora, c.index_heads * c.index_dim)
        self.wk = Linear(c.hidden, c.index_dim)
        self.k_norm = LayerNorm(c.index_dim, 1e-6)
        self.weights_proj = Linear(c.hidden, c.index_heads)


def _rope_head(x, cos, sin, rope_dim):
    """V3.2 indexer layout: RoPE (half-split pairs) on the leading `rope_dim` channels."""
    return torch.cat([ops.apply_rope(x[..., :rope_dim], cos, sin, interleaved=False), x[..., rope_dim:]], dim=-1)


class V32Attention(nn.Module):
    """transformers' DeepseekV32Attention (MLA + DSA) in the absorbed form: attention runs over the
    cached latents, as DeepSeek's inference and FlashMLA's sparse kernel do."""

    def __init__(self, c: V32AttentionConfig, prefill_chunk: int = 512):
        super().__init__()
        self.c, self.prefill_chunk = c, prefill_chunk
        self.q_a_proj = Linear(c.hidden, c.q_lora, bias=c.bias)
        self.q_a_layernorm = RMSNorm(c.q_lora, 1e-6)
        self.q_b_proj = Linear(c.q_lora, c.heads * (c.nope_dim + c.rope_dim))
        self.kv_a_proj_with_mqa = Linear(c.hidden, c.kv_lora + c.rope_dim, bias=c.bias)
        self.kv_a_layernorm = RMSNorm(c.kv_lora, 1e-6)
        self.kv_b_proj = Linear(c.kv_lora, c.heads * (c.nope_dim + c.v_dim))
        self.o_proj = Linear(c.heads * c.v_dim, c.hidden, bias=c.bias)
        # index_heads = 0: no DSA, every causal token is attended (V3's MLA).
        self.indexer = V32Indexer(c) if c.index_heads else None

    def new_cache(self) -> V32Cache:
        return V32Cache()

    def static_cache(self, cache: V32Cache, batch: int, capacity: int, like: torch.Tensor) -> StaticV32Cache:
        """`cache` moved into fixed-size buffers holding up to `capacity` tokens (see V4Attention)."""
        c = self.c
        out = StaticV32Cache(like.new_zeros(batch, capacity, c.kv_lora + c.rope_dim),
                             like.new_zeros(batch, capacity, c.index_dim) if self.indexer is not None else None)
        if len(cache.latent):
            out.latent[:, :len(cache.latent)] = cache.latent.tensor
        if out.index_keys is not None and len(cache.index_keys):
            out.index_keys[:, :len(cache.index_keys)] = cache.index_keys.tensor
        return out

    def forward(self, x: torch.Tensor, positions: torch.Tensor, cache: V32Cache | None = None) -> torch.Tensor:
        cache = cache if cache is not None else V32Cache()
        if isinstance(cache, StaticV32Cache):
            return self._static_step(x, positions, cache)
        _check_call("V32Attention", x, positions, cache)
        return _chunked(self._step, x, positions, cache, self.prefill_chunk)

    def _project(self, x: torch.Tensor, positions: torch.Tensor):
        """((q_nope [B, S, H, nope], roped q_rope [B, S, H, rope]), the query LoRA residual, this
        step's latent rows [B, S, kv_lora + rope], cos, sin)."""
        c = self.c
        b, s, _ = x.shape
        cos, sin = c.rope.cos_sin(positions, x.dtype)
        q_res = self.q_a_layernorm(self.q_a_proj(x))
        q = self.q_b_proj(q_res).view(b, s, c.heads, c.nope_dim + c.rope_dim)
        q_rope = ops.apply_rope(q[..., c.nope_dim:], cos.unsqueeze(2), sin.unsqueeze(2))
        lat = self.kv_a_proj_with_mqa(x)
        k_rope = ops.apply_rope(lat[..., c.kv_lora:], cos, sin)
        return (q[..., :c.nope_dim], q_rope), q_res, torch.cat([self.kv_a_layernorm(lat[..., :c.kv_lora]), k_rope], -1), cos, sin

    def _attend(self, q: tuple[torch.Tensor, torch.Tensor], latent: torch.Tensor, picked: torch.Tensor) -> torch.Tensor:
        # Absorb W_uk into the query and apply W_uv after attention over the latents.
        c, (q_nope, q_rope) = self.c, q
        wkv = self.kv_b_proj.dense_weight(q_nope.dtype).view(c.heads, c.nope_dim + c.v_dim, c.kv_lora)
        q_lat = torch.einsum("bshn,hnc->bshc", q_nope, wkv[:, :c.nope_dim])
        o_lat = ops.sparse_attention(torch.cat([q_lat, q_rope], -1), latent, picked, c.scale, v_dim=c.kv_lora)
        o = torch.einsum("bshc,hvc->bshv", o_lat, wkv[:, c.nope_dim:])
        return self.o_proj(o.reshape(*o.shape[:2], -1))

    def _step(self, x: torch.Tensor, positions: torch.Tensor, cache: V32Cache) -> torch.Tensor:
        q, q_res, row, cos, sin = self._project(x, positions)
        cache.latent.append(row)
        if self.indexer is None:
            picked = self._causal(positions, len(cache.latent))
        else:
            cache.index_keys.append(self._index_key(x, cos, sin))
            picked = self._select(x, q_res, positions, cos, sin, cache.index_keys.tensor)
        cache.length += x.shape[1]
        return self._attend(q, cache.latent.tensor, picked)

    def _static_step(self, x: torch.Tensor, positions: torch.Tensor, cache: StaticV32Cache) -> torch.Tensor:
        """One decode token per sequence (`S = 1`, the same position in every row) at fixed shapes."""
        _check_static_call("V32Attention", x, positions)
        q, q_res, row, cos, sin = self._project(x, positions)
        position = positions[0]
        cache.latent.index_copy_(1, position, row)
        if self.indexer is None:
            picked = self._causal(positions, cache.latent.shape[1])
        else:
            cache.index_keys.index_copy_(1, position, self._index_key(x, cos, sin))
            picked = self._select(x, q_res, positions, cos, sin, cache.index_keys)
        return self._attend(q, cache.latent, picked)

    @staticmethod
    def _causal(positions: torch.Tensor, t: int) -> torch.Tensor:
        """V3 (no indexer): every cached token up to the query's position."""
        ent = torch.arange(t, device=positions.device).view(1, 1, t)
        return torch.where(ent <= positions.unsqueeze(-1), ent, -1).to(torch.int32)

    def _index_key(self, x, cos, sin) -> torch.Tensor:
        ix = self.indexer
        return _rope_head(ix.k_norm(ix.wk(x)), cos, sin, self.c.rope_dim)

    def _select(self, x, q_res, positions, cos, sin, keys: torch.Tensor) -> torch.Tensor:
        """DSA's picks among `keys` `[B, T, index_dim]` (future and unwritten rows come back -1)."""
        c, ix = self.c, self.indexer
        b, s, _ = x.shape
        qi = _rope_head(ix.wq_b(q_res).view(b, s, c.index_heads, c.index_dim), cos.unsqueeze(2), sin.unsqueeze(2),
                        c.rope_dim)
        return ops.indexer_select(qi, keys, ix.weights_proj(x), (c.index_dim * c.index_heads) ** -0.5,
                                  c.index_topk, positions, 1)
