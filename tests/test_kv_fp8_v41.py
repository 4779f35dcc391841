"""The FP8 KV cache (`kv_cache_dtype="fp8"`) in DeepSeek-V4.1 models, whose compressed layers
read the entries and index keys their KV source holds once: static decode equals eager decode
over the same FP8 bytes, a reader's window and its source's entries (two FP8 stores) attend as
one softmax, 64 greedy steps stay within a budget of the BF16 cache, and tiny widths are refused."""

import pytest
import torch

from test_model_v41 import CANDIDATES, _ids, _v41_topology
from v4hal import ops
from v4hal.bench.cases_model import REAL_WIDTHS_V4
from v4hal.bench.kv_fp8 import accuracy
from v4hal.model.cache_fp8 import FP8Rows
from v4hal.model.model import build
from v4hal.model.static import StaticDecoder
from v4hal.ops.kv_cache import paged_slots

TOPOLOGIES = {"c2-then-c1": {}, "index-only-source": {"compress_ratios": [0, 2, 2, 2], "kv_source_layer_ids": [1],
                                                      "index_source_layer_ids": [1, 2]},
              "candidate-blocks": CANDIDATES}


def fp8_model(topology: dict, **changes):
    args = _v41_topology(**topology).replace(**REAL_WIDTHS_V4, **changes)
    model = build(args, dtype=torch.float32, kv_cache_dtype="fp8").init_random(0)
    model.set_engram_token_map(torch.randint(0, 300, (512,), generator=torch.Generator().manual_seed(4)))
    return model


@pytest.mark.parametrize("prompt", [3, 11])
@pytest.mark.parametrize("name", list(TOPOLOGIES))
def test_fp8_static_steps_equal_fp8_eager_steps(name, prompt):
    model, ids, total = fp8_model(TOPOLOGIES[name]), _ids(24), 24
    args = model.args
    with torch.no_grad():
        cache = model.new_cache()
        model(ids[:, :prompt], cache=cache)
        decoder = StaticDecoder(model, cache, capacity=total, compile=False)
        eager, static = [], []
        for i in range(prompt, total):
            eager.append(model(ids[:, i:i + 1], cache=cache))
            static.append(decoder(ids[:, i:i + 1]))
    torch.testing.assert_close(torch.cat(static, 1), torch.cat(eager, 1), rtol=1e-5, atol=1e-5)
    for i, layer in enumerate(cache.layers):  # every layer's rows are FP8 bytes; entries held once, by the sources
        assert isinstance(layer.fp8, FP8Rows) and layer.fp8.cache.dtype == torch.uint8
        assert len(layer.fp8) == (total // args.compress_ratio(i) if i in args.kv_source_layer_ids else 0), i
        if i in args.kv_source_layer_ids and i in args.index_source_layer_ids:
            assert isinstance(layer.index_keys, FP8Rows) and len(layer.index_keys) == len(layer.fp8)


def test_a_readers_window_and_its_sources_entries_attend_as_one_softmax():
    """`_attend_fp8` with two stores against `sparse_attention` (float64) over the dequantized rows
    of both, concatenated, with the sink once."""
    model = fp8_model({})
    reader = model.model.layers[2].self_attn  # reads layer 1's ratio-2 entries
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        reader.sinks.copy_(torch.randn(reader.sinks.shape, generator=g))
    own, source = FP8Rows("v4", ring=8), FP8Rows("v4")
    b, s, h = 2, 3, reader.heads
    positions = torch.tensor([[9, 10, 11]] * b)
    own.put_ring(positions - 3, torch.randn(b, s, 512, generator=g))  # the window's earlier rows
    own.put_ring(positions, torch.randn(b, s, 512, generator=g))
    source.append(torch.randn(b, 5, 512, generator=g))
    q = torch.randn(b, s, h, 512, generator=g)
    window = own.window(positions, 4)  # 4 ring positions each, all written
    picks = torch.tensor([[[0, 3, -1], [4, -1, -1], [-1, -1, -1]], [[1, 2, 4], [0, -1, -1], [2, 2, -1]]],
                         dtype=torch.int32)
    got = reader._attend_fp8(q, own, window, source, picks)
    rows = torch.cat([ops.kv_cache_fp8_read(own.cache, paged_slots(window, own.table, own.block_size)),
                      ops.kv_cache_fp8_read(source.cache, paged_slots(source.after_ring(picks), source.table,
                                                                      source.block_size))], -2)  # [B, S, K, D]
    flat = rows.flatten(1, 2).double()  # one row list per sequence; query s indexes its own K rows
    k = rows.shape[2]
    idx = torch.arange(s * k).view(1, s, k).expand(b, s, k)
    idx = torch.where(torch.cat([window, picks], -1) >= 0, idx, -1)
    want = ops.sparse_attention(q.double(), flat, idx, 512 ** -0.5, sink=reader.sinks.double())
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5)


# Budget against the BF16-cache model (bench/kv_fp8.py `accuracy`, 64 greedy steps, BF16 model,
# 2 prompts of 16, random weights seed 0). Measured on this machine: c2-then-c1 max / mean
# relative RMS 0.205 / 0.038, forced argmax agreement 0.898; with every entry selected
# (index_topk 128) 0.020 / 0.011, 0.992; candidate blocks 0.245 / 0.034, 0.938. As with V4
# (tests/test_kv_fp8_model.py), quantized index keys flip near-tied picks of the random models.
BUDGET = {("c2-then-c1", False): (0.3, 0.06, 0.85), ("c2-then-c1", True): (0.04, 0.02, 0.95),
          ("candidate-blocks", False): (0.35, 0.06, 0.85)}


@pytest.mark.parametrize("name,select_all", list(BUDGET))
def test_64_greedy_steps_within_the_budget_of_the_bf16_cache(name, select_all):
    args = _v41_topology(**TOPOLOGIES[name]).replace(**REAL_WIDTHS_V4)
    r = accuracy(args.replace(index_topk=128) if select_all else args, steps=64)
    print(f"{name} (every entry selected: {select_all}): {r}")
    max_rms, mean_rms, agree = BUDGET[name, select_all]
    assert r["max_rel_rms"] <= max_rms and r["mean_rel_rms"] <= mean_rms, r
    assert r["argmax_agreement_forced"] >= agree, r


def test_tiny_widths_are_refused():
    with pytest.raises(ValueError, match=r"kv_cache_dtype='fp8' .*'v4' FP8 layout.*head_dim 32 \(expected 512\)"):
        build(_v41_topology(), kv_cache_dtype="fp8")
    with pytest.raises(ValueError, match=r"V41Attention indexer: .*index_head_dim 64 \(expected 128\)"):
        build(_v41_topology().replace(**{**REAL_WIDTHS_V4, "index_head_dim": 64}), kv_cache_dtype="fp8")
