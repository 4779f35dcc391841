"""The int8 KV cache layout (ops/kv_cache.py, layout "int8": the record Ascend's
`npu_kv_quant_sparse_flash_attention` reads): hand-built bytes, the round trip within half a step,
attention against the float64 reference over the dequantized cache on every CPU backend, layout
mix-ups refused, and the ascend backend on the emulated chips: the kernel runs where it can give
what the call asks for (no LSE, no sink), equal to the reference within bf16 rounding, a flipped
glue decision fails, and the other calls fall back."""

import pytest
import torch

from v4hal import ops
from v4hal.backends import ascend, registry
from v4hal.backends.cpu.attention import sparse_attention as attention_f64
from v4hal.ops._check import OpInputError

from ascend_util import Flipped, answer_npu_with

I8 = ops.KV_LAYOUTS["int8"]
BACKENDS = [b for b in ("cpu", "cpu_fast", "mindspore") if registry.probe(b)[0]]
KERNEL = "npu_kv_quant_sparse_flash_attention"


def test_layout_is_the_kernels_record():
    assert (I8.token_bytes, I8.dim, I8.tiles) == (656, 576, 4)  # 512 + 64 * 2 + 4 * 4, the docs' KV_D
    cache = ops.kv_cache_fp8_empty(3, 16, "int8")
    assert cache.dtype == torch.int8 and cache.shape == (3, 16, 656) and cache.is_contiguous()


def test_bytes_of_a_hand_built_row():
    # tile 0 zeros (scale 0); tile 1 amax 127 -> scale 1, 0.5 -> 0 (ties to even); tile 2 amax 254
    # -> scale 2, -254 -> -127, 3 -> 1.5 -> 2; tile 3 amax 1 -> scale 1/127, 0.25 -> 31.75 -> 32.
    x = torch.zeros(576, dtype=torch.bfloat16)
    for i, (first, rest) in enumerate(((0.0, 0.0), (127.0, 0.5), (-254.0, 3.0), (1.0, 0.25))):
        x[i * 128], x[i * 128 + 1:(i + 1) * 128] = first, rest
    x[512:514] = torch.tensor([1.0, -2.0])
    cache = ops.kv_cache_fp8_empty(1, 2, "int8")
    ops.kv_cache_fp8_write(cache, x.unsqueeze(0), torch.tensor([1]), "int8")
    rec = cache[0, 1].view(torch.uint8)
    assert not cache[0, 0].any()
    codes = rec[:512].view(torch.int8).view(4, 128)
    assert codes[:, 0].tolist() == [0, 127, -127, 127] and codes[:, 1:].unique(dim=1).flatten().tolist() == [0, 0, 2, 32]
    assert rec[512:516].tolist() == [0x80, 0x3F, 0x00, 0xC0] and not rec[516:640].any()  # BF16 1.0, -2.0
    scales = torch.tensor([0.0, 1.0, 2.0, 1 / 127], dtype=torch.float32)
    assert torch.equal(rec[640:], scales.view(torch.uint8))


def test_round_trip_within_half_a_step():
    g = torch.Generator().manual_seed(0)
    kv = (torch.randn(40, 576, generator=g) * torch.logspace(-3, 3, 40).unsqueeze(1)).bfloat16()
    kv[5, :512] = 0
    cache = ops.kv_cache_fp8_empty(5, 8, "int8")
    slots = torch.randperm(40, generator=g)
    ops.kv_cache_fp8_write(cache, kv, slots, "int8")
    back = ops.kv_cache_fp8_read(cache, slots, "int8").double()
    x = kv.double()
    assert torch.equal(back[:, 512:], x[:, 512:])
    tiles = x[:, :512].view(40, 4, 128)
    step = (tiles.abs().amax(-1, keepdim=True) / 127).float().double()  # the stored float32 scale
    err = (back[:, :512].view_as(tiles) - tiles).abs()
    # half a step, plus float32 rounding of value / scale and code * scale
    assert bool((err <= step / 2 * (1 + 2 ** -16)).all()) and bool((err > step / 2 * 0.99).any())
    assert not back[5, :512].any()


def _filled(g, blocks=5, block_size=16):
    cache = ops.kv_cache_fp8_empty(blocks, block_size, "int8")
    n = blocks * block_size
    ops.kv_cache_fp8_write(cache, torch.randn(n, 576, generator=g).bfloat16(), torch.arange(n), "int8")
    return cache


def _case(seed=1, heads=4, s=3, k=12):
    """q bf16, a filled paged cache (block size 16), a ragged block table, positions with -1."""
    g = torch.Generator().manual_seed(seed)
    cache = _filled(g)
    table = torch.tensor([[4, 1, 3], [0, 2, 0]], dtype=torch.int32)
    idx = torch.stack([torch.randint(-1, n, (s, k), generator=g) for n in (48, 20)]).to(torch.int32)
    idx[0, 0] = -1  # a query with no entry
    q = torch.randn(2, s, heads, 576, generator=g).bfloat16()
    return q, cache, idx, table


def _reference(q, cache, idx, table, sink=None):
    """float64 attention over the dequantized rows of each sequence's positions."""
    bs, span = cache.shape[1], table.shape[1] * cache.shape[1]
    pos = torch.arange(span).view(1, 1, span).expand(2, 1, span)
    rows = ops.kv_cache_fp8_read(cache, ops.kv_cache.paged_slots(pos, table, bs)[:, 0], "int8")
    return attention_f64(q.double(), rows.double(), idx, 576 ** -0.5, None if sink is None else sink.double(), 512)


