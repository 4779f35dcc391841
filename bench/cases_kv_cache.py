"""Parity cases for the FP8 KV cache family (ops/kv_cache.py): writing (bytes compared exactly:
every backend rounds the same BF16 values), reading (dequantized values, exact), sparse
attention over the cache, paged with a ragged block table, in V4's and V3.2's layouts and the int8
layout (plus the call Ascend's int8-KV kernel takes), and the
indexer's scores over FP8 keys (the "index" layout)."""

from __future__ import annotations

import torch

from v4hal import ops
from v4hal.bench.cases import SHAPES, Case, SpeedCase, Tolerance, randn
from v4hal.bench.peers_cuda import torch_path

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


def _int8_kernel_inputs(g):
    """What Ascend's int8-KV kernel takes (bf16 q, no sink, no LSE, blocks of 16): the call V3.2's
    attention makes with `kv_cache_dtype="int8"`."""
    table = torch.tensor([[2, 0], [1, 2]], dtype=torch.int32)
    idx = torch.stack([torch.randint(-1, n, (2, 8), generator=g) for n in (32, 20)]).to(torch.int32)
    return dict(q=randn(g, 2, 2, 4, 576, dtype=torch.bfloat16), cache=_filled(g, "int8", 3, 16), indices=idx,
                scale=576 ** -0.5, layout="int8", block_table=table, v_dim=512)


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
    Case("kv_cache_fp8_write", "small/int8", ops.kv_cache_fp8_write, _write_inputs("int8", 2, 16, 5), EXACT, quick=True),
    Case("kv_cache_fp8_read", "small/int8", ops.kv_cache_fp8_read, _read_inputs("int8"), EXACT, quick=True),
    _attention_case("int8", 512, 2, 4, 8),
    # Ascend's kernel rounds the dequantized latents to bf16 (its cube's inputs), so its output is
    # judged by DeepGEMM's diff (measured 3.3e-6 on the emulator, cpu_fast's bf16 1.4e-6), not per element.
    Case("sparse_attention_fp8kv", "small/int8-kernel", ops.sparse_attention_fp8kv, _int8_kernel_inputs,
         Tolerance("fp8", diff=5e-5), quick=True),
    Case("indexer_scores_fp8kv", "small/paged", ops.indexer_scores_fp8kv, _indexer_inputs,
         Tolerance.for_dtype(torch.bfloat16, 128 * 4), quick=True),
]


# ----------------------------------------------------------------------------------------- speed

def _device_cache(g, name, n, device):
    """A cache of n slots in blocks of 64, every slot written, built on `device` (a copy made on
    the host would lose the padded block stride FlashMLA requires)."""
    cache = ops.kv_cache_fp8_empty(n // 64, 64, name, device=device)
    kv = randn(g, n, ops.KV_LAYOUTS[name].dim, dtype=torch.bfloat16).to(device)
    return ops.kv_cache_fp8_write(cache, kv, torch.arange(n, device=device), name)


def _fp8kv_attention_speed(n: int, h: int, k: int):
    """V4-Flash decode over an FP8 cache of n slots, k picks (top-k + window), bf16 q. Peers:
    cpu_fast's dequantize-then-attend path on the same arguments (what the device kernels replace:
    on CUDA the op runs FlashMLA or the Triton kernel) and `sparse_attention` over the same rows held
    as a BF16 cache (the cache the FP8 one replaces)."""
    def make(device):
        g = torch.Generator().manual_seed(0)
        lay = ops.KV_LAYOUTS["v4"]
        cache = _device_cache(g, "v4", n, device)
        slots = torch.randint(0, n, (1, 1, k), generator=g, dtype=torch.int32).to(device)
        q = randn(g, 1, 1, h, lay.dim, dtype=torch.bfloat16).to(device)
        sink, scale = randn(g, h).to(device), lay.dim ** -0.5
        rows = ops.kv_cache_fp8_read(cache, torch.arange(n, device=device), "v4").bfloat16().unsqueeze(0)
        peers = {"dequantize-then-attend (cpu_fast)": torch_path("sparse_attention_fp8kv", q, cache, slots, scale,
                                                                   lay, sink, lay.dim),
                 "sparse_attention over a BF16 cache": lambda: ops.sparse_attention(q, rows, slots, scale, sink=sink)}
        return (lambda: ops.sparse_attention_fp8kv(q, cache, slots, scale, "v4", sink=sink)), peers
    return make


def _fp8kv_indexer_speed(t: int, h: int):
    """V4-Flash decode indexer scores over t FP8 keys (the index layout). Peer: cpu_fast's
    dequantize-then-score path on the same arguments."""
    def make(device):
        g = torch.Generator().manual_seed(0)
        lay = ops.KV_LAYOUTS["index"]
        cache = _device_cache(g, "index", t, device)
        q = randn(g, 1, 1, h, lay.dim, dtype=torch.bfloat16).to(device)
        weights, scale = randn(g, 1, 1, h).to(device), (lay.dim * h) ** -0.5
        table = torch.arange(t // 64, dtype=torch.int32, device=device).unsqueeze(0)
        slots = torch.arange(t, device=device).unsqueeze(0)  # what the contract makes of that table
        peers = {"dequantize-then-score (cpu_fast)": torch_path("indexer_scores_fp8kv", q, cache, slots, weights,
                                                                  scale, lay)}
        return (lambda: ops.indexer_scores_fp8kv(q, cache, weights, scale, table)), peers
    return make


V4F = SHAPES["v4-flash"]
V4F_PICKS = V4F["index_topk"] + V4F["window"]
SPEED = [
    SpeedCase("sparse_attention_fp8kv", f"v4-flash/decode-N{n}", _fp8kv_attention_speed(n, V4F["heads"], V4F_PICKS),
              flops=4 * V4F["heads"] * V4F_PICKS * V4F["head_dim"],
              bytes=V4F_PICKS * ops.KV_LAYOUTS["v4"].token_bytes)
    for n in (8192, 32768)
] + [
    SpeedCase("indexer_scores_fp8kv", "v4-flash/decode-T32768", _fp8kv_indexer_speed(32768, V4F["index_heads"]),
              flops=2 * V4F["index_heads"] * V4F["index_dim"] * 32768,
              bytes=32768 * ops.KV_LAYOUTS["index"].token_bytes)
]
