"""Parity and speed cases for Engram (engram_hash, engram_lookup, engram_gate) with the demo's
geometry (2/3-grams, 8 heads per order, 512-wide memory per order) at the V4-Flash and V4-Pro
hidden sizes with 4 streams, plus small ones. The speed case compares a table in host memory with
prefetched lookups against the same table resident where the model runs (same run)."""

from __future__ import annotations

import torch

from v4hal import ops
from v4hal.bench.cases import SHAPES, Case, SpeedCase, Tolerance, randn

MAX_NGRAM, HEADS, EMBED = 3, 8, 512
DEMO_ORDER_VOCAB = SHAPES["v4-flash"]["vocab"] * 5  # the demo's engram_vocab_size per order


def hash_setup(g: torch.Generator, vocab: int, compressed: int, order_vocab: int, heads: int = HEADS,
               max_ngram: int = MAX_NGRAM, layer: int = 1) -> dict:
    """compress / multipliers / primes for one layer, as model.engram derives them."""
    from v4hal.model.engram import layer_multipliers, table_primes

    primes = table_primes([layer], [order_vocab] * (max_ngram - 1), heads)[layer]
    return dict(compress=torch.randint(0, compressed, (vocab,), generator=g),
                multipliers=layer_multipliers(layer, compressed, max_ngram),
                primes=torch.tensor(primes, dtype=torch.int64))


def _hash_inputs(batch: int, tokens: int, vocab: int, compressed: int, order_vocab: int):
    def make(g: torch.Generator) -> dict:
        setup = hash_setup(g, vocab, compressed, order_vocab)
        return dict(token_ids=torch.randint(0, vocab, (batch, tokens), generator=g), pad_id=2, **setup)

    return make


def _lookup_inputs(batch: int, tokens: int, order_vocab: int, width: int):
    def make(g: torch.Generator) -> dict:
        setup = hash_setup(g, 1000, 900, order_vocab)
        sizes = setup["primes"].flatten()
        hashes = (torch.rand(batch, tokens, sizes.numel(), generator=g) * sizes).long()
        return dict(hashes=hashes, table=randn(g, int(sizes.sum()), width), offsets=ops.engram_offsets(sizes))

    return make


def _gate_inputs(tokens: int, n: int, d: int):
    def make(g: torch.Generator) -> dict:
        bf = torch.bfloat16
        return dict(hidden=randn(g, tokens, n, d, dtype=bf), key=randn(g, tokens, n, d, dtype=bf),
                    value=randn(g, tokens, d, dtype=bf), key_norm=1 + 0.1 * randn(g, n, d),
                    query_norm=1 + 0.1 * randn(g, n, d))

    return make


EXACT = Tolerance("exact")
SIZES = [("small", 6, 4, 64, True), ("v4-flash", 16, SHAPES["v4-flash"]["hc"], SHAPES["v4-flash"]["hidden"], False),
         ("v4-pro", 16, SHAPES["v4-pro"]["hc"], SHAPES["v4-pro"]["hidden"], False)]

PARITY = [
    Case("engram_hash", "small", ops.engram_hash, _hash_inputs(2, 9, 300, 200, 50), EXACT, quick=True),
    Case("engram_hash", "demo-vocab-2x2048", ops.engram_hash,
         _hash_inputs(2, 2048, SHAPES["v4-flash"]["vocab"], 100_000, DEMO_ORDER_VOCAB), EXACT),
    Case("engram_lookup", "small", ops.engram_lookup, _lookup_inputs(2, 5, 50, 8), EXACT, quick=True),
    Case("engram_lookup", "demo-heads-64wide", ops.engram_lookup, _lookup_inputs(2, 256, 20_000, EMBED // HEADS), EXACT),
] + [Case("engram_gate", name, ops.engram_gate, _gate_inputs(t, n, d), Tolerance.for_dtype(torch.bfloat16, d), quick=q)
     for name, t, n, d, q in SIZES]


def _prefetch_speed(tokens: int, rows: int, layers: int, hidden: int):
    """`layers` Engram layers, each consuming its memory through the value projection. Ours: the
    table in host memory, every layer's lookup submitted to an EngramPrefetcher up front. Peer:
    the table where the model runs, looked up inline by each layer."""

    def make(device: torch.device):
        g = torch.Generator().manual_seed(0)
        width = EMBED // HEADS
        heads = (MAX_NGRAM - 1) * HEADS
        host_table = torch.empty(rows, width, dtype=torch.bfloat16).uniform_(-1, 1, generator=g)
        device_table = host_table.to(device)
        sizes = torch.full((heads,), rows // heads, dtype=torch.int64)
        offsets = ops.engram_offsets(sizes)
        hashes = [torch.randint(0, rows // heads, (1, tokens, heads), generator=g) for _ in range(layers)]
        proj = randn(g, hidden, heads * width, dtype=torch.bfloat16, scale=0.02).to(device)

        def host_prefetched():
            with ops.EngramPrefetcher(device) as pf:
                for i, h in enumerate(hashes):
                    pf.submit(i, h, host_table, offsets)
                return [ops.linear(pf.get(i), proj) for i in range(layers)]

        def device_resident():
            return [ops.linear(ops.engram_lookup(h.to(device), device_table, offsets.to(device)), proj)
                    for h in hashes]

        return host_prefetched, {"table on the compute device, inline lookups": device_resident}

    return make


SPEED = [
    SpeedCase("engram_lookup", "host+prefetch-small", _prefetch_speed(64, 16 * 4096, 2, 256), quick=True),
    # the demo's tables for one layer: 2 orders x 8 heads x ~646k rows x 64 bf16 = 1.3 GB
    SpeedCase("engram_lookup", "host+prefetch-demo-table-T2048", _prefetch_speed(2048, 16 * 646_400, 4, SHAPES["v4-flash"]["hidden"]),
              bytes=4 * 2048 * 16 * 64 * 2),
]
