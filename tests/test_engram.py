"""Engram: hashes checked by hand and against plain Python integers, identical across backends
and runs; lookups through a host-resident table with prefetch equal to inline ones; the Engram
layer against a direct torch derivation of the demo's forward; bad input."""

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from v4hal import ops
from v4hal.backends import registry
from v4hal.bench.cases_engram import hash_setup
from v4hal.model.engram import Engram, _is_prime, layer_multipliers, table_primes
from v4hal.ops._check import OpInputError

cuda_engram = registry.family_view("cuda", "engram")

BACKENDS = ["cpu", "cpu_fast", "mindspore"]


def python_hashes(ids, compress, multipliers, primes, pad_id):
    """The n-gram hash with Python's unbounded ints, one position at a time."""
    ids, compress, mult = ids.tolist(), compress.tolist(), multipliers.tolist()
    out = []
    for row in ids:
        out_row = []
        for t in range(len(row)):
            toks = [compress[row[t - k]] if t - k >= 0 else compress[pad_id] for k in range(len(mult))]
            hashes = []
            for order, sizes in zip(range(2, len(mult) + 1), primes.tolist()):
                mix = 0
                for k in range(order):
                    mix ^= toks[k] * mult[k]
                hashes += [mix % p for p in sizes]
            out_row.append(hashes)
        out.append(out_row)
    return torch.tensor(out, dtype=torch.int64)


def _setup(seed=0, vocab=1000, compressed=700, order_vocab=5000, heads=3):
    return hash_setup(torch.Generator().manual_seed(seed), vocab, compressed, order_vocab, heads=heads)


def test_hash_by_hand():
    """ids (5, 9), identity compression, pad 4, multipliers (3, 5, 11), one head per order with
    table sizes 7 (2-grams) and 13 (3-grams)."""
    h = ops.engram_hash(torch.tensor([[5, 9]]), torch.arange(20), torch.tensor([3, 5, 11]),
                        torch.tensor([[7], [13]]), pad_id=4)
    # t=0: 2-gram 5*3 ^ 4*5 = 15 ^ 20 = 27 -> 27 % 7 = 6;  3-gram 27 ^ 4*11 = 27 ^ 44 = 55 -> 55 % 13 = 3
    # t=1: 2-gram 9*3 ^ 5*5 = 27 ^ 25 = 2 -> 2;            3-gram 2 ^ 44 = 46 -> 46 % 13 = 7
    assert h.tolist() == [[[6, 3], [2, 7]]]


@pytest.mark.parametrize("backend", BACKENDS)
def test_hashes_match_python_integers_and_are_deterministic(backend):
    s = _setup()
    ids = torch.randint(0, 1000, (2, 40), generator=torch.Generator().manual_seed(1))
    expected = python_hashes(ids, s["compress"], s["multipliers"], s["primes"], 2)
    with registry.forced(backend):
        first = ops.engram_hash(ids, s["compress"], s["multipliers"], s["primes"], 2)
        again = ops.engram_hash(ids.clone(), s["compress"], s["multipliers"], s["primes"], 2)
    assert first.dtype == torch.int64 and torch.equal(first, expected) and torch.equal(again, expected)


def test_cuda_code_path_exercised_on_cpu_hashes_and_looks_up_like_the_reference():
    s = _setup()
    ids = torch.randint(0, 1000, (3, 17), generator=torch.Generator().manual_seed(2))
    h = cuda_engram.engram_hash(ids, s["compress"], s["multipliers"], s["primes"], 2, None)
    assert torch.equal(h, python_hashes(ids, s["compress"], s["multipliers"], s["primes"], 2))
    sizes = s["primes"].flatten()
    table, offsets = torch.randn(int(sizes.sum()), 4), ops.engram_offsets(sizes)
    with registry.forced("cpu"):
        ref = ops.engram_lookup(h, table, offsets)
    assert torch.equal(cuda_engram.engram_lookup(h, table, offsets, torch.device("cpu")), ref)


def test_prefix_continues_the_sequence():
    s = _setup()
    ids = torch.randint(0, 1000, (2, 12), generator=torch.Generator().manual_seed(3))
    whole = ops.engram_hash(ids, s["compress"], s["multipliers"], s["primes"], 2)
    for backend in BACKENDS:
        with registry.forced(backend):
            tail = ops.engram_hash(ids[:, 9:], s["compress"], s["multipliers"], s["primes"], 2, prefix=ids[:, 7:9])
        assert torch.equal(tail, whole[:, 9:])


