"""The FP8 KV cache (ops/kv_cache.py): byte-exact hand-built records in FlashMLA's layouts, the
round trip, attention over the cache against the float64 reference over the dequantized cache on
every CPU backend (paged, ragged, -1 indices, sinks), and clear errors for bad input."""

import pytest
import torch

from v4hal import ops
from v4hal.backends import registry
from v4hal.backends.cpu.attention import sparse_attention as attention_f64

V4, V32 = ops.KV_LAYOUTS["v4"], ops.KV_LAYOUTS["v3.2"]
BACKENDS = [b for b in ("cpu", "cpu_fast", "mindspore") if registry.probe(b)[0]]


def test_layout_sizes_are_flashmla_s():
    assert (V4.token_bytes, V4.dim, V4.tiles) == (584, 512, 7)
    assert (V32.token_bytes, V32.dim, V32.tiles) == (656, 576, 4)
    cache = ops.kv_cache_fp8_empty(3, 2, "v4")  # v4 blocks are allocated in 576-byte granules
    assert cache.shape == (3, 2, 584) and cache.stride() == (1728, 584, 1)


def _row(lay, tiles=(), rope=()):
    """A BF16 row: tile i filled per `tiles[i]` = (first value, rest), rope values given."""
    x = torch.zeros(lay.dim, dtype=torch.bfloat16)
    for i, (first, rest) in enumerate(tiles):
        x[i * lay.tile] = first
        x[i * lay.tile + 1:(i + 1) * lay.tile] = rest
    x[lay.nope:lay.nope + len(rope)] = torch.tensor(rope, dtype=torch.bfloat16)
    return x


# tile 0: zeros; tile 1: amax 448 -> scale 2**0; tile 2: amax 896 -> 2**1, 1.0 -> 0.5 (0x30);
# tile 3: amax 3 -> 3/448 rounded up to 2**-7, 3 -> 384 (0x7C). Rope: 1.0 = BF16 0x3F80, -2.0 = 0xC000.
TILES = ((0.0, 0.0), (448.0, 0.0), (896.0, 1.0), (3.0, 0.0))
ROPE = (1.0, -2.0)
EXPONENTS = (-13, 0, 1, -7)  # an all-zero tile takes FlashMLA's floor 1e-4 -> 2**-13
FIRST_CODES, REST_CODES = (0x00, 0x7E, 0x7E, 0x7C), (0x00, 0x00, 0x30, 0x00)


def _expected_nope(lay):
    out = []
    for t in range(lay.tiles):
        first, rest = (FIRST_CODES[t], REST_CODES[t]) if t < len(TILES) else (0, 0)
        out += [first] + [rest] * (lay.tile - 1)
    return out


def test_v4_bytes_of_hand_built_rows():
    cache = ops.kv_cache_fp8_empty(2, 2, "v4")
    cache.fill_(0xAA)  # every byte the write must set
    rows = torch.stack([torch.zeros(V4.dim, dtype=torch.bfloat16), _row(V4, TILES, ROPE)])
    ops.kv_cache_fp8_write(cache, rows, torch.tensor([3, 2]), "v4")  # block 1, offsets 1 and 0
    block = cache[1].flatten().tolist()
    rope = [0x80, 0x3F, 0x00, 0xC0] + [0] * 124
    assert block[0:576] == _expected_nope(V4) + rope
    assert block[576:1152] == [0] * 576  # the zero row
    scales = [127 + e for e in EXPONENTS] + [127 - 13] * 3 + [0]
    assert block[1152:1160] == scales
    assert block[1160:1168] == [127 - 13] * 7 + [0]
    assert cache[0].flatten().tolist() == [0xAA] * 1168  # block 0 untouched


def test_v32_bytes_of_hand_built_row():
    cache = ops.kv_cache_fp8_empty(1, 3, "v3.2")
    ops.kv_cache_fp8_write(cache, _row(V32, TILES, ROPE).unsqueeze(0), torch.tensor([1]), "v3.2")
    record = cache[0, 1].tolist()
    assert record[:512] == _expected_nope(V32)
    scales = torch.tensor([2.0 ** e for e in EXPONENTS], dtype=torch.float32).view(torch.uint8).tolist()
    assert scales[:4] == [0x00, 0x00, 0x00, 0x39] and scales[4:8] == [0x00, 0x00, 0x80, 0x3F]
    assert record[512:528] == scales
    assert record[528:] == [0x80, 0x3F, 0x00, 0xC0] + [0] * 124
    assert cache[0, 0].tolist() == [0] * 656 and cache[0, 2].tolist() == [0] * 656


