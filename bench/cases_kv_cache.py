"""Parity cases for the FP8 KV cache family (ops/kv_cache.py): writing (bytes compared exactly:
every backend rounds the same BF16 values), reading (dequantized values, exact), sparse
attention over the cache, paged with a ragged block table, in V4's and V3.2's layouts, and the
indexer's scores over FP8 keys (the "index" layout)."""

from __future__ import annotations

import torch

from v4hal import ops
from v4hal.bench.cases import Case, Tolerance, randn

EXACT = Tolerance("exact")


def _write_inputs(name, blocks, block_size, rows):
    def make(g):
        lay = ops.KV_LAYOUTS[name]
        slots = torch.randperm(blocks * block_size, generator=g)[:rows]
        slots[0] = -1  # a dropped row
        return dict(cache=ops.kv_cache_fp8_empty(blocks, block_size, name), layout=name, slots=slots,
                    kv=randn(g, rows, lay.dim, dtype=torch.bfloat16, scale=3.0))
    return make


def _filled(g, name, blocks, block_size):
    lay = ops.KV_LAYOUTS[name]
    cache = ops.kv_cache_fp8_empty(blocks, block_size, name)
    n = blocks * block_size
    return ops.kv_cache_fp8_write(cache, randn(g, n, lay.dim, dtype=torch.bfloat16), torch.arange(n), name)


def _read_inputs(name):
    def make(g):
        return dict(cache=_filled(g, name, 3, 4), slots=torch.tensor([[0, 11, -1], [5, 5, 2]]), layout=name)
    return make


def _attention_inputs(name, v_dim, s, h, k):
    def make(g):
        lay = ops.KV_LAYOUTS[name]
        block_size, table = 4, torch.tensor([[5, 1, 3], [0, 6, 0]], dtype=torch.int32)
        idx = torch.stack([torch.randint(-1, n, (s, k), generator=g) for n in (12, 6)]).to(torch.int32)
        return dict(q=randn(g, 2, s, h, lay.dim, dtype=torch.bfloat16), cache=_filled(g, name, 7, block_size),
                    indices=idx, scale=lay.dim ** -0.5, layout=name, block_table=table,
                    sink=randn(g, h), v_dim=v_dim, return_lse=True)
    return make


def _attention_case(name, v_dim, s, h, k):
    red = k * ops.KV_LAYOUTS[name].dim
    return Case("sparse_attention_fp8kv", f"small/{name}-paged", ops.sparse_attention_fp8kv,
                _attention_inputs(name, v_dim, s, h, k),
                {"out0": Tolerance.for_dtype(torch.bfloat16, red), "out1": Tolerance.for_dtype(torch.float32, red)},
                quick=True)


def _indexer_inputs(g):
    block_size, table = 4, torch.tensor([[2, 0], [1, 3]], dtype=torch.int32)
    return dict(q=randn(g, 2, 3, 4, 128, dtype=torch.bfloat16), cache=_filled(g, "index", 4, block_size),
                weights=randn(g, 2, 3, 4), scale=(128 * 4) ** -0.5, block_table=table, layout="index")


PARITY = [
    Case("kv_cache_fp8_write", "small/v4", ops.kv_cache_fp8_write, _write_inputs("v4", 3, 4, 9), EXACT, quick=True),
    Case("kv_cache_fp8_write", "small/v3.2", ops.kv_cache_fp8_write, _write_inputs("v3.2", 2, 3, 5), EXACT, quick=True),
    Case("kv_cache_fp8_read", "small/v4", ops.kv_cache_fp8_read, _read_inputs("v4"), EXACT, quick=True),
    Case("kv_cache_fp8_read", "small/v3.2", ops.kv_cache_fp8_read, _read_inputs("v3.2"), EXACT, quick=True),
    _attention_case("v4", None, 3, 4, 8),
    _attention_case("v3.2", 512, 1, 4, 8),
    Case("indexer_scores_fp8kv", "small/paged", ops.indexer_scores_fp8kv, _indexer_inputs,
         Tolerance.for_dtype(torch.bfloat16, 128 * 4), quick=True),
]