@settings(max_examples=20, deadline=None)
@given(max_ngram=st.integers(2, 4), heads=st.integers(1, 4), length=st.integers(1, 12),
       compressed=st.integers(2, 5000), seed=st.integers(0, 999))
def test_fast_path_equals_python_integers(max_ngram, heads, length, compressed, seed):
    g = torch.Generator().manual_seed(seed)
    compress = torch.randint(0, compressed, (300,), generator=g)
    mult = layer_multipliers(seed % 7, compressed, max_ngram, seed)
    primes = torch.tensor(table_primes([0], [97] * (max_ngram - 1), heads)[0])
    ids = torch.randint(0, 300, (2, length), generator=g)
    with registry.forced("cpu_fast"):
        fast = ops.engram_hash(ids, compress, mult, primes, 5)
    assert torch.equal(fast, python_hashes(ids, compress, mult, primes, 5))


def test_table_primes_and_multipliers():
    primes = table_primes([1, 15], [1000, 2000], 4)
    flat = [p for layer in primes.values() for order in layer for p in order]
    assert len(set(flat)) == len(flat) and all(_is_prime(p) for p in flat)
    assert primes[1][0][0] == 1009 and all(p >= 2000 for p in primes[1][1] + primes[15][1])
    assert primes[15][0][0] > max(primes[1][0])  # later layers skip primes already given out
    m = layer_multipliers(15, 129280, 3)
    assert torch.equal(m, layer_multipliers(15, 129280, 3)) and not torch.equal(m, layer_multipliers(1, 129280, 3))
    assert bool((m % 2 == 1).all()) and int(m.max()) * 129279 < 2**63


@pytest.mark.parametrize("backend", BACKENDS)
def test_lookup_concatenates_heads_by_hand(backend):
    table = torch.arange(2 * 10, dtype=torch.float32).reshape(10, 2)  # row r = (2r, 2r+1)
    offsets = torch.tensor([0, 3, 7])  # heads own rows 0-2, 3-6, 7-9
    hashes = torch.tensor([[[2, 0, 1], [0, 3, 2]]])
    with registry.forced(backend):
        out = ops.engram_lookup(hashes, table, offsets)
    assert out.tolist() == [[[4, 5, 6, 7, 16, 17], [0, 1, 12, 13, 18, 19]]]


@pytest.mark.parametrize("backend", BACKENDS)
def test_lookup_reads_the_table_it_is_given_not_one_seen_before_at_that_address(backend):
    """Same data pointer, shape and dtype, different rows: a transposed view, a strided view, and
    a new tensor over a buffer rewritten outside torch (what a freed table's address reused by the
    next allocation looks like). Each lookup must return the rows of the table passed."""
    buffer = np.arange(36, dtype=np.float32).reshape(6, 6)
    table = torch.from_numpy(buffer)
    offsets, hashes = torch.tensor([0]), torch.arange(6).view(1, 6, 1)
    with registry.forced(backend):
        for view in (table, table.t(), table.as_strided((6, 6), (1, 6)), table.as_strided((6, 3), (6, 2))):
            assert torch.equal(ops.engram_lookup(hashes, view, offsets)[0], view), view.stride()
        ops.engram_lookup(hashes, table, offsets)
        buffer[:] = -buffer
        fresh = torch.from_numpy(buffer)  # same address, shape, strides and version as `table`
        assert torch.equal(ops.engram_lookup(hashes, fresh, offsets)[0], fresh)
        table[2, 3] = 100.0  # an in-place write through torch
        assert ops.engram_lookup(hashes, table, offsets)[0, 2, 3] == 100.0


def _layer(seed=0, d=32, n=4, embed=16, heads=4):
    torch.manual_seed(seed)
    compress = torch.randint(0, 300, (1000,))
    primes = table_primes([3], [101, 211], heads)[3]
    layer = Engram(d, n, compress, layer_multipliers(3, 300, 3), primes, embed_per_ngram=embed, pad_id=2)
    with torch.no_grad():
        for p in layer.parameters():
            p.normal_(0.0, 0.3)
        for norm in [*layer.norm1, *layer.norm2, *layer.short_conv["norms"]]:
            norm.weight.add_(1.0)
    return layer


