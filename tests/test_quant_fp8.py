"""FP8 (DeepSeek block scaling): hand-checked cases, round trips, bad input, and property tests
comparing every CPU-usable backend with the reference.

"cuda code path exercised on CPU": the cuda module's functions are called directly on CPU tensors
(its `F.scaled_mm` branch needs an sm90 GPU and is covered by the `cuda`-marked test)."""

import math

import pytest
import torch
from hypothesis import given, settings, strategies as st

from v4hal import ops
from v4hal.backends import registry
from v4hal.backends.cpu import quant as ref
from v4hal.ops._check import OpInputError
from quant_util import CPU_IMPLS, run_impl

cuda_quant = registry.family_view("cuda", "quant")

BACKENDS = ["cpu", "cpu_fast", "mindspore"]


def bits(q: torch.Tensor) -> torch.Tensor:
    return q.view(torch.uint8)


def dequant(q, scale, block):
    bm, bk = block
    s = scale.double().repeat_interleave(bk, -1)[..., : q.shape[-1]]
    if bm > 1:
        s = s.repeat_interleave(bm, 0)[: q.shape[0]]
    return q.double() * s


def exact_fp8_matmul(a, a_s, b, b_s):
    return dequant(a, a_s, (1, 128)) @ dequant(b, b_s, (128, 128)).T


# ------------------------------------------------------------------------------ hand-checked cases

@pytest.mark.parametrize("backend", BACKENDS)
def test_ue8m0_rounds_scale_up_to_a_power_of_two(backend):
    # amax 448*3 -> 3 exactly -> a power of two is needed: 4 (not 2, which would overflow, nor 3).
    x = torch.zeros(1, 128)
    x[0, 0], x[0, 1] = 448 * 3, -448 * 1.5
    with registry.forced(backend):
        q, s = ops.quantize_fp8(x, (1, 128), "ue8m0")
        q32, s32 = ops.quantize_fp8(x, (1, 128), "fp32")
    assert s.tolist() == [[4.0]]
    # 1344/4 = 336 and -672/4 = -168 are e4m3 midpoints (steps of 32 and 16): ties go to the even
    # mantissa, 320 = 1.25 * 256 and -160 = -1.25 * 128.
    assert q[0, 0].item() == 320.0 and q[0, 1].item() == -160.0
    assert s32.tolist() == [[3.0]] and q32[0, 0].item() == 448.0


@pytest.mark.parametrize("backend", BACKENDS)
def test_ue8m0_just_above_a_power_of_two_goes_to_the_next(backend):
    # amax / 448 = 2**-5 * (1 + 2**-23): float32 log2 would say -5 exactly and keep 2**-5, pushing
    # the block max past 448; rounding UP must give 2**-4.
    amax = torch.nextafter(torch.tensor(448 * 2.0 ** -5), torch.tensor(1e9))
    x = torch.zeros(1, 128)
    x[0, 5] = amax
    with registry.forced(backend):
        q, s = ops.quantize_fp8(x, (1, 128), "ue8m0")
    assert s.item() == 2.0 ** -4
    assert q[0, 5].item() == 224.0


@pytest.mark.parametrize("backend", BACKENDS)
def test_values_at_the_e4m3_limit_and_all_zero_blocks(backend):
    x = torch.zeros(2, 256)
    x[0, :128] = torch.linspace(-448, 448, 128)
    with registry.forced(backend):
        q, s = ops.quantize_fp8(x, (1, 128))
    assert s[0, 0].item() == 1.0 and q[0, 0].item() == -448 and q[0, 127].item() == 448
    # all-zero blocks: amax floored at 1e-4, codes all zero, no NaN
    assert torch.allclose(s[0, 1], torch.tensor(1e-4 / 448)) and torch.allclose(s[1], torch.tensor(1e-4 / 448))
    assert bool((bits(q[1]) == 0).all()) and not torch.isnan(q.float()).any()


@pytest.mark.parametrize("backend", BACKENDS)
def test_ragged_weight_blocks_have_their_own_scales(backend):
    w = torch.ones(130, 200)
    w[128:, :128] = 7.0  # short row block, full column block
    w[:128, 128:] = 0.5  # full row block, short column block
    with registry.forced(backend):
        q, s = ops.quantize_fp8(w, (128, 128))
        back = ops.dequantize_fp8(q, s, (128, 128), out_dtype=torch.float32)
    assert s.shape == (2, 2)
    assert torch.allclose(s, torch.tensor([[1.0, 0.5], [7.0, 1.0]]) / 448)
    assert torch.equal(back, w)


