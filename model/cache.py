"""What the attention layers keep between calls, filled in place by each call.

Eager caches (`V4Cache`, `V32Cache`) grow with the sequence, in `Rows`; static caches
(`StaticV4Cache` with its compressors' `StaticWindow`s, `StaticV32Cache`) hold the same state in
fixed-size buffers, so a decode step has the same shapes at every position (`model.static`).

Caches keep what decode needs and no more: the last `window - 1` raw KV rows (V4), every
compressed entry and the compressor's open window (V4), or every latent + indexer key (V3.2).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


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


def _concat(old, new):
    return new if old is None else torch.cat([old, new], dim=1)


def _write_if(buf: torch.Tensor, index: torch.Tensor, rows: torch.Tensor, cond: torch.Tensor) -> None:
    """`buf[:, index] = rows` where `cond` (a bool scalar tensor), in place, at fixed shapes."""
    buf.index_copy_(1, index, torch.where(cond, rows, buf.index_select(1, index)))


class V4Cache:
    """Per-layer decode state of a V4 attention layer (see module doc)."""

    def __init__(self):
        self.length = 0            # tokens seen
        self.raw = None            # [B, <= window-1, head_dim] roped KV of the latest tokens
        self.compressed = Rows()   # [B, T, head_dim] roped compressed entries
        self.comp_state = None     # ops.CompressState of the compressor
        self.index_keys = Rows()   # [B, T, index_dim] (CSA); an FP8Rows with the FP8 cache
        self.index_state = None
        self.fp8 = None            # kv_cache_dtype "fp8": window ring + entries (model.cache_fp8.FP8Rows)


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
