"""Parity and speed cases for Engram (engram_hash, engram_lookup, engram_gate) with V4.1-Flash's
geometry (engram_max_ngram_size 3, 8 heads per order, head_dim 64 per head, hc 4 at hidden 4096;
docs/engram.md) plus small ones. The speed case compares a table in host memory with prefetched
lookups against the same table resident where the model runs (same run)."""

from __future__ import annotations

import torch

from v4hal import ops
from v4hal.bench.cases import SHAPES, Case, SpeedCase, Tolerance, randn

MAX_NGRAM, HEADS, HEAD_DIM = 3, 8, 64
ORDER_VOCAB = 6_400_000 // 20  # a small fraction of V4.1-Flash's rows per (order, head), for parity


def hash_setup(g: torch.Generator, vocab: int, compressed: int, order_vocab: int, heads: int = HEADS,
               max_ngram: int = MAX_NGRAM, layer: int = 1) -> dict:
    """token_map / multipliers / primes / pad_id for one layer, as model.engram derives them."""
    from v4hal.model.engram import layer_multipliers, table_primes

    token_map = torch.randint(0, compressed, (vocab,), generator=g)
    token_map[vocab - 1] = ops.DEAD  # one dead token, like V4.1's image placeholder
    return dict(token_map=token_map, multipliers=layer_multipliers(layer, compressed, max_ngram),
                primes=torch.tensor(table_primes(order_vocab, layer + 1, max_ngram, heads)[layer]),
                pad_id=int(token_map[2]))


def _hash_inputs(batch: int, tokens: int, vocab: int, compressed: int, order_vocab: int):
    def make(g: torch.Generator) -> dict:
        setup = hash_setup(g, vocab, compressed, order_vocab)
        lookback = torch.randint(-1, vocab, (batch, MAX_NGRAM - 1), generator=g)
        return dict(token_ids=torch.randint(0, vocab, (batch, tokens), generator=g), lookback=lookback, **setup)

    return make


def _lookup_inputs(batch: int, tokens: int, rows: int, width: int, fp8: bool):
    def make(g: torch.Generator) -> dict:
        table = randn(g, rows, width)
        out = dict(rows=torch.randint(0, rows, (batch, tokens, (MAX_NGRAM - 1) * HEADS), generator=g))
        if fp8:
            out.update(table=table.to(torch.float8_e4m3fn),
                       scale=torch.randint(120, 130, (rows, width // ops.SCALE_BLOCK), generator=g, dtype=torch.uint8))
        else:
            out.update(table=table)
        return out

    return make


def _gate_inputs(tokens: int, n: int, d: int):
    def make(g: torch.Generator) -> dict:
        bf = torch.bfloat16
        return dict(hidden=randn(g, tokens, n, d, dtype=bf), key=randn(g, tokens, n, d, dtype=bf),
                    value=randn(g, tokens, d, dtype=bf), key_norm=1 + 0.1 * randn(g, n, d),
                    query_norm=1 + 0.1 * randn(g, n, d), keep=torch.rand(tokens, generator=g) > 0.1)

    return make


EXACT = Tolerance("exact")
SIZES = [("small", 6, 4, 64, True), ("v4-flash", 16, SHAPES["v4-flash"]["hc"], SHAPES["v4-flash"]["hidden"], False)]

PARITY = [
    Case("engram_hash", "small", ops.engram_hash, _hash_inputs(2, 9, 300, 200, 50), EXACT, quick=True),
    Case("engram_hash", "v4.1-vocab-2x2048", ops.engram_hash,
         _hash_inputs(2, 2048, SHAPES["v4-flash"]["vocab"], 100_000, ORDER_VOCAB), EXACT),
    Case("engram_lookup", "small", ops.engram_lookup, _lookup_inputs(2, 5, 50, 32, False), EXACT, quick=True),
    Case("engram_lookup", "fp8-64wide", ops.engram_lookup, _lookup_inputs(2, 256, 20_000, HEAD_DIM, True), EXACT),
] + [Case("engram_gate", name, ops.engram_gate, _gate_inputs(t, n, d), Tolerance.for_dtype(torch.bfloat16, d), quick=q)
     for name, t, n, d, q in SIZES]


def _prefetch_speed(tokens: int, rows: int, layers: int, hidden: int):
    """`layers` Engram layers, each consuming its memory through the value projection. Ours: the
    table in host memory, every layer's lookup submitted to an EngramPrefetcher up front. Peer:
    the table where the model runs, looked up inline by each layer."""

    def make(device: torch.device):
        g = torch.Generator().manual_seed(0)
        cols = (MAX_NGRAM - 1) * HEADS
        host_table = torch.empty(rows, HEAD_DIM, dtype=torch.bfloat16).uniform_(-1, 1, generator=g)
        device_table = host_table.to(device)
        lookups = [torch.randint(0, rows, (1, tokens, cols), generator=g) for _ in range(layers)]
        proj = randn(g, hidden, cols * HEAD_DIM, dtype=torch.bfloat16, scale=0.02).to(device)

        def host_prefetched():
            with ops.EngramPrefetcher(device) as pf:
                for i, r in enumerate(lookups):
                    pf.submit(i, r, host_table)
                return [ops.linear(pf.get(i), proj) for i in range(layers)]

        def device_resident():
            return [ops.linear(ops.engram_lookup(r.to(device), device_table), proj) for r in lookups]

        return host_prefetched, {"table on the compute device, inline lookups": device_resident}

    return make


SPEED = [
    SpeedCase("engram_lookup", "host+prefetch-small", _prefetch_speed(64, 16 * 4096, 2, 256), quick=True),
    # one layer of tables: 16 columns x ~646k rows x 64 bf16 = 1.3 GB
    SpeedCase("engram_lookup", "host+prefetch-table-T2048", _prefetch_speed(2048, 16 * 646_400, 4, SHAPES["v4-flash"]["hidden"]),
              bytes=4 * 2048 * 16 * 64 * 2),
]
