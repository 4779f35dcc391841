"""The cuda backend's FP8 KV cache kernels (backends/cuda/triton_kv_cache.py), run by Triton's
interpreter (TRITON_INTERPRET=1, set by conftest.py) on CPU tensors against the float64 reference
over the dequantized cache: the v4, v3.2 and index layouts, -1 indices, empty rows, sinks, logits in
the thousands, slices merged, bytes of rows never picked never read; the indexer over FP8 keys; the
public ops through ragged block tables with the cuda backend forced onto the kernels (bad input
stops at the contracts); and the FlashMLA glue against a stand-in written from FlashMLA's
documented semantics (its README, `flash_mla_with_kvcache`'s docstring, `tests/ref.py`)."""

import platform

import pytest
import torch

if platform.system() == "Linux" and platform.machine() == "x86_64":
    import triton  # noqa: F401  (pinned in the test extra for this platform: a missing one is a failure)
else:
    pytest.importorskip("triton", reason="triton wheels exist for Linux x86_64 only")

from v4hal import ops  # noqa: E402
from v4hal.backends import cuda as cuda_pkg  # noqa: E402
from v4hal.backends import registry  # noqa: E402
from v4hal.backends.cuda import kv_cache as cuda_kv  # noqa: E402
from v4hal.backends.cuda import triton_kv_cache  # noqa: E402
from v4hal.ops._check import OpInputError  # noqa: E402

reference = registry.family_view("cpu", "kv_cache")
ATOL = {torch.float32: 2e-5, torch.bfloat16: 2e-2}


def gen(seed):
    return torch.Generator().manual_seed(seed)


def filled_cache(name, blocks, block_size, g, spread=2.0):
    """A cache whose every slot holds a row, rows spanning 10**-spread .. 10**spread."""
    lay = ops.KV_LAYOUTS[name]
    n = blocks * block_size
    cache = ops.kv_cache_fp8_empty(blocks, block_size, name)
    kv = torch.randn(n, lay.dim, generator=g) * torch.logspace(-spread, spread, n)[torch.randperm(n, generator=g)].unsqueeze(1)
    ops.kv_cache_fp8_write(cache, kv, torch.arange(n), name)
    return cache, lay


