"""The cuda backend's Triton kernels, run by Triton's interpreter (TRITON_INTERPRET=1) on CPU
tensors, against the float64 cpu reference: FP8 block-scaled matmul, sparse attention (-1 slots,
empty rows, sinks, ragged tails, large logits, indices past the end, rows never picked holding
NaN), the indexer scores and the chunked selection; then the public ops with the cuda backend
forced onto the kernels, so bad input is shown to stop at the contracts. The interpreter checks
the kernels' math and masking, not their speed or their compiled code: that is the device check's
job (`v4hal selfcheck` on a GPU)."""

import platform

import pytest
import torch

# conftest.py turns Triton's interpreter on for the whole test process (TRITON_INTERPRET=1, read
# when triton and the kernels are imported and when a kernel runs).
if platform.system() == "Linux" and platform.machine() == "x86_64":
    import triton  # noqa: F401  (pinned in the test extra for this platform: a missing one is a failure)
else:
    pytest.importorskip("triton", reason="triton wheels exist for Linux x86_64 only")
from triton.runtime.interpreter import InterpretedFunction  # noqa: E402

from v4hal import ops  # noqa: E402
from v4hal.backends import cuda as cuda_pkg  # noqa: E402
from v4hal.backends import registry  # noqa: E402
from v4hal.backends.cpu import attention as ref_attention  # noqa: E402
from v4hal.backends.cpu import mhc as ref_mhc  # noqa: E402
from v4hal.backends.cpu import quant as ref_quant  # noqa: E402
from v4hal.backends.cuda import triton_attention, triton_mhc, triton_quant  # noqa: E402
from v4hal.bench import peers_cuda, selfcheck, speed  # noqa: E402
from v4hal.bench.cases import SpeedCase  # noqa: E402
from v4hal.bench.cases_attention import topk_agrees  # noqa: E402
from v4hal.ops._check import OpInputError  # noqa: E402

assert isinstance(triton_attention._sparse_attention, InterpretedFunction), \
    "the kernels are compiled, not interpreted: TRITON_INTERPRET=1 must be set before triton is imported"

D64 = torch.float64
cuda_attention = registry.family_view("cuda", "attention")
cuda_quant = registry.family_view("cuda", "quant")
cuda_mhc = registry.family_view("cuda", "mhc")
# Output tolerance per dtype: the kernels accumulate in fp32; 16-bit outputs round once.
ATOL = {torch.float32: 2e-5, torch.bfloat16: 2e-2, torch.float16: 3e-3}


def gen(seed):
    return torch.Generator().manual_seed(seed)


# ------------------------------------------------------------------------------ fp8 block-scaled GEMM

def fp8_operands(m, n, k, g, row_spread=1.0):
    x = torch.randn(m, k, generator=g) * torch.logspace(-row_spread, row_spread, m).view(m, 1)
    a, sa = ops.quantize_fp8(x)
    b, sb = ops.quantize_fp8(torch.randn(n, k, generator=g), (128, 128))
    return a, sa, b, sb


@pytest.mark.parametrize("m, n, k", [(1, 256, 256), (5, 300, 200), (40, 130, 384), (17, 128, 129)],
                         ids=["decode", "ragged-n-k", "prefill-tile", "one-column-k-tail"])
@pytest.mark.parametrize("out_dtype", [torch.float32, torch.bfloat16])
def test_fp8_kernel_matches_float64_reference(m, n, k, out_dtype):
    a, sa, b, sb = fp8_operands(m, n, k, gen(m * n + k), row_spread=3.0)  # rows from 1e-3 to 1e3
    got = triton_quant.fp8_matmul(a, sa, b, sb, out_dtype).double()
    ref = ref_quant.fp8_matmul(a, sa.double(), b, sb.double(), D64)
    scale = ref.abs().amax(-1, keepdim=True)  # each row judged at its own magnitude
    assert got.shape == ref.shape and not got.isnan().any()
    torch.testing.assert_close(got / scale, ref / scale, rtol=0, atol=ATOL[out_dtype])