@pytest.mark.parametrize("backend", BACKENDS)
def test_fp8_matmul_small_case_by_hand(backend):
    # a = [1, 2, 0...] in block 0 and [3, 0...] in block 1 (K = 256); b rows are 1, 2 and 4
    # everywhere. Every value lands on an e4m3 code exactly (224, 448; 112, 224, 448), so
    # y = (1 + 2 + 3) * [1, 2, 4] up to the float32 rounding of the scales.
    a = torch.zeros(1, 256)
    a[0, 0], a[0, 1], a[0, 128] = 1, 2, 3
    b = torch.tensor([1.0, 2.0, 4.0]).unsqueeze(1).expand(3, 256).contiguous()
    with registry.forced(backend):
        qa, sa = ops.quantize_fp8(a, (1, 128))
        qb, sb = ops.quantize_fp8(b, (128, 128))
        y = ops.fp8_matmul(qa, sa, qb, sb, out_dtype=torch.float32)
    assert torch.allclose(y, torch.tensor([[6.0, 12.0, 24.0]]), rtol=1e-6)


def test_dequantize_matches_deepseek_weight_dequant_definition():
    g = torch.Generator().manual_seed(1)
    w = torch.randn(300, 260, generator=g)
    q, s = ops.quantize_fp8(w, (128, 128))
    out = ops.dequantize_fp8(q, s, (128, 128), out_dtype=torch.bfloat16)
    expected = (q.float() * s.repeat_interleave(128, 0)[:300].repeat_interleave(128, 1)[:, :260]).bfloat16()
    assert torch.equal(out, expected)


def test_round_trip_error_is_within_half_an_e4m3_step():
    g = torch.Generator().manual_seed(2)
    x = torch.randn(7, 3, 384, generator=g)
    q, s = ops.quantize_fp8(x, (1, 128))
    back = dequant(q, s, (1, 128))
    # relative step of e4m3 is 2**-3 for normals; half of it after round-to-nearest
    assert bool(((back - x.double()).abs() <= 2.0 ** -4 * x.double().abs() + s.double().repeat_interleave(128, -1) * 2.0 ** -10).all())


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_mindspore_e4m3_rounding_equals_the_hardware_cast_on_every_code_and_midpoint(dtype):
    """MindSpore's round_e4m3 (its MoE path rounds activations with it, in float32 or float64)
    against torch's float8_e4m3fn cast: every finite code, the midpoints between neighbours (ties
    to even) and a point on either side of each midpoint."""
    from v4hal.backends.mindspore import to_ms, to_torch
    from v4hal.backends.mindspore.quant import round_e4m3

    codes = torch.arange(256, dtype=torch.uint8).view(torch.float8_e4m3fn).double()
    values = codes[codes.isfinite()].unique()  # sorted, +-0 once
    mids = (values[1:] + values[:-1]) / 2
    x = torch.cat([values, mids, mids * (1 + 2.0 ** -20), mids * (1 - 2.0 ** -20)]).to(dtype)
    got = to_torch(round_e4m3(to_ms(x)), torch.float64)
    assert torch.equal(got, x.to(torch.float8_e4m3fn).double())


# ---------------------------------------------------------------------------------------- bad input

@pytest.mark.parametrize("call, arg", [
    (lambda: ops.quantize_fp8(torch.ones(4, 128, dtype=torch.int32)), "x"),
    (lambda: ops.quantize_fp8(torch.ones(2, 2, 128), (128, 128)), "x"),
    (lambda: ops.quantize_fp8(torch.ones(4, 128), (1, 0)), "block"),
    (lambda: ops.quantize_fp8(torch.ones(4, 128), (1, 128), "e8m0"), "scale_fmt"),
    (lambda: ops.quantize_fp8(torch.full((4, 128), float("nan"))), "x"),
    (lambda: ops.quantize_fp8(torch.tensor([[1.0, float("inf")]])), "x"),
    (lambda: ops.quantize_fp8(torch.ones(0, 128)), "x"),
    (lambda: ops.dequantize_fp8(torch.ones(4, 128).to(torch.float8_e4m3fn), torch.ones(4, 2), (1, 128)), "scale"),
    (lambda: ops.dequantize_fp8(torch.ones(4, 128), torch.ones(4, 1), (1, 128)), "q"),
    (lambda: ops.fp8_matmul(*ops.quantize_fp8(torch.ones(2, 256)), *ops.quantize_fp8(torch.ones(8, 128), (128, 128))), "b"),
    (lambda: ops.fp8_matmul(ops.quantize_fp8(torch.ones(2, 256))[0], torch.ones(2, 1),
                            *ops.quantize_fp8(torch.ones(8, 256), (128, 128))), "a_scale"),
    (lambda: ops.fp8_matmul(*ops.quantize_fp8(torch.ones(2, 256)), ops.quantize_fp8(torch.ones(8, 256), (128, 128))[0],
                            torch.ones(2, 2)), "b_scale"),
    (lambda: ops.fp8_matmul(*ops.quantize_fp8(torch.ones(2, 256)), torch.ones(8, 256), torch.ones(1, 2)), "b"),
    (lambda: ops.fp8_matmul(*ops.quantize_fp8(torch.ones(2, 256)), *ops.quantize_fp8(torch.ones(8, 256), (128, 128)),
                            out_dtype=torch.int8), "out_dtype"),
])
def test_bad_input_names_op_and_argument(call, arg):
    with pytest.raises(OpInputError) as err:
        call()
    op = str(err.value).split(":")[0]
    assert op in ("quantize_fp8", "dequantize_fp8", "fp8_matmul")
    assert f"argument '{arg}'" in str(err.value) and "expected" in str(err.value) and "got" in str(err.value)