def attention_case(name, b, s, h, k, dtype, g, *, sink=True, q_scale=1.0, blocks=5, block_size=4):
    cache, lay = filled_cache(name, blocks, block_size, g)
    q = (torch.randn(b, s, h, lay.dim, generator=g) * q_scale / lay.dim ** 0.5).to(dtype)
    slots = torch.randint(-1, blocks * block_size, (b, s, k), generator=g, dtype=torch.int32)
    slots[0, 0] = -1  # a query with no entry
    if s > 1:
        slots[-1, 1, k // 2:] = -1  # a ragged valid prefix
        slots[-1, 1, 0] = slots[-1, 1, 1]  # a duplicate counts twice
    sk = torch.randn(h, generator=g).to(dtype) if sink else None
    return q, cache, lay, slots, sk


def reference_attention(q, cache, lay, slots, scale, sink, v_dim):
    return reference.sparse_attention_fp8kv(q.double(), cache, slots, scale, lay,
                                            None if sink is None else sink.double(), v_dim)


def assert_attention_close(got, ref, dtype):
    (out, lse), (rout, rlse) = got, ref
    assert out.dtype == dtype and lse.dtype == torch.float32 and out.shape == rout.shape
    torch.testing.assert_close(out.double(), rout, rtol=0, atol=ATOL[dtype] * max(1.0, rout.abs().max().item()))
    assert torch.equal(torch.isneginf(lse), torch.isneginf(rlse))  # -inf exactly where the row is empty
    finite = torch.isfinite(rlse)
    torch.testing.assert_close(lse.double()[finite], rlse[finite], rtol=1e-6, atol=1e-5)


@pytest.mark.parametrize("name, b, s, h, k, v_dim", [
    ("v4", 2, 3, 5, 37, 512),       # V4: shared KV, the RoPE part in the output; ragged heads and index blocks
    ("v4", 1, 1, 20, 16, 500),      # decode, two head blocks, v_dim cutting the RoPE part
    ("v3.2", 2, 2, 3, 20, 512),     # V3.2 absorbed MLA: values are the NoPE latent
    ("v3.2", 1, 2, 4, 9, 300),      # v_dim inside the NoPE part
    ("index", 1, 3, 2, 11, 128),    # no RoPE part at all
], ids=["v4", "v4-decode", "v3.2", "v3.2-short-v", "index"])
@pytest.mark.parametrize("sink", [True, False], ids=["sink", "no-sink"])
def test_fp8kv_attention_kernel_matches_float64_reference(name, b, s, h, k, v_dim, sink):
    g = gen(h * 100 + k)
    for dtype, splits in ((torch.float32, 1), (torch.bfloat16, 1), (torch.float32, 3)):
        q, cache, lay, slots, sk = attention_case(name, b, s, h, k, dtype, g, sink=sink)
        got = triton_kv_cache.sparse_attention_fp8kv(q, cache, slots, 0.7, lay, sk, v_dim, splits=splits)
        assert_attention_close(got, reference_attention(q, cache, lay, slots, 0.7, sk, v_dim), dtype)


@pytest.mark.parametrize("splits", [1, 2])
def test_fp8kv_attention_kernel_large_logits_stay_finite(splits):
    q, cache, lay, slots, sk = attention_case("v4", 1, 2, 4, 40, torch.float32, gen(5), q_scale=300.0)
    sk = sk * 1000.0  # some sinks dominate the row, some vanish
    got = triton_kv_cache.sparse_attention_fp8kv(q, cache, slots, 1.0, lay, sk, 512, splits=splits)
    ref = reference_attention(q, cache, lay, slots, 1.0, sk, 512)
    assert torch.isfinite(got[0]).all() and ref[1].abs().max() > 1000
    torch.testing.assert_close(got[0].double(), ref[0], rtol=0, atol=1e-4 * ref[0].abs().max().item())
    torch.testing.assert_close(got[1].double(), ref[1], rtol=1e-6, atol=1e-3)


@pytest.mark.parametrize("name", ["v4", "v3.2"])
def test_fp8kv_kernel_reads_only_the_picked_rows(name):
    """Every byte of blocks 2-3 (codes, scales, RoPE) holds 0xFF (NaN codes, an infinite ue8m0
    scale, NaN RoPE); no query picks them, so nothing of them reaches the output. A picked row of
    such bytes would (the reference shows NaN)."""
    q, cache, lay, slots, sk = attention_case(name, 2, 2, 3, 12, torch.float32, gen(9), blocks=4)
    cache[2:] = 0xFF
    slots = torch.where(slots >= 8, slots % 8, slots)  # blocks 0-1 only
    got = triton_kv_cache.sparse_attention_fp8kv(q, cache, slots, 0.5, lay, sk, 512)
    assert_attention_close(got, reference_attention(q, cache, lay, slots, 0.5, sk, 512), torch.float32)
    slots[1, 1, 0] = 9  # now one query picks a poisoned row
    got = triton_kv_cache.sparse_attention_fp8kv(q, cache, slots, 0.5, lay, sk, 512)
    assert got[0][1, 1].isnan().all() and not got[0][:, 0].isnan().any()


def test_fp8kv_split_slices_merge_like_one_pass():
    q, cache, lay, slots, sk = attention_case("v3.2", 2, 2, 3, 70, torch.float32, gen(19))
    one = triton_kv_cache.sparse_attention_fp8kv(q, cache, slots, 0.3, lay, sk, 512, splits=1)
    for splits in (2, 5):
        torch.testing.assert_close(triton_kv_cache.sparse_attention_fp8kv(q, cache, slots, 0.3, lay, sk, 512,
                                                                           splits=splits), one, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("name, h, t", [("index", 3, 70), ("index", 1, 5), ("v3.2", 2, 20)],
                         ids=["index", "one-head", "v3.2-keys-with-rope"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fp8kv_indexer_kernel_matches_float64_reference(name, h, t, dtype):
    g = gen(h * t)
    cache, lay = filled_cache(name, 6, 4, g, spread=1.0)
    b, s = 2, 17  # two query blocks
    slots = torch.randint(0, 24, (b, t), generator=g)
    q = torch.randn(b, s, h, lay.dim, generator=g).to(dtype)
    w = torch.randn(b, s, h, generator=g).to(dtype)
    got = triton_kv_cache.indexer_scores_fp8kv(q, cache, slots, w, 0.1, lay)
    ref = reference.indexer_scores_fp8kv(q.double(), cache, slots, w.double(), 0.1, lay)
    assert got.dtype == torch.float32 and got.shape == ref.shape
    torch.testing.assert_close(got.double(), ref, rtol=1e-5, atol=1e-5 * ref.abs().max().item())


# ------------------------------------------------------------------------------ through the contracts

@pytest.fixture
def cuda_on_kernels(monkeypatch):
    """The cuda backend forced, probing usable, its FP8 KV kernels on CPU tensors (spied on)."""
    calls = []
    for name in ("sparse_attention_fp8kv", "indexer_scores_fp8kv"):
        kernel = getattr(triton_kv_cache, name)
        monkeypatch.setattr(triton_kv_cache, name, lambda *a, _k=kernel, _n=name, **kw: (calls.append(_n), _k(*a, **kw))[1])
    monkeypatch.setattr(cuda_pkg, "probe", lambda: (True, ""))
    monkeypatch.setattr(cuda_pkg, "triton_kernels", lambda family, x: triton_kv_cache if family == "kv_cache" else None)
    registry.reset()
    with registry.forced("cuda"):
        yield calls
    registry.reset()


def paged_case(name, g):
    """Two sequences of 10 and 6 tokens in blocks of 4 through a ragged block table."""
    lay = ops.KV_LAYOUTS[name]
    table = torch.tensor([[5, 1, 3], [0, 6, 0]], dtype=torch.int32)
    cache = ops.kv_cache_fp8_empty(7, 4, name)
    positions = torch.arange(10).expand(2, 10).contiguous()
    positions[1, 6:] = -1
    kv = torch.randn(2, 10, lay.dim, generator=g).bfloat16()
    ops.kv_cache_fp8_write(cache, kv, ops.kv_cache.paged_slots(positions.unsqueeze(1), table, 4)[:, 0], name)
    idx = torch.stack([torch.randint(-1, n, (3, 8), generator=g) for n in (10, 6)]).to(torch.int32)
    idx[0, 0] = -1
    return lay, table, cache, idx


@pytest.mark.parametrize("name, v_dim", [("v4", None), ("v3.2", 512)])
def test_public_fp8kv_attention_reaches_the_kernel_through_a_block_table(cuda_on_kernels, name, v_dim):
    g = gen(14)
    lay, table, cache, idx = paged_case(name, g)
    q = torch.randn(2, 3, 4, lay.dim, generator=g).bfloat16()
    sk = torch.randn(4, generator=g)
    out, lse = ops.sparse_attention_fp8kv(q, cache, idx, 0.1, name, block_table=table, sink=sk, v_dim=v_dim,
                                          return_lse=True)
    slots = ops.kv_cache.paged_slots(idx, table, 4)
    ref = reference_attention(q, cache, lay, slots, 0.1, sk, v_dim or lay.dim)
    assert_attention_close((out, lse), ref, torch.bfloat16)
    assert cuda_on_kernels == ["sparse_attention_fp8kv"]
    ops.sparse_attention_fp8kv(q.double(), cache, idx, 0.1, name, block_table=table, v_dim=v_dim)  # float64: torch
    assert cuda_on_kernels == ["sparse_attention_fp8kv"]


def test_public_fp8kv_indexer_reaches_the_kernel(cuda_on_kernels):
    g = gen(15)
    cache, lay = filled_cache("index", 7, 4, g)
    table = torch.tensor([[5, 1, 3], [0, 6, 2]], dtype=torch.int32)
    q, w = torch.randn(2, 3, 2, 128, generator=g), torch.randn(2, 3, 2, generator=g)
    got = ops.indexer_scores_fp8kv(q, cache, w, 0.1, table)
    positions = torch.arange(12).expand(2, 1, 12)
    ref = reference.indexer_scores_fp8kv(q.double(), cache, ops.kv_cache.paged_slots(positions, table, 4).squeeze(1),
                                         w.double(), 0.1, lay)
    torch.testing.assert_close(got.double(), ref, rtol=1e-5, atol=1e-5 * ref.abs().max().item())
    assert cuda_on_kernels == ["indexer_scores_fp8kv"]


@pytest.mark.parametrize("bad, arg", [("width", "cache"), ("other-layout", "cache"), ("block-id", "block_table"),
                                      ("position", "indices"), ("sink", "sink")])
def test_bad_fp8kv_input_stops_at_the_contract(cuda_on_kernels, bad, arg):
    lay, table, cache, idx = paged_case("v4", gen(16))
    q, sk, layout = torch.randn(2, 3, 4, lay.dim).bfloat16(), torch.randn(4), "v4"
    if bad == "width":
        cache = torch.zeros(7, 4, 583, dtype=torch.uint8)
    elif bad == "other-layout":
        layout = "v3.2"  # a v4 cache read as v3.2: 584 bytes where 656 are expected
        q = torch.randn(2, 3, 4, 576).bfloat16()
    elif bad == "block-id":
        table[1, 2] = 7
    elif bad == "position":
        idx[0, 1, 0] = 12
    else:
        sk = sk[:3]
    with pytest.raises(OpInputError, match=f"sparse_attention_fp8kv: argument '{arg}'"):
        ops.sparse_attention_fp8kv(q, cache, idx, 0.1, layout, block_table=table, sink=sk)
    assert cuda_on_kernels == []


# ------------------------------------------------------------------------------ FlashMLA's sparse FP8 decode

class DocumentedFlashMLA:
    """`flash_mla` as its documentation states the sparse FP8 decode (float64 over the dequantized
    cache): indices are cache slots, -1 invalid, topk a multiple of 64; the sink scales the output by
    exp(lse) / (exp(lse) + exp(sink)) and stays out of the returned LSE; a query with no valid index
    gets output 0 and LSE +inf; the LSE comes back as `[batch, heads, seq_q]`. The argument checks
    are those its C++ entry makes."""

    def __init__(self):
        self.calls = 0

    def get_mla_metadata(self, *args, **kwargs):
        return object(), None

    def flash_mla_with_kvcache(self, q, k_cache, block_table, cache_seqlens, head_dim_v, meta, num_splits,
                               softmax_scale=None, causal=False, is_fp8_kvcache=False, indices=None, attn_sink=None):
        self.calls += 1
        assert q.dtype == torch.bfloat16 and q.dim() == 4 and k_cache.dim() == 4 and k_cache.shape[2] == 1
        assert head_dim_v == 512 and is_fp8_kvcache and not causal and block_table is None and num_splits is None
        assert indices.dtype == torch.int32 and indices.shape[:2] == q.shape[:2] and indices.shape[2] % 64 == 0
        assert attn_sink is None or (attn_sink.dtype == torch.float32 and attn_sink.shape == (q.shape[2],))
        name = {584: "v4", 656: "v3.2"}[k_cache.shape[-1]]
        assert q.shape[-1] == ops.KV_LAYOUTS[name].dim
        rows = ops.kv_cache_fp8_read(k_cache.squeeze(2), indices, name).double()  # [B, S, K, D]
        logits = torch.einsum("bshd,bskd->bshk", q.double(), rows) * softmax_scale
        logits = logits.masked_fill((indices < 0).unsqueeze(2), float("-inf"))
        lse = torch.logsumexp(logits, -1)
        out = torch.einsum("bshk,bskd->bshd", torch.exp(logits - lse.unsqueeze(-1)).nan_to_num(0.0),
                           rows[..., :head_dim_v])
        if attn_sink is not None:
            out = out / (1 + torch.exp(attn_sink.double().view(1, 1, -1) - lse)).unsqueeze(-1)
        lonely = torch.isneginf(lse)
        out = out.masked_fill(lonely.unsqueeze(-1), 0.0)
        return out.bfloat16(), lse.masked_fill(lonely, float("inf")).float().transpose(1, 2)


@pytest.mark.parametrize("name, heads", [("v4", 64), ("v3.2", 128)])
@pytest.mark.parametrize("sink", [True, False], ids=["sink", "no-sink"])
def test_flash_mla_glue_gives_the_contract(monkeypatch, name, heads, sink):
    """Slots padded to FlashMLA's multiple of 64, its LSE turned into the contract's (sink counted,
    -inf for an empty row), whether the op takes it (the domain check stands in for a GPU)."""
    fm = DocumentedFlashMLA()
    monkeypatch.setattr(cuda_kv, "flash_mla", lambda: fm)
    monkeypatch.setattr(cuda_kv, "_flash_mla_domain", lambda q, cache, lay, v_dim: True)
    q, cache, lay, slots, sk = attention_case(name, 2, 2, heads, 37, torch.bfloat16, gen(heads), sink=sink,
                                              blocks=3, block_size=16)
    sk = None if sk is None else sk.float()
    got = registry.family_view("cuda", "kv_cache").sparse_attention_fp8kv(q, cache, slots, 0.2, lay, sk, 512)
    assert fm.calls == 1 and got[1].shape == (2, 2, heads)
    assert_attention_close(got, reference_attention(q, cache, lay, slots, 0.2, sk, 512), torch.bfloat16)


def test_an_older_flash_mla_interface_is_not_called(monkeypatch):
    """FlashMLA releases before MODEL1 take other arguments (no `attn_sink`): the kernel runs instead."""
    class Older:
        def flash_mla_with_kvcache(self, q, k_cache, block_table, cache_seqlens, head_dim_v, tile_scheduler_metadata,
                                   num_splits, softmax_scale=None, causal=False, is_fp8_kvcache=False, indices=None):
            raise AssertionError("called")
    monkeypatch.setattr(cuda_kv, "flash_mla", lambda: Older())
    monkeypatch.setattr(cuda_kv, "_flash_mla_domain", lambda q, cache, lay, v_dim: True)
    monkeypatch.setattr(cuda_pkg, "triton_kernels", lambda family, x: triton_kv_cache)
    q, cache, lay, slots, sk = attention_case("v4", 1, 1, 64, 8, torch.bfloat16, gen(3), blocks=2, block_size=8)
    got = registry.family_view("cuda", "kv_cache").sparse_attention_fp8kv(q, cache, slots, 0.2, lay, sk, 512)
    assert_attention_close(got, reference_attention(q, cache, lay, slots, 0.2, sk, 512), torch.bfloat16)
    assert cuda_kv.has_sparse_fp8_decode(DocumentedFlashMLA()) and not cuda_kv.has_sparse_fp8_decode(Older())


def test_speed_case_peers_do_the_ops_work():
    """The selfcheck's FP8-cache speed rows: the op and each peer give the same numbers (so the
    ratios compare like with like)."""
    from v4hal.bench.cases_kv_cache import SPEED

    for case in SPEED:
        if "N32768" in case.name:
            continue  # the same code at a larger size
        fn, peers = case.make(torch.device("cpu"))
        want = fn()
        want = want[0] if isinstance(want, tuple) else want
        assert len(peers) >= 1, case.id
        for name, peer in peers.items():
            got = peer()
            got = got[0] if isinstance(got, tuple) else got
            torch.testing.assert_close(got.double(), want.double(), rtol=1e-3, atol=1e-3, msg=f"{case.id}: {name}")


def test_flash_mla_domain():
    v4, v32, index = (ops.KV_LAYOUTS[n] for n in ("v4", "v3.2", "index"))
    takes = cuda_kv.flash_mla_takes
    assert takes(torch.bfloat16, 64, v4, 512, 576 * 3, (9, 0)) and takes(torch.bfloat16, 128, v32, 512, 656, (10, 0))
    assert not takes(torch.float32, 64, v4, 512, 576, (9, 0))     # bf16 q only
    assert not takes(torch.bfloat16, 32, v4, 512, 576, (9, 0))    # 64 or 128 heads
    assert not takes(torch.bfloat16, 64, v32, 448, 656, (9, 0))   # v_dim 512
    assert not takes(torch.bfloat16, 64, index, 512, 132, (9, 0))  # its two layouts
    assert not takes(torch.bfloat16, 64, v4, 512, 584, (9, 0))    # block stride a multiple of 576
    assert not takes(torch.bfloat16, 64, v4, 512, 576, (8, 9))    # SM90 / SM100
    q = torch.zeros(1, 1, 64, 512, dtype=torch.bfloat16)
    assert not cuda_kv._flash_mla_domain(q, ops.kv_cache_fp8_empty(2, 64, "v4"), v4, 512)  # a CPU tensor