@pytest.mark.parametrize("block_n", [32, 128, 256], ids=["narrow-decode-tile", "one-scale-block", "two-scale-blocks"])
def test_fp8_kernel_uses_each_blocks_own_scales(block_n):
    """Scales differing per 128x128 weight block and per 1x128 activation block must land on their
    own products whatever the tile width: swap two weight-scale blocks and the result changes."""
    a, sa, b, sb = fp8_operands(3, 256, 256, gen(7))
    sb = sb * torch.tensor([[1.0, 8.0], [0.25, 2.0]])
    got = triton_quant.fp8_matmul(a, sa, b, sb, torch.float32, block_n=block_n).double()
    torch.testing.assert_close(got, ref_quant.fp8_matmul(a, sa.double(), b, sb.double(), D64), rtol=1e-5, atol=1e-4)
    swapped = triton_quant.fp8_matmul(a, sa, b, sb.flip(0), torch.float32, block_n=block_n)
    assert not torch.allclose(swapped, got.float(), rtol=1e-3)
    assert triton_quant.tile_n(1, 4096, a.device) == 128  # off a GPU: no narrowing


def test_cuda_fp8_matmul_takes_the_kernel_on_batched_input(monkeypatch):
    kernel_calls = spy_on_kernels(monkeypatch, "quant")
    a, sa, b, sb = fp8_operands(6, 130, 200, gen(3))
    got = cuda_quant.fp8_matmul(a.view(2, 3, 200), sa.view(2, 3, 2), b, sb, torch.float32)
    assert kernel_calls == ["fp8_matmul"] and got.shape == (2, 3, 130)
    ref = ref_quant.fp8_matmul(a, sa.double(), b, sb.double(), D64).view(2, 3, 130)
    torch.testing.assert_close(got.double(), ref, rtol=1e-5, atol=1e-4)
    cuda_quant.fp8_matmul(a, sa.double(), b, sb.double(), D64)  # float64: the torch path
    assert kernel_calls == ["fp8_matmul"]


# ------------------------------------------------------------------------------ sparse attention