def test_nan_in_fp8_operands_propagates():
    # fp8_matmul does not scan its (large) fp8 operands: a NaN code (0x7F) yields NaN outputs in
    # its row, on every backend, rather than a silent wrong number.
    a, sa = ops.quantize_fp8(torch.ones(2, 128))
    bits(a)[0, 3] = 0x7F
    b, sb = ops.quantize_fp8(torch.ones(4, 128), (128, 128))
    for backend in BACKENDS:
        with registry.forced(backend):
            y = ops.fp8_matmul(a, sa, b, sb, out_dtype=torch.float32)
        assert bool(torch.isnan(y[0]).all()) and not torch.isnan(y[1]).any(), backend


# ------------------------------------------------------------------------------------ the cuda path

def test_cuda_fallback_matches_reference_on_cpu():
    """cuda code path exercised on CPU: the dequant + one-GEMM fallback of backends/cuda/quant.py."""
    g = torch.Generator().manual_seed(3)
    a, sa = ops.quantize_fp8(torch.randn(2, 3, 300, generator=g), (1, 128))
    b, sb = ops.quantize_fp8(torch.randn(130, 300, generator=g), (128, 128))
    y = cuda_quant.fp8_matmul(a, sa, b, sb, torch.float32)
    expected = ref.fp8_matmul(a, sa.double(), b, sb.double(), torch.float64)
    assert y.shape == (2, 3, 130)
    assert torch.allclose(y.double(), expected, rtol=1e-5, atol=1e-4)
    assert not cuda_quant._use_scaled_mm(a.reshape(-1, 300), b, torch.bfloat16)


@pytest.mark.cuda
def test_scaled_mm_blockwise_on_gpu():
    if not torch.cuda.is_available():
        pytest.skip("needs an NVIDIA GPU")
    g = torch.Generator().manual_seed(4)
    a, sa = ops.quantize_fp8(torch.randn(64, 512, generator=g), (1, 128))
    b, sb = ops.quantize_fp8(torch.randn(256, 512, generator=g), (128, 128))
    y = cuda_quant.fp8_matmul(a.cuda(), sa.cuda(), b.cuda(), sb.cuda(), torch.bfloat16).cpu().double()
    expected = exact_fp8_matmul(a, sa, b, sb)
    assert 1 - 2 * (y * expected).sum() / ((y * y).sum() + (expected * expected).sum()) < 1e-4


# ------------------------------------------------------------------------------------- properties

@settings(max_examples=8, deadline=None)
@given(m=st.integers(1, 16), n=st.integers(1, 200), k=st.integers(1, 300), log_scale=st.integers(-12, 8),
       fmt=st.sampled_from(["fp32", "ue8m0"]), seed=st.integers(0, 2 ** 16))