def demo_forward(layer, streams, ids):
    """The demo's Engram forward written with the layer's own torch modules (no v4hal ops)."""
    h = python_hashes(ids, layer.compress, layer.multipliers, layer.primes, layer.pad_id)
    emb = layer.multi_head_embedding["embedding"](h + layer.offsets).flatten(-2)
    gates = []
    for s in range(layer.hc_mult):
        k = layer.norm1[s](layer.key_projs[s](emb))
        q = layer.norm2[s](streams[:, :, s])
        g = (k * q).sum(-1) / layer.hidden_size ** 0.5
        gates.append((g.abs().clamp_min(1e-6).sqrt() * g.sign()).sigmoid().unsqueeze(-1))
    value = torch.stack(gates, 2) * layer.value_proj(emb).unsqueeze(2)
    b, t, n, d = value.shape
    normed = torch.cat([layer.short_conv["norms"][s](value[:, :, s]) for s in range(n)], -1)
    conv = layer.short_conv["conv"]
    k = conv.kernel_size[0]
    y = torch.nn.functional.conv1d(normed.transpose(1, 2), conv.weight, groups=n * d,
                                   padding=(k - 1) * layer.max_ngram, dilation=layer.max_ngram)[..., :t]
    y = torch.nn.functional.silu(y).transpose(1, 2).reshape(b, t, n, d)
    return streams + value + y


@pytest.mark.parametrize("backend", BACKENDS)
def test_engram_layer_reproduces_the_demo_forward(backend):
    layer = _layer()
    streams = torch.randn(2, 11, 4, 32)
    ids = torch.randint(0, 1000, (2, 11))
    with torch.no_grad():
        expected = demo_forward(layer, streams, ids)
        with registry.forced(backend):
            got = layer(streams, ids)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def test_host_resident_table_with_prefetch_equals_inline_lookups():
    """On this CPU-only machine host and device memory coincide; the prefetch path (background
    thread, keyed hand-off, the host-resident table branch) must give bit-identical results.
    test_host_table_on_gpu checks the real host-to-GPU copy where a GPU exists."""
    layers = [_layer(seed) for seed in (0, 1, 2)]
    streams = torch.randn(2, 9, 4, 32)
    ids = torch.randint(0, 1000, (2, 9))
    with torch.no_grad():
        inline = streams
        for layer in layers:
            inline = layer(inline, ids)
        with ops.EngramPrefetcher("cpu") as pf:
            for i, layer in enumerate(layers):
                layer.keep_table_on_host().prefetch(pf, i, ids)
            prefetched = streams
            for i, layer in enumerate(layers):
                prefetched = layer(prefetched, memory=pf.get(i))
    assert torch.equal(prefetched, inline)


@pytest.mark.cuda
def test_host_table_on_gpu():
    layer = _layer().to("cuda")
    streams, ids = torch.randn(2, 9, 4, 32, device="cuda"), torch.randint(0, 1000, (2, 9))
    with torch.no_grad():
        on_device = layer(streams, ids)
        layer.keep_table_on_host()
        assert layer.table.device.type == "cpu"
        with ops.EngramPrefetcher("cuda") as pf:
            layer.prefetch(pf, "l", ids)
            host = layer(streams, memory=pf.get("l"))
    torch.testing.assert_close(host, on_device, rtol=0, atol=0)


def test_prefetcher_misuse():
    s = _setup()
    sizes = s["primes"].flatten()
    table, offsets = torch.randn(int(sizes.sum()), 4), ops.engram_offsets(sizes)
    with ops.EngramPrefetcher("cpu") as pf:
        with pytest.raises(KeyError, match="no lookup submitted"):
            pf.get(0)
        pf.submit(0, torch.full((1, 2, sizes.numel()), 10**9), table, offsets)
        with pytest.raises(OpInputError, match="engram_lookup: argument 'hashes'"):
            pf.get(0)  # the lookup's own error reaches the consumer