@pytest.mark.parametrize("backend", BACKENDS)
def test_paged_attention_matches_the_float64_reference(backend):
    q, cache, idx, table = _case()
    sink = torch.randn(4, generator=torch.Generator().manual_seed(3))
    ref_out, ref_lse = _reference(q, cache, idx, table, sink)
    with registry.forced(backend):
        out, lse = ops.sparse_attention_fp8kv(q, cache, idx, 576 ** -0.5, "int8", block_table=table, sink=sink,
                                              v_dim=512, return_lse=True)
        out32 = ops.sparse_attention_fp8kv(q.float(), cache, idx, 576 ** -0.5, "int8", block_table=table, sink=sink,
                                           v_dim=512)
    torch.testing.assert_close(out.double(), ref_out, rtol=1.6e-2, atol=1e-5)
    torch.testing.assert_close(out32.double(), ref_out, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(lse.double(), ref_lse, rtol=1e-5, atol=1e-6)


def test_a_cache_of_another_layout_is_refused():
    v32, i8 = ops.kv_cache_fp8_empty(2, 16, "v3.2"), ops.kv_cache_fp8_empty(2, 16, "int8")
    q, idx = torch.zeros(1, 1, 2, 576, dtype=torch.bfloat16), torch.zeros(1, 1, 3, dtype=torch.int32)
    with pytest.raises(OpInputError, match="cache.*int8"):  # same width, told apart by the dtype
        ops.sparse_attention_fp8kv(q, v32, idx, 0.1, "int8")
    with pytest.raises(OpInputError, match="cache.*uint8"):
        ops.kv_cache_fp8_read(i8, idx, "v3.2")
    with pytest.raises(OpInputError, match="656 bytes per token"):
        ops.kv_cache_fp8_read(i8[..., :584], idx, "int8")


# ----------------------------------------------------------------------- ascend (emulated chips)

def _close_to_bf16_level(out, ref):
    """The kernel's K and V are the dequantized latents rounded to bf16 (cube inputs) and its
    output is bf16: measured relative RMS 2.7e-3 against the float64 reference (cpu_fast's bf16
    output: 1.7e-3), max abs 8e-3 on outputs up to 1.9."""
    d = out.double() - ref
    return bool(d.pow(2).mean().sqrt() <= 5e-3 * ref.pow(2).mean().sqrt()) and bool(d.abs().max() <= 1.6e-2)


@pytest.mark.parametrize("chip", ["A2", "A3", "A5"])
def test_ascend_runs_the_kernel_and_matches_the_reference(emulate, chip):
    emulate(chip)
    q, cache, idx, table = _case(heads=8)
    ref_out, _ = _reference(q, cache, idx, table)
    with registry.forced("ascend"):
        out = ops.sparse_attention_fp8kv(q, cache, idx, 576 ** -0.5, "int8", block_table=table, v_dim=512)
    assert ascend.npu().calls[KERNEL] == 1
    assert out.dtype == torch.bfloat16 and out.shape == (2, 3, 8, 512) and not out[0, 0].any()
    assert _close_to_bf16_level(out, ref_out)


def test_ascend_falls_back_where_the_kernel_cannot_answer(emulate):
    emulate("A3")
    q, cache, idx, table = _case()
    sink = torch.randn(4, generator=torch.Generator().manual_seed(3))
    ref_out, ref_lse = _reference(q, cache, idx, table, sink)
    with registry.forced("ascend"):
        out, lse = ops.sparse_attention_fp8kv(q, cache, idx, 576 ** -0.5, "int8", block_table=table, v_dim=512,
                                              return_lse=True)  # the kernel has no LSE output
        with_sink = ops.sparse_attention_fp8kv(q, cache, idx, 576 ** -0.5, "int8", block_table=table, sink=sink,
                                               v_dim=512)  # nor a sink input
        ops.sparse_attention_fp8kv(q.float(), cache, idx, 576 ** -0.5, "int8", block_table=table, v_dim=512)
    assert ascend.npu().calls[KERNEL] == 0
    torch.testing.assert_close(with_sink.double(), ref_out, rtol=1.6e-2, atol=1e-5)
    assert torch.isneginf(lse[0, 0]).all() and lse.shape == (2, 3, 4)


def _reversed_indices(fn, q, key, value, idx, *args, **kw):
    return fn(q, key, value, idx.flip(-1).contiguous(), *args, **kw)  # -1 padding first


def _scales_read_as_rope(fn, q, key, value, idx, *args, **kw):
    rec = key.view(torch.uint8)
    swapped = torch.cat([rec[..., :512], rec[..., 528:], rec[..., 512:528]], -1).view(torch.int8)
    return fn(q, swapped, swapped, idx, *args, **kw)


@pytest.mark.parametrize("change", [_reversed_indices, _scales_read_as_rope])
def test_a_flipped_glue_decision_fails(emulate, monkeypatch, change):
    emulate("A3")
    q, cache, idx, table = _case(heads=8)
    ref_out, _ = _reference(q, cache, idx, table)
    answer_npu_with(monkeypatch, Flipped(ascend.npu(), KERNEL, change))
    with registry.forced("ascend"):
        out = ops.sparse_attention_fp8kv(q, cache, idx, 576 ** -0.5, "int8", block_table=table, v_dim=512)
    assert not _close_to_bf16_level(out, ref_out)