def test_every_backend_matches_the_reference(m, n, k, log_scale, fmt, seed):
    # m <= 16: cpu_fast's float32 decode path; its BF16 prefill path has its own test below.
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(m, k, generator=g) * 2.0 ** log_scale
    w = torch.randn(n, k, generator=g) * 2.0 ** log_scale
    with registry.forced("cpu"):
        qa, sa = ops.quantize_fp8(x, (1, 128), fmt)
        qb, sb = ops.quantize_fp8(w, (128, 128), fmt)
    expected = exact_fp8_matmul(qa, sa, qb, sb)
    for name in CPU_IMPLS:
        if name != "cuda-on-cpu":
            q2, s2 = run_impl(name, "quantize_fp8", w, (128, 128), fmt)
            assert torch.equal(s2, sb), name
            differ = bits(q2) != bits(qb)
            assert float(differ.double().mean()) <= 1e-3, name
        y = run_impl(name, "fp8_matmul", qa, sa, qb, sb, torch.float32).double()
        tol = 1e-5 * (qa.double().abs() * sa.double().repeat_interleave(128, -1)[:, :k]).sum(-1, keepdim=True) \
            * dequant(qb, sb, (128, 128)).abs().amax() + 1e-30
        assert bool(((y - expected).abs() <= tol).all()), name
        d = run_impl(name, "dequantize_fp8", qb, sb, (128, 128), torch.float32)
        assert torch.equal(d, ref.dequantize_fp8(qb, sb, (128, 128), torch.float32)), name


@settings(max_examples=5, deadline=None)
@given(m=st.integers(17, 40), k_blocks=st.integers(1, 3), tail=st.integers(0, 127), seed=st.integers(0, 2 ** 16))
def test_prefill_path_of_cpu_fast_stays_close(m, k_blocks, tail, seed):
    # M > 16 takes cpu_fast's BF16 GEMM path: operands round to BF16 once each.
    k = 128 * k_blocks + tail
    g = torch.Generator().manual_seed(seed)
    qa, sa = ops.quantize_fp8(torch.randn(m, k, generator=g), (1, 128))
    qb, sb = ops.quantize_fp8(torch.randn(64, k, generator=g), (128, 128))
    expected = exact_fp8_matmul(qa, sa, qb, sb)
    with registry.forced("cpu_fast"):
        y = ops.fp8_matmul(qa, sa, qb, sb, out_dtype=torch.float32).double()
    assert float(1 - 2 * (y * expected).sum() / ((y * y).sum() + (expected * expected).sum())) < 1e-5
    assert math.isfinite(float(y.sum()))


@pytest.mark.parametrize("log_scale", [-30, 0, 20, 60])
@pytest.mark.parametrize("m", [2, 40])
def test_cpu_fast_handles_extreme_scales(log_scale, m):
    # cpu_fast reads e4m3 bits as float32 * 2**-120 and puts the 2**120 back on scales or the
    # output; found by the property test: scales >= 2**8 once overflowed float32 to inf.
    g = torch.Generator().manual_seed(5)
    qa, sa = ops.quantize_fp8(torch.randn(m, 300, generator=g) * 448, (1, 128))
    qb, sb = ops.quantize_fp8(torch.randn(50, 300, generator=g) * 448 * 2.0 ** log_scale, (128, 128))
    expected = exact_fp8_matmul(qa, sa, qb, sb)
    with registry.forced("cpu_fast"):
        y = ops.fp8_matmul(qa, sa, qb, sb, out_dtype=torch.float32).double()
        d = ops.dequantize_fp8(qb, sb, (128, 128), out_dtype=torch.float32)
    assert torch.equal(d, ref.dequantize_fp8(qb, sb, (128, 128), torch.float32))
    assert float((y - expected).norm() / expected.norm()) < 1e-2


@pytest.mark.parametrize("m, n, k", [(1, 256, 512), (64, 4096, 7168), (3, 128, 640), (2, 1536, 7168)])
def test_scaled_mm_arguments_pass_torch_layout_checks(m, n, k):
    """cuda code path exercised on CPU: the sm90 branch's scales have the values and strides
    cuBLAS wants, and torch's own checks of F.scaled_mm (its Meta kernel) accept the call."""
    g = torch.Generator().manual_seed(6)
    a_scale, b_scale = torch.rand(m, k // 128, generator=g), torch.rand(n // 128, k // 128, generator=g)
    sa, sb = cuda_quant.blockwise_scales(a_scale, b_scale, m, k)
    l4 = -(-(k // 128) // 4) * 4
    assert torch.equal(sa, a_scale) and sa.stride() == (1, m)
    assert sb.shape == (l4, n // 128) and sb.stride() == (1, l4) and torch.equal(sb[: k // 128], b_scale.t())
    meta = lambda *shape, dtype=torch.float32: torch.empty(*shape, dtype=dtype, device="meta")  # noqa: E731
    y = cuda_quant._scaled_mm_blockwise(meta(m, k, dtype=torch.float8_e4m3fn), meta(m, k // 128),
                                        meta(n, k, dtype=torch.float8_e4m3fn), meta(n // 128, k // 128), torch.bfloat16)
    assert y.shape == (m, n) and y.dtype == torch.bfloat16
