"""KV rows kept in DeepSeek's FP8 layouts (`ops.kv_cache`): what a model's caches hold with
`kv_cache_dtype="fp8"`.

`FP8Rows` is one layer's rows of every sequence in a paged FP8 cache: sequence b's row at
position t lives in block `table[b, t // block_size]`, as FlashMLA and the serving engines
address it. Positions [0, ring) are a ring for the sliding window (V4: token p's raw KV row at
p % ring), positions from `ring` on hold rows in order (V4's compressed entries, V3.2's latents,
indexer keys). Attention and the indexer read the bytes through the block table
(`sparse_attention_fp8kv`, `indexer_scores_fp8kv`); every write quantizes (`kv_cache_fp8_write`).
Growing the cache adds blocks (the pool is copied as bytes, never re-quantized).
"""

from __future__ import annotations

import copy

import torch

from v4hal import ops
from v4hal.ops.kv_cache import paged_slots

BLOCK_SIZE = 64
KV_CACHE_DTYPES = ("auto", "fp8")


def check_dtype(kv_cache_dtype: str) -> bool:
    """True for "fp8"; ValueError unless one of KV_CACHE_DTYPES ("auto": the compute dtype)."""
    if kv_cache_dtype not in KV_CACHE_DTYPES:
        raise ValueError(f"kv_cache_dtype: expected one of {KV_CACHE_DTYPES}, got {kv_cache_dtype!r}")
    return kv_cache_dtype == "fp8"


def check_dims(layer: str, layout: str, **fields: tuple[str, int]) -> None:
    """The FP8 layouts are DeepSeek's, at the real models' widths. fields: config name ->
    (the layout's part: "nope", "rope" or "dim", the model's width); ValueError naming each misfit."""
    lay = ops.KV_LAYOUTS[layout]
    want = {"nope": lay.nope, "rope": lay.rope, "dim": lay.dim}
    bad = [f"{name} {got} (expected {want[part]})" for name, (part, got) in fields.items() if got != want[part]]
    if bad:
        kind, owner = ("int8", "the") if lay.codes == "int8" else ("fp8", "DeepSeek's")
        raise ValueError(f"{layer}: kv_cache_dtype={kind!r} stores rows in {owner} {layout!r} {kind.upper()} layout "
                         f"({lay.nope} {lay.codes} + {lay.rope} BF16 RoPE values), got " + ", ".join(bad))


class FP8Rows:
    """Rows `[B, T, D]` of one layer in an FP8 layout, paged (module doc). `len()` is the rows
    appended after the ring."""

    def __init__(self, layout: str, ring: int = 0, block_size: int = BLOCK_SIZE):
        self.layout, self.block_size = layout, block_size
        self.ring = -(-ring // block_size) * block_size
        self.cache: torch.Tensor | None = None   # [blocks, block_size, token_bytes] uint8
        self.table: torch.Tensor | None = None   # [B, blocks per sequence] int32
        self.length = 0

    def __len__(self) -> int:
        return self.length

    @property
    def span(self) -> int:
        """Positions the block table covers (ring included)."""
        return self.table.shape[1] * self.block_size

    @property
    def tensor(self) -> "FP8Rows":
        """What the layers read where `cache.Rows` gives its tensor: the store itself (attention
        and the indexer take it in place of the rows)."""
        return self

    def reserve(self, batch: int, rows: int, device: torch.device) -> None:
        """Blocks for `rows` appended rows (after the ring) in each of `batch` sequences."""
        bs = self.block_size
        have = 0 if self.table is None else self.table.shape[1]
        need = -(-(self.ring + rows) // bs)
        if need <= have:
            return
        grow = max(need, have + have // 4 + 1) - have  # geometric: each block copied O(1) times
        used = batch * have
        pool = ops.kv_cache_fp8_empty(used + batch * grow, bs, self.layout, device)
        if self.cache is not None:
            pool[:used] = self.cache
        new = used + torch.arange(batch * grow, device=device, dtype=torch.int32).view(batch, grow)
        self.cache = pool
        self.table = new if self.table is None else torch.cat([self.table, new], 1)

    def write(self, positions: torch.Tensor, rows: torch.Tensor, keep: torch.Tensor | None = None) -> None:
        """Quantize `rows` `[B, S, D]` into positions `[B, S]` (of the block table; `keep`, a bool
        tensor broadcasting to `[B, S]`: write only where true). Fixed shapes, no host read."""
        slots = paged_slots(positions.unsqueeze(-1), self.table, self.block_size).squeeze(-1)
        if keep is not None:
            slots = torch.where(keep, slots, -1)
        ops.kv_cache_fp8_write(self.cache, rows, slots, self.layout)

    def append(self, rows: torch.Tensor) -> None:
        """Rows `[B, S, D]` after those appended so far."""
        b, s, _ = rows.shape
        if s:
            self.reserve(b, self.length + s, rows.device)
            pos = self.ring + self.length + torch.arange(s, device=rows.device)
            self.write(pos.expand(b, s), rows)
            self.length += s

    def put_ring(self, positions: torch.Tensor, rows: torch.Tensor) -> None:
        """Raw rows `[B, S, D]` of token positions `[B, S]` into the ring (S <= ring)."""
        self.reserve(rows.shape[0], self.length, rows.device)
        self.write(positions % self.ring, rows)

    def window(self, positions: torch.Tensor, window: int) -> torch.Tensor:
        """`[B, S, window]` int32 ring positions of each query's window (oldest first, -1 before 0)."""
        p = positions.unsqueeze(-1) - (window - 1) + torch.arange(window, device=positions.device)
        return torch.where(p >= 0, p % self.ring, -1).to(torch.int32)

    def after_ring(self, indices: torch.Tensor) -> torch.Tensor:
        """Positions of appended rows `indices` (-1 kept)."""
        return torch.where(indices >= 0, indices + self.ring, -1)

    def attend(self, q: torch.Tensor, indices: torch.Tensor, scale: float, sink: torch.Tensor | None = None,
               v_dim: int | None = None) -> torch.Tensor:
        """`sparse_attention` of q over the rows at positions `indices` `[B, S, K]` (-1 = none)."""
        return ops.sparse_attention_fp8kv(q, self.cache, indices, scale, self.layout, block_table=self.table,
                                          sink=sink, v_dim=v_dim)

    def scores(self, q: torch.Tensor, weights: torch.Tensor, scale: float) -> torch.Tensor:
        """Indexer scores `[B, S, T]` of q against the appended rows (no ring), as keys."""
        t = self.table[:, self.ring // self.block_size:]
        return ops.indexer_scores_fp8kv(q, self.cache, weights, scale, t, self.layout)

    def fixed(self, batch: int, rows: int, device: torch.device) -> "FP8Rows":
        """A copy with blocks for `rows` appended rows, for a static decoder (same positions)."""
        out = copy.copy(self)
        out.cache = None if self.cache is None else self.cache.clone()
        out.reserve(batch, rows, device)
        return out