def attention_case(b, s, h, d, n, k, dtype, g, *, sink=True, q_scale=1.0):
    q = (torch.randn(b, s, h, d, generator=g) * q_scale).to(dtype)
    kv = torch.randn(b, n, d, generator=g).to(dtype)
    idx = torch.randint(-1, n, (b, s, k), generator=g, dtype=torch.int32)
    idx[0, 0] = -1  # an empty row
    if s > 1:
        idx[-1, 1, k // 2:] = -1  # a ragged valid prefix
        idx[-1, 1, 0] = idx[-1, 1, 1]  # a duplicate counts twice
    sk = torch.randn(h, generator=g).to(dtype) if sink else None
    return q, kv, idx, sk


def reference_attention(q, kv, idx, scale, sink, v_dim):
    return ref_attention.sparse_attention(q.double(), kv.double(), idx, scale, None if sink is None else sink.double(), v_dim)


def assert_attention_close(got, ref, dtype):
    (out, lse), (rout, rlse) = got, ref
    assert out.dtype == dtype and lse.dtype == torch.float32
    torch.testing.assert_close(out.double(), rout, rtol=0, atol=ATOL[dtype])
    assert torch.equal(torch.isneginf(lse), torch.isneginf(rlse))  # -inf exactly where the row is empty
    finite = torch.isfinite(rlse)
    torch.testing.assert_close(lse.double()[finite], rlse[finite], rtol=1e-6, atol=1e-5)


@pytest.mark.parametrize("b, s, h, d, n, k, v_dim", [
    (2, 3, 5, 40, 50, 37, 24),     # every tail ragged: heads, index blocks, D chunks, v_dim < D
    (1, 2, 20, 72, 100, 70, 64),   # two head blocks, three index blocks
    (1, 1, 16, 96, 40, 16, 96),    # decode, one full block of each
], ids=["ragged", "multi-block", "decode"])
@pytest.mark.parametrize("sink", [True, False], ids=["sink", "no-sink"])
def test_sparse_attention_kernel_matches_float64_reference(b, s, h, d, n, k, v_dim, sink):
    g = gen(b * 1000 + h * 10 + k)
    for dtype, splits in ((torch.float32, 1), (torch.bfloat16, 1), (torch.float32, 3)):
        q, kv, idx, sk = attention_case(b, s, h, d, n, k, dtype, g, sink=sink)
        got = triton_attention.sparse_attention(q, kv, idx, d ** -0.5, sk, v_dim, splits=splits)
        assert_attention_close(got, reference_attention(q, kv, idx, d ** -0.5, sk, v_dim), dtype)


@pytest.mark.parametrize("splits", [1, 2])
def test_sparse_attention_kernel_large_logits_stay_finite(splits):
    """Logits in the thousands: the online softmax's running max (and, split, the merge) keeps
    every exp in range."""
    q, kv, idx, sk = attention_case(1, 2, 4, 32, 30, 40, torch.float32, gen(5), q_scale=400.0)
    sk = sk * 1000.0  # some sinks dominate the row, some vanish
    got = triton_attention.sparse_attention(q, kv, idx, 1.0, sk, 32, splits=splits)
    ref = reference_attention(q, kv, idx, 1.0, sk, 32)
    assert torch.isfinite(got[0]).all() and ref[1].abs().max() > 1000
    torch.testing.assert_close(got[0].double(), ref[0], rtol=0, atol=1e-4)
    torch.testing.assert_close(got[1].double(), ref[1], rtol=1e-6, atol=1e-3)


def test_sparse_attention_kernel_reads_only_picked_rows():
    """Rows nobody picks hold NaN and Inf; an index past the end (reachable only with
    V4HAL_CHECKS=shapes) counts as -1 rather than reading outside kv."""
    q, kv, idx, sk = attention_case(1, 2, 3, 24, 20, 16, torch.float32, gen(9))
    idx = idx.clamp(max=9)
    kv[:, 10:15] = float("nan")
    kv[:, 15:] = float("inf")
    past_end = idx.clone()
    past_end[0, 1, :4] = kv.shape[1] + 1000
    expected = idx.clone()
    expected[0, 1, :4] = -1
    got = triton_attention.sparse_attention(q, kv, past_end, 0.2, sk, 24)
    assert_attention_close(got, reference_attention(q, kv, expected, 0.2, sk, 24), torch.float32)


@pytest.mark.parametrize("sink", [True, False], ids=["sink", "no-sink"])
def test_split_index_lists_merge_like_one_pass(sink):
    """Decode on a GPU cuts each index list into slices; slices holding only -1 (here the second
    half of some rows, and every slice of the empty row) must merge to the one-pass result."""
    q, kv, idx, sk = attention_case(2, 2, 3, 16, 40, 96, torch.float32, gen(19), sink=sink)
    one = triton_attention.sparse_attention(q, kv, idx, 0.25, sk, 16, splits=1)
    for splits in (2, 3):
        got = triton_attention.sparse_attention(q, kv, idx, 0.25, sk, 16, splits=splits)
        assert_attention_close(got, reference_attention(q, kv, idx, 0.25, sk, 16), torch.float32)
        torch.testing.assert_close(got, one, rtol=1e-6, atol=1e-6)
    assert triton_attention.split_count(4, 96, 32, q.device) == 1  # off a GPU nothing is split


def test_sparse_attention_kernel_follows_strides():
    """A transposed q, an expanded (stride-0) index list and a kv slice run as their contiguous
    copies do."""
    g = gen(11)
    q = torch.randn(1, 4, 3, 16, generator=g).transpose(1, 2)  # [B=1, S=3, H=4, D=16], strided
    kv_full = torch.randn(1, 30, 40, generator=g)
    kv = kv_full[:, 5:25, 8:24]  # [1, 20, 16], non-contiguous
    idx = torch.randint(-1, 20, (1, 1, 12), generator=g).expand(1, 3, 12)
    got = triton_attention.sparse_attention(q, kv, idx, 0.25, None, 16)
    assert_attention_close(got, reference_attention(q.contiguous(), kv.contiguous(), idx.contiguous(), 0.25, None, 16),
                           torch.float32)


def test_window_attention_runs_the_kernel_and_matches_reference(monkeypatch):
    kernel_calls = spy_on_kernels(monkeypatch, "attention")
    q, kv, _, sk = attention_case(1, 3, 4, 16, 9, 2, torch.float32, gen(12))
    got = cuda_attention.window_attention(q, kv, 4, 0.25, sk)
    assert kernel_calls == ["sparse_attention"]
    assert_attention_close(got, ref_attention.window_attention(q.double(), kv.double(), 4, 0.25, sk.double()),
                           torch.float32)


# ------------------------------------------------------------------------------ the indexer

@pytest.mark.parametrize("b, s, h, d, t", [(2, 5, 3, 40, 70), (1, 17, 4, 128, 100), (1, 3, 2, 24, 1)],
                         ids=["ragged", "two-query-blocks", "one-entry"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_indexer_scores_kernel_matches_float64_reference(b, s, h, d, t, dtype):
    g = gen(s * t + h)
    q, k, w = (torch.randn(b, s, h, d, generator=g).to(dtype), torch.randn(b, t, d, generator=g).to(dtype),
               torch.randn(b, s, h, generator=g).to(dtype))
    got = triton_attention.indexer_scores(q, k, w, 0.1)
    ref = ref_attention.indexer_scores(q.double(), k.double(), w.double(), 0.1)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got.double(), ref, rtol=1e-5, atol=1e-5 * ref.abs().max().item())


def test_cuda_indexer_select_chunks_queries_and_agrees_tie_aware(monkeypatch):
    kernel_calls = spy_on_kernels(monkeypatch, "attention")
    monkeypatch.setattr(registry.family_module("cpu_fast", "attention"), "DEVICE_CHUNK", 2 * 33 * 2)  # 2 queries a chunk
    g = gen(13)
    b, s, h, d, t, ratio = 2, 7, 3, 32, 33, 4
    q, k, w = (torch.randn(b, s, h, d, generator=g), torch.randn(b, t, d, generator=g), torch.randn(b, s, h, generator=g))
    pos = torch.arange(s).view(1, s) * 19 + torch.tensor([[0], [5]])
    got = cuda_attention.indexer_select(q, k, w, 0.2, 8, pos, ratio)
    assert kernel_calls == ["indexer_scores"] * 4  # ceil(7 / 2) chunks
    scores = ref_attention.indexer_scores(q.double(), k.double(), w.double(), 0.2)
    ok, note = topk_agrees(ref_attention.indexer_topk(scores, 8, pos, ratio), got, scores, 1e-5)
    assert ok, note


# ------------------------------------------------------------------------------ mHC

def mhc_case(lead, n, d, dtype, g, comb_scale=1.0, x_scale=1.0):
    x = (torch.randn(*lead, n, d, generator=g) * x_scale).to(dtype)
    fn = torch.randn((2 + n) * n, n * d, generator=g) * 0.05
    return x, fn, torch.tensor([1.0, 0.7, comb_scale]), torch.randn((2 + n) * n, generator=g)


@pytest.mark.parametrize("lead, n, d, dtype, comb_scale, x_scale, iters", [
    ((2, 3), 4, 300, torch.float32, 1.0, 1.0, 20),    # V4's 4 streams, D over two ragged chunks
    ((3,), 3, 64, torch.bfloat16, 1.0, 1.0, 20),      # streams padded 3 -> 4, bf16 streams
    ((2,), 4, 40, torch.float32, 40.0, 1.0, 20),      # comb logits in the hundreds: the softmax max
    ((2,), 4, 40, torch.float32, 1.0, 1e-4, 20),      # tiny streams: norm_eps dominates the RMS
    ((2,), 4, 40, torch.float32, 1.0, 1.0, 1),        # one normalisation pair only
], ids=["v4-streams", "padded-streams", "large-logits", "tiny-streams", "one-iteration"])
def test_hc_pre_kernel_matches_float64_reference(lead, n, d, dtype, comb_scale, x_scale, iters):
    x, fn, scale, base = mhc_case(lead, n, d, dtype, gen(n * d + iters), comb_scale, x_scale)
    got = triton_mhc.hc_pre(x, fn, scale, base, 1e-6, 1e-6, iters)
    ref = ref_mhc.hc_pre(x.double(), fn.double(), scale.double(), base.double(), 1e-6, 1e-6, iters)
    assert [t.shape for t in got] == [t.shape for t in ref] and got[0].dtype == dtype
    assert got[1].dtype == got[2].dtype == torch.float32
    layer_atol = 2 * torch.finfo(dtype).eps * ref[0].abs().max().item()  # one rounding of x's dtype
    torch.testing.assert_close(got[0].double(), ref[0], rtol=0, atol=max(layer_atol, 1e-5))
    torch.testing.assert_close(got[1].double(), ref[1], rtol=0, atol=1e-6)
    torch.testing.assert_close(got[2].double(), ref[2], rtol=0, atol=1e-6)


def test_cuda_hc_pre_takes_the_kernel_and_float64_the_torch_path(monkeypatch):
    kernel_calls = spy_on_kernels(monkeypatch, "mhc")
    x, fn, scale, base = mhc_case((2,), 4, 32, torch.float32, gen(20))
    cuda_mhc.hc_pre(x, fn, scale, base, 1e-6, 1e-6, 20)
    cuda_mhc.hc_pre(x.double(), fn.double(), scale.double(), base.double(), 1e-6, 1e-6, 20)
    assert kernel_calls == ["hc_pre"]


# ------------------------------------------------------------------------------ through the contracts

KERNELS = {"attention": (triton_attention, ("sparse_attention", "indexer_scores")),
           "quant": (triton_quant, ("fp8_matmul",)), "mhc": (triton_mhc, ("hc_pre",))}


def spy_on_kernels(monkeypatch, *families):
    """Let the cuda backend take its Triton kernels on CPU tensors (the interpreter runs them);
    returns the kernel entry points it calls, by family."""
    calls = {}
    for family in families:
        module, names = KERNELS[family]
        calls[family] = []
        for name in names:
            kernel = getattr(module, name)
            monkeypatch.setattr(module, name, lambda *a, _k=kernel, _n=name, _c=calls[family]: (_c.append(_n), _k(*a))[1])
    monkeypatch.setattr(cuda_pkg, "triton_kernels", lambda family, x: KERNELS[family][0] if family in families else None)
    return calls[families[0]] if len(families) == 1 else calls


@pytest.fixture
def cuda_on_kernels(monkeypatch):
    """The cuda backend forced for every op, probing usable, its kernels on CPU tensors."""
    monkeypatch.setattr(cuda_pkg, "probe", lambda: (True, ""))
    registry.reset()
    with registry.forced("cuda"):
        yield spy_on_kernels(monkeypatch, "attention", "quant", "mhc")
    registry.reset()


def test_public_ops_reach_the_kernels_and_match(cuda_on_kernels):
    q, kv, idx, sk = attention_case(1, 2, 4, 16, 12, 8, torch.float32, gen(14))
    out, lse = ops.sparse_attention(q, kv, idx, 0.25, sink=sk, return_lse=True)
    assert_attention_close((out, lse), reference_attention(q, kv, idx, 0.25, sk, 16), torch.float32)
    a, sa, b, sb = fp8_operands(2, 128, 128, gen(15))
    y = ops.fp8_matmul(a, sa, b, sb, torch.float32)
    torch.testing.assert_close(y.double(), ref_quant.fp8_matmul(a, sa.double(), b, sb.double(), D64), rtol=1e-5, atol=1e-4)
    x, fn, scale, base = mhc_case((2,), 4, 32, torch.float32, gen(22))
    got = ops.hc_pre(x, fn, scale, base)
    ref = ref_mhc.hc_pre(x.double(), fn.double(), scale.double(), base.double(), 1e-6, 1e-6, 20)
    for a, r in zip(got, ref):
        torch.testing.assert_close(a.double(), r, rtol=0, atol=1e-5)
    assert cuda_on_kernels == {"attention": ["sparse_attention"], "quant": ["fp8_matmul"], "mhc": ["hc_pre"]}


@pytest.mark.parametrize("bad, message", [
    ("index", "indices"), ("sink", "sink"), ("v_dim", "v_dim"), ("scale", "scale"),
])
def test_bad_attention_input_stops_at_the_contract(cuda_on_kernels, bad, message):
    q, kv, idx, sk = attention_case(1, 1, 4, 16, 12, 8, torch.float32, gen(16))
    kwargs = {"sink": sk, "v_dim": None}
    scale = 0.25
    if bad == "index":
        idx[0, 0, 0] = 12  # one past the end
    elif bad == "sink":
        kwargs["sink"] = sk[:3]
    elif bad == "v_dim":
        kwargs["v_dim"] = 17
    else:
        scale = float("nan")
    with pytest.raises(OpInputError, match=f"sparse_attention: argument '{message}'"):
        ops.sparse_attention(q, kv, idx, scale, **kwargs)
    assert cuda_on_kernels["attention"] == []


def test_bad_indexer_fp8_and_mhc_input_stops_at_the_contract(cuda_on_kernels):
    q, k, w = torch.randn(1, 2, 3, 16), torch.randn(1, 5, 16), torch.randn(1, 2, 3)
    with pytest.raises(OpInputError, match="indexer_scores: argument 'weights'"):
        ops.indexer_scores(q, k, w[:, :, :2], 0.1)
    q[0, 0, 0, 0] = float("nan")
    with pytest.raises(OpInputError, match="indexer_select: argument 'q'"):
        ops.indexer_select(q, k, w, 0.1, 2)
    a, sa, b, sb = fp8_operands(2, 128, 256, gen(17))
    with pytest.raises(OpInputError, match="fp8_matmul: argument 'b_scale'"):
        ops.fp8_matmul(a, sa, b, sb[:, :1], torch.float32)
    x, fn, scale, base = mhc_case((2,), 4, 32, torch.float32, gen(21))
    with pytest.raises(OpInputError, match="hc_pre: argument 'fn'"):
        ops.hc_pre(x, fn[:, :-1], scale, base)
    assert cuda_on_kernels == {"attention": [], "quant": [], "mhc": []}


# ------------------------------------------------------------------------------ the device check's rows

def test_selfcheck_times_the_triton_gemm_beside_its_peers(monkeypatch):
    """The speed row `v4hal selfcheck` adds on a GPU for the Triton GEMM, run here through the
    interpreter: it is timed, and every FP8 peer either runs beside it or leaves a note."""
    spy_on_kernels(monkeypatch, "quant")
    notes = []
    case = SpeedCase("fp8_matmul", "M1-N128-K128", lambda device: (None, {}), flops=2 * 128 * 128)
    row = speed.run_case(selfcheck._triton_fp8_case(case, 1, 128, 128, notes), "cpu_fast", 1,
                         {"bf16_tflops": float("nan"), "bandwidth_gbs": float("nan")})
    assert row["status"] == "ok" and row["case"] == "fp8_matmul/triton-kernel/M1-N128-K128", row
    assert len(row["peers"]) + len(notes) == 2 and all(p["speedup"] > 0 for p in row["peers"].values())


def test_selfcheck_reports_the_triton_gemm_unavailable_off_gpu():
    case = SpeedCase("fp8_matmul", "M1-N128-K128", lambda device: (None, {}))
    row = speed.run_case(selfcheck._triton_fp8_case(case, 1, 128, 128, []), "cpu_fast", 1, {})
    assert row["status"] == "unavailable" and "CUDA devices" in row["note"]


def test_torch_path_peer_is_the_inherited_code_on_the_same_arguments():
    q, kv, idx, sk = attention_case(1, 2, 4, 16, 12, 8, torch.float32, gen(18))
    out, lse = peers_cuda.torch_path("sparse_attention", q, kv, idx, 0.25, sk, 16)()
    assert_attention_close((out, lse), reference_attention(q, kv, idx, 0.25, sk, 16), torch.float32)