@pytest.mark.parametrize("name", ["v4", "v3.2"])
def test_round_trip_within_one_e4m3_step(name):
    lay = ops.KV_LAYOUTS[name]
    g = torch.Generator().manual_seed(0)
    kv = (torch.randn(40, lay.dim, generator=g) * torch.logspace(-3, 3, 40).unsqueeze(1)).bfloat16()
    kv[5, :lay.nope] = 0  # an all-zero NoPE part
    cache = ops.kv_cache_fp8_empty(5, 8, name)
    slots = torch.randperm(40, generator=g)
    ops.kv_cache_fp8_write(cache, kv, slots, name)
    back = ops.kv_cache_fp8_read(cache, slots, name)
    x = kv.double()
    assert torch.equal(back[:, lay.nope:].double(), x[:, lay.nope:])  # rope kept in BF16
    tiles = x[:, :lay.nope].view(40, lay.tiles, lay.tile)
    scale = torch.exp2(torch.ceil(torch.log2((tiles.abs().amax(-1) / 448).clamp(min=1e-4)))).unsqueeze(-1)
    # e4m3 step at |v|: 2**(floor(log2 |v|) - 3) for normals, 2**-9 below 2**-6
    step = torch.exp2(torch.floor(torch.log2((tiles / scale).abs().clamp(min=2.0 ** -6))) - 3) * scale
    err = (back[:, :lay.nope].double().view_as(tiles) - tiles).abs()
    assert bool((err <= step / 2).all()) and bool((err > 0).any())
    assert torch.equal(back[5, :lay.nope], torch.zeros(lay.nope))
    empty = ops.kv_cache_fp8_read(cache, torch.tensor([[-1, int(slots[0])]]), name)
    assert empty.shape == (1, 2, lay.dim) and not empty[0, 0].any() and torch.equal(empty[0, 1], back[0])


def _reference(q, rows, positions, scale, sink, v_dim):
    """float64 sparse attention over dequantized rows `[B, N, D]`."""
    return attention_f64(q.double(), rows.double(), positions, scale, None if sink is None else sink.double(), v_dim)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name,v_dim", [("v4", None), ("v3.2", 512)])