@pytest.mark.parametrize("backend", BACKENDS)
def test_gate_by_hand(backend):
    """One stream, D = 4: key = query = (1, 1, 1, 1) with unit norms gives <k, q>/sqrt(4) = 2, so
    g = sigmoid(sqrt(2)); key = -query gives sigmoid(-sqrt(2))."""
    q = torch.ones(1, 2, 1, 4, dtype=torch.float64)
    key = torch.cat([q[:, :1], -q[:, 1:]], 1)
    value = torch.tensor([[[1.0, 2, 3, 4], [1.0, 2, 3, 4]]], dtype=torch.float64)
    w = torch.ones(1, 4, dtype=torch.float64)
    with registry.forced(backend):
        out = ops.engram_gate(q, key, value, w, w, 1e-12)
    g = torch.sigmoid(torch.tensor([2.0, -2.0], dtype=torch.float64).sign() * torch.tensor(2.0, dtype=torch.float64).sqrt())
    torch.testing.assert_close(out[0, :, 0], g.unsqueeze(-1) * value[0], rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("backend", BACKENDS)
def test_gate_propagates_nan_like_the_reference(backend):
    """A NaN in one stream's hidden state or key makes that stream's gate NaN (and only it) on
    every backend: none may turn it into a finite gate."""
    g = torch.Generator().manual_seed(3)
    hidden, key = torch.randn(2, 4, 8, generator=g), torch.randn(2, 4, 8, generator=g)
    value, w = torch.randn(2, 8, generator=g), torch.ones(4, 8)
    hidden[0, 1, 2] = float("nan")
    key[1, 3, 0] = float("nan")
    with registry.forced("cpu"):
        ref = ops.engram_gate(hidden, key, value, w, w)
    with registry.forced(backend):
        out = ops.engram_gate(hidden, key, value, w, w)
    expected_nan = torch.zeros(2, 4, 8, dtype=torch.bool)
    expected_nan[0, 1], expected_nan[1, 3] = True, True
    assert torch.equal(ref.isnan(), expected_nan)
    torch.testing.assert_close(out, ref, equal_nan=True)


def test_token_ids_outside_the_vocabulary():
    s = _setup()
    for bad in (torch.tensor([[1, 1000]]), torch.tensor([[-1, 3]])):
        with pytest.raises(OpInputError, match=r"engram_hash: argument 'token_ids' expected token ids in \[0, 1000\)"):
            ops.engram_hash(bad, s["compress"], s["multipliers"], s["primes"], 2)
    with pytest.raises(OpInputError, match=r"engram_hash: argument 'prefix' expected token ids"):
        ops.engram_hash(torch.tensor([[1]]), s["compress"], s["multipliers"], s["primes"], 2, prefix=torch.tensor([[5000]]))
    with pytest.raises(OpInputError, match=r"engram_hash: argument 'pad_id'"):
        ops.engram_hash(torch.tensor([[1]]), s["compress"], s["multipliers"], s["primes"], 1000)


def test_other_bad_input():
    s = _setup()
    ids = torch.tensor([[1, 2]])
    with pytest.raises(OpInputError, match=r"engram_hash: argument 'primes' expected shape \(2, 3\)"):
        ops.engram_hash(ids, s["compress"], s["multipliers"], s["primes"][:1], 2)
    with pytest.raises(OpInputError, match=r"engram_hash: argument 'multipliers' expected id \* multiplier within int64"):
        ops.engram_hash(ids, s["compress"], torch.tensor([2**62 + 1, 3, 5]), s["primes"], 2)
    sizes = s["primes"].flatten()
    table, offsets = torch.randn(int(sizes.sum()), 4), ops.engram_offsets(sizes)
    with pytest.raises(OpInputError, match=r"engram_lookup: argument 'hashes' expected every head's hash in \[0, its table size\)"):
        ops.engram_lookup(torch.full((1, 1, sizes.numel()), int(sizes.min())), table, offsets)
    with pytest.raises(OpInputError, match=r"engram_lookup: argument 'offsets' expected one offset per head"):
        ops.engram_lookup(torch.zeros(1, 1, 2, dtype=torch.int64), table, offsets)
    hidden = torch.randn(2, 4, 8)
    with pytest.raises(OpInputError, match=r"engram_gate: argument 'key_norm' expected shape \(4, 8\).*4 streams"):
        ops.engram_gate(hidden, hidden, torch.randn(2, 8), torch.ones(3, 8), torch.ones(4, 8))
    with pytest.raises(OpInputError, match=r"engram_gate: argument 'value' expected shape \(2, 8\)"):
        ops.engram_gate(hidden, hidden, torch.randn(2, 4, 8), torch.ones(4, 8), torch.ones(4, 8))