@pytest.mark.parametrize("with_sink", [True, False])
def test_paged_attention_matches_the_float64_reference(backend, name, v_dim, with_sink):
    lay = ops.KV_LAYOUTS[name]
    g = torch.Generator().manual_seed(1)
    bs, lengths = 4, (10, 6)  # ragged: 3 blocks and 2 blocks
    table = torch.tensor([[5, 1, 3], [0, 6, 0]], dtype=torch.int32)  # seq 1's last entry unused
    cache = ops.kv_cache_fp8_empty(7, bs, name)
    kv = torch.randn(2, 10, lay.dim, generator=g).bfloat16()
    positions = torch.arange(10).expand(2, 10).contiguous()
    positions[1, 6:] = -1  # seq 1 has 6 tokens
    ops.kv_cache_fp8_write(cache, kv, ops.kv_cache.paged_slots(positions.unsqueeze(1), table, bs)[:, 0], name)
    b, s, h, k = 2, 3, 4, 8
    q = torch.randn(b, s, h, lay.dim, generator=g).bfloat16()
    idx = torch.stack([torch.randint(-1, n, (s, k), generator=g) for n in lengths]).to(torch.int32)
    idx[0, 0] = -1  # a query with no entry at all
    sink = torch.randn(h, generator=g) if with_sink else None
    rows = torch.stack([ops.kv_cache_fp8_read(cache, ops.kv_cache.paged_slots(positions[i].view(1, 1, -1),
                                                                               table[i:i + 1], bs)[0, 0], name)
                        for i in range(2)])
    ref_out, ref_lse = _reference(q, rows, idx, lay.dim ** -0.5, sink, v_dim or lay.dim)
    with registry.forced(backend):
        out, lse = ops.sparse_attention_fp8kv(q, cache, idx, lay.dim ** -0.5, name, block_table=table,
                                              sink=sink, v_dim=v_dim, return_lse=True)
        out32 = ops.sparse_attention_fp8kv(q.float(), cache, idx, lay.dim ** -0.5, name, block_table=table,
                                           sink=sink, v_dim=v_dim)
    assert out.dtype == torch.bfloat16 and out.shape == (b, s, h, v_dim or lay.dim)
    torch.testing.assert_close(out.double(), ref_out, rtol=1.6e-2, atol=1e-5)
    torch.testing.assert_close(out32.double(), ref_out, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(lse.double(), ref_lse, rtol=1e-5, atol=1e-6, equal_nan=True)
    if not with_sink:
        assert torch.isneginf(lse[0, 0]).all() and not out[0, 0].any()


@pytest.mark.parametrize("backend", BACKENDS)
def test_slot_indices_without_block_table(backend):
    g = torch.Generator().manual_seed(2)
    cache = ops.kv_cache_fp8_empty(3, 4, "v4")
    kv = torch.randn(12, V4.dim, generator=g)
    ops.kv_cache_fp8_write(cache, kv, torch.arange(12), "v4")
    cache[2, 3, :448] = 0x7F  # a NaN code in a row no query selects must not reach any output
    q = torch.randn(1, 2, 3, V4.dim, generator=g)
    idx = torch.tensor([[[0, 5, 5, -1], [11, 2, -1, -1]]])
    idx[0, 1, 0] = 10
    sink = torch.randn(3, generator=g)
    rows = ops.kv_cache_fp8_read(cache, torch.arange(12), "v4").unsqueeze(0)
    ref = _reference(q, rows, idx, 0.05, sink, V4.dim)[0]
    with registry.forced(backend):
        out = ops.sparse_attention_fp8kv(q, cache, idx, 0.05, "v4", sink=sink)
    torch.testing.assert_close(out.double(), ref, rtol=1e-5, atol=1e-6)


def test_bad_input_is_a_clear_error():
    v4, v32 = ops.kv_cache_fp8_empty(2, 4, "v4"), ops.kv_cache_fp8_empty(2, 4, "v3.2")
    q = torch.zeros(1, 1, 2, V4.dim, dtype=torch.bfloat16)
    idx = torch.zeros(1, 1, 3, dtype=torch.int32)
    with pytest.raises(ops.OpInputError, match=r"sparse_attention_fp8kv: argument 'cache'.*584 bytes.*v3.2 layout"):
        ops.sparse_attention_fp8kv(q, v32, idx, 0.1, "v4")
    with pytest.raises(ops.OpInputError, match=r"kv_cache_fp8_read: argument 'cache' expected 656 bytes"):
        ops.kv_cache_fp8_read(v4[..., :600], idx, "v3.2")
    with pytest.raises(ops.OpInputError, match=r"argument 'kv' expected last dim = 448 nope \+ 64 rope \(v4\) = 512, got 576"):
        ops.kv_cache_fp8_write(v4, torch.zeros(2, 576), torch.tensor([0, 1]), "v4")
    with pytest.raises(ops.OpInputError, match=r"argument 'block_table' expected values in \[0, 1\]"):
        ops.sparse_attention_fp8kv(q, v4, idx, 0.1, "v4", block_table=torch.tensor([[0, 2]]))
    with pytest.raises(ops.OpInputError, match=r"argument 'indices' expected values in \[-1, 7\]"):
        ops.sparse_attention_fp8kv(q, v4, idx + 8, 0.1, "v4", block_table=torch.tensor([[0, 1]]))
    with pytest.raises(ops.OpInputError, match=r"argument 'slots' expected values in \[-1, 7\]"):
        ops.kv_cache_fp8_write(v4, torch.zeros(1, 512), torch.tensor([8]), "v4")
    with pytest.raises(ops.OpInputError, match=r"argument 'layout' expected one of"):
        ops.kv_cache_fp8_read(v4, idx, "v5")
    with pytest.raises(ops.OpInputError, match=r"argument 'kv' expected finite"):
        ops.kv_cache_fp8_write(v4, torch.full((1, 512), float("inf")), torch.tensor([0]), "v4")
    with pytest.raises(ops.OpInputError, match=r"argument 'cache' expected each block's bytes contiguous"):
        ops.kv_cache_fp8_read(torch.zeros(2, 584, 4, dtype=torch.uint8).transpose(1, 2), idx, "v4")


@pytest.mark.parametrize("backend", BACKENDS)
def test_indexer_over_the_fp8_cache_matches_the_float64_reference(backend):
    lay = ops.KV_LAYOUTS["index"]
    assert (lay.token_bytes, lay.dim) == (132, 128)
    g = torch.Generator().manual_seed(3)
    bs, table = 4, torch.tensor([[2, 0], [1, 3]], dtype=torch.int32)
    cache = ops.kv_cache_fp8_empty(4, bs, "index")
    keys = torch.randn(2, 7, 128, generator=g) * torch.tensor([1.0, 50.0]).view(2, 1, 1)
    positions = torch.arange(7).expand(2, 7)  # position 7 of each sequence stays unwritten
    ops.kv_cache_fp8_write(cache, keys, ops.kv_cache.paged_slots(positions.unsqueeze(1), table, bs)[:, 0], "index")
    q, w = torch.randn(2, 3, 4, 128, generator=g), torch.randn(2, 3, 4, generator=g)
    every = ops.kv_cache.paged_slots(torch.arange(8).expand(2, 1, 8), table, bs)[:, 0]
    rows = ops.kv_cache_fp8_read(cache, every, "index").double()
    assert not rows[:, 7].any()
    torch.testing.assert_close(rows[:, :7], keys.double(), rtol=2 ** -4, atol=0)  # within half an e4m3 step
    ref = 0.1 * (torch.relu(torch.einsum("bshd,btd->bsht", q.double(), rows)) * w.double().unsqueeze(-1)).sum(2)
    with registry.forced(backend):
        out = ops.indexer_scores_fp8kv(q, cache, w, 0.1, table)
        out16 = ops.indexer_scores_fp8kv(q.bfloat16(), cache, w.bfloat16(), 0.1, table)
    assert out.dtype == torch.float32 and out.shape == (2, 3, 8)
    torch.testing.assert_close(out.double(), ref, rtol=1e-5, atol=1e-5)
    ref16 = 0.1 * (torch.relu(torch.einsum("bshd,btd->bsht", q.bfloat16().double(), rows))
                   * w.bfloat16().double().unsqueeze(-1)).sum(2)
    torch.testing.assert_close(out16.double(), ref16, rtol=1e-2, atol=1e-2 * ref16.abs().max().item())


@pytest.mark.parametrize("name", ["v4", "v3.2", "index"])
def test_write_has_fixed_shapes_and_no_host_read(name):
    """A dropped row (-1) may share a slot with a kept one, or every row may be dropped: the
    bytes are those of writing the kept rows alone, and the write reads nothing back to the host
    (it has no data-dependent shape: the Ascend dry run runs it on the Meta device)."""
    from v4hal.bench.host_reads import HostReads

    lay = ops.KV_LAYOUTS[name]
    g = torch.Generator().manual_seed(4)
    kv = torch.randn(4, lay.dim, generator=g)
    base = ops.kv_cache_fp8_empty(2, 4, name)
    ops.kv_cache_fp8_write(base, torch.randn(8, lay.dim, generator=g), torch.arange(8), name)
    want = base.clone()
    ops.kv_cache_fp8_write(want, kv[[1, 3]], torch.tensor([0, 6]), name)
    got, untouched = base.clone(), base.clone()
    registry.configure(checks="shapes")  # the checks' own reads are counted elsewhere
    try:
        with HostReads() as reads:
            ops.kv_cache_fp8_write(got, kv, torch.tensor([-1, 0, -1, 6]), name)
            ops.kv_cache_fp8_write(untouched, kv, torch.tensor([-1, -1, -1, -1]), name)
    finally:
        registry.reset()
    assert reads.total == 0, reads.where
    assert torch.equal(got, want) and torch.equal(untouched, base)
    meta = ops.kv_cache_fp8_empty(2, 4, name, device="meta")  # a data-dependent shape fails here
    ops.kv_cache_fp8_write(meta, kv.to("meta"), torch.tensor([-1, 0, -1, 6], device="meta"), name)


def test_indexer_bad_input_is_a_clear_error():
    keys = ops.kv_cache_fp8_empty(2, 4, "index")
    q, w, table = torch.zeros(1, 1, 2, 128), torch.zeros(1, 1, 2), torch.tensor([[0, 1]])
    with pytest.raises(ops.OpInputError, match=r"indexer_scores_fp8kv: argument 'cache' expected 132 bytes"):
        ops.indexer_scores_fp8kv(q, ops.kv_cache_fp8_empty(2, 4, "v4"), w, 0.1, table)
    with pytest.raises(ops.OpInputError, match=r"argument 'block_table' expected values in \[0, 1\]"):
        ops.indexer_scores_fp8kv(q, keys, w, 0.1, torch.tensor([[0, 2]]))
    with pytest.raises(ops.OpInputError, match=r"argument 'q' expected head dim = the index layout's 128"):
        ops.indexer_scores_fp8kv(torch.zeros(1, 1, 2, 64), keys, w, 0.1, table)
    with pytest.raises(ops.OpInputError, match=r"argument 'weights' expected shape \(1, 1, 2\)"):
        ops.indexer_scores_fp8kv(q, keys, torch.zeros(1, 1, 3), 0.1, table)


def test_compiled_write_writes_the_same_bytes():
    """Inside a compiled graph the BF16 rounding before quantizing must survive (inductor may
    drop a `.to(bfloat16).float()` pair); rows with BF16 ties, a huge and a tiny value."""
    g = torch.Generator().manual_seed(5)
    kv = torch.randn(16, V4.dim, generator=g) * 3
    kv[0, :4] = torch.tensor([1.00390625, 1.01171875, 3e38, 1e-30])
    slots = torch.arange(16).flip(0)

    def write(kv):
        return ops.kv_cache_fp8_write(ops.kv_cache_fp8_empty(4, 4, "v4"), kv, slots, "v4")

    torch.testing.assert_close(torch.compile(write)(kv), write(kv), rtol=0, atol=0)
