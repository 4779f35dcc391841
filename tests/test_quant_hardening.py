"""Silent wrong results in the quant family (issue 15): expanded int8 activations, int32 overflow at
long K, huge FP8 scales, and NaN / Inf / negative scales, which every scale-taking op refuses."""

import pytest
import torch

from v4hal import ops
from v4hal.backends import registry
from v4hal.backends.cpu import quant as ref
from v4hal.ops import quant
from v4hal.ops._check import OpInputError
from quant_util import CPU_IMPLS, run_impl

BACKENDS = ["cpu", "cpu_fast", "mindspore"]


@pytest.mark.parametrize("impl", CPU_IMPLS)
@pytest.mark.parametrize("layout", ["rows", "columns", "batch"])
def test_int8_matmul_expanded_activation_equals_reference(impl, layout):
    torch.manual_seed(0)
    m, k, n = 24, 64, 16
    source = torch.randint(-128, 128, (m, k), dtype=torch.int8)
    a = {"rows": source[:1].expand(m, k),  # one token broadcast (stride 0 along M)
         "columns": source[:, :1].expand(m, k),  # stride 0 along K
         "batch": source[None].expand(3, m, k)}[layout]
    b = torch.randint(-128, 128, (n, k), dtype=torch.int8)
    a_scale, b_scale = torch.rand(a.shape[:-1]) + 0.5, torch.rand(n) + 0.5
    expected = ref.int8_matmul(a.contiguous(), a_scale, b, b_scale, torch.float32)
    assert torch.equal(run_impl(impl, "int8_matmul", a, a_scale, b, b_scale, torch.float32), expected)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("k", [131_072, 140_000])  # INT32_EXACT_K + 1, and more
def test_int8_matmul_long_k_does_not_overflow(backend, k):
    # -128 * -128 * K > 2**31 - 1 once K > INT32_EXACT_K: an int32 accumulator wraps negative.
    a = torch.full((1, k), -128, dtype=torch.int8)
    b = torch.full((2, k), -128, dtype=torch.int8)
    b[1, :1000] = 127
    exact = torch.tensor([k * 16384.0, (k - 1000) * 16384.0 - 1000 * 16256.0], dtype=torch.float64)
    with registry.forced(backend):
        y32 = ops.int8_matmul(a, torch.ones(1), b, torch.ones(2), out_dtype=torch.float32)
        y64 = ops.int8_matmul(a, torch.ones(1, dtype=torch.float64), b, torch.ones(2, dtype=torch.float64),
                              out_dtype=torch.float64)
    assert torch.equal(y32[0], exact.float())  # the exact sum, rounded once to float32
    assert torch.equal(y64[0], exact)


@pytest.mark.parametrize("impl", CPU_IMPLS)
@pytest.mark.parametrize("exponent", [7, 60, 68, 100, 119])
def test_dequantize_fp8_huge_scales_equal_reference(impl, exponent):
    q = torch.tensor([[448.0, -448.0, 1.0, 2.0 ** -9], [0.0, 3.5, -0.0, 240.0]]).to(torch.float8_e4m3fn)
    scale = torch.tensor([[2.0 ** exponent]])
    for out_dtype in (torch.float32, torch.bfloat16):
        expected = ref.dequantize_fp8(q, scale, quant.WEIGHT_BLOCK, out_dtype)
        assert torch.isfinite(expected).all()
        assert torch.equal(run_impl(impl, "dequantize_fp8", q, scale, quant.WEIGHT_BLOCK, out_dtype), expected)


@pytest.mark.parametrize("impl", CPU_IMPLS)
@pytest.mark.parametrize("rows", [2, 40])  # cpu_fast: decode GEMV and prefill GEMM
def test_fp8_matmul_huge_weight_scales_equal_reference(impl, rows):
    torch.manual_seed(1)
    a, a_scale = ops.quantize_fp8(torch.randn(rows, 256), quant.ACT_BLOCK)
    b, _ = ops.quantize_fp8(torch.randn(130, 256), quant.WEIGHT_BLOCK)
    b_scale = torch.tensor([[2.0 ** 70, 2.0 ** 3], [2.0 ** -20, 2.0 ** 90]])
    expected = ref.fp8_matmul(a, a_scale.double(), b, b_scale.double(), torch.float64)
    y = run_impl(impl, "fp8_matmul", a, a_scale, b, b_scale, torch.float32).double()
    assert torch.isfinite(y).all()
    for cols in (slice(0, 128), slice(128, 130)):  # each 128-row weight block on its own scale
        err = (y[:, cols] - expected[:, cols]).abs().max() / expected[:, cols].abs().max()
        assert err < 1e-2  # BF16 activations in the prefill GEMM; was Inf / NaN


def _fp8_args():
    a, a_scale = ops.quantize_fp8(torch.randn(2, 128), quant.ACT_BLOCK)
    b, b_scale = ops.quantize_fp8(torch.randn(4, 128), quant.WEIGHT_BLOCK)
    return a, a_scale, b, b_scale


def _fp4_args():
    packed, scale = ops.quantize_fp4(torch.randn(4, 64))
    return packed, scale


def _int8_args():
    a, a_scale = ops.quantize_int8(torch.randn(2, 8))
    b, b_scale = ops.quantize_int8(torch.randn(4, 8))
    return a, a_scale, b, b_scale


def _poison(t, value):
    t = t.clone()
    t.view(-1)[-1] = value
    return t


def _scale_calls():
    """(op, scale argument, call taking the poisoned scale) for every op that takes a scale."""
    a, a_s, b, b_s = _fp8_args()
    p, p_s = _fp4_args()
    ia, ia_s, ib, ib_s = _int8_args()
    x = torch.randn(2, 128)
    return [
        ("dequantize_fp8", "scale", b_s, lambda s: ops.dequantize_fp8(b, s)),
        ("fp8_matmul", "a_scale", a_s, lambda s: ops.fp8_matmul(a, s, b, b_s)),
        ("fp8_matmul", "b_scale", b_s, lambda s: ops.fp8_matmul(a, a_s, b, s)),
        ("dequantize_fp4", "scale", p_s, lambda s: ops.dequantize_fp4(p, s)),
        ("fp4_matmul", "b_scale", p_s, lambda s: ops.fp4_matmul(torch.randn(2, 64), p, s)),
        ("fp4_matmul", "a_scale", a_s[:, :1], lambda s: ops.fp4_matmul(a[:, :64], p, p_s, a_scale=s)),
        ("int8_matmul", "a_scale", ia_s, lambda s: ops.int8_matmul(ia, s, ib, ib_s)),
        ("int8_matmul", "b_scale", ib_s, lambda s: ops.int8_matmul(ia, ia_s, ib, s)),
        ("linear", "scale", b_s, lambda s: ops.linear(x, b, s)),
        ("linear", "scale", ib_s, lambda s: ops.linear(x[:, :8], ib, s)),
        ("grouped_matmul", "scale", b_s[None].expand(2, -1, -1),
         lambda s: ops.grouped_matmul(x, b[None].expand(2, -1, -1), torch.tensor([0, 0, 2]), s)),
    ]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("value, what", [(float("nan"), "1 NaN"), (float("inf"), "1 Inf"),
                                         (-float("inf"), "1 Inf, 1 negative"), (-0.5, "1 negative")])
def test_bad_scales_are_refused_naming_op_and_argument(backend, value, what):
    with registry.forced(backend):
        for op, arg, scale, call in _scale_calls():
            message = rf"{op}: argument '{arg}' expected finite, non-negative scales, got {what} value\(s\)"
            with pytest.raises(OpInputError, match=message):
                call(_poison(scale, value))


@pytest.mark.parametrize("backend", BACKENDS)
def test_zero_scales_are_allowed(backend):
    with registry.forced(backend):
        for _, _, scale, call in _scale_calls():
            assert (call(torch.zeros_like(scale)) == 0).all()  # an all-zero block: zeros, no error


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.uint8, torch.float8_e8m0fnu])
def test_e8m0_nan_exponent_byte_is_refused(backend, dtype):
    # 0xFF is e8m0's NaN; read as an exponent it would be 2**128 = Inf in float32.
    packed, scale = _fp4_args()
    exponents = (torch.log2(scale) + 127).to(torch.uint8)
    exponents[1, 0] = 0xFF
    with registry.forced(backend), pytest.raises(
            OpInputError, match=r"fp4_matmul: argument 'b_scale' expected finite, non-negative scales, "
                                r"got 1 exponent byte\(s\) 0xFF \(NaN\)"):
        ops.fp4_matmul(torch.randn(2, 64), packed, exponents.view(dtype))


def test_grouped_matmul_checks_only_the_experts_that_get_rows():
    # Expert 0 gets no rows: its scales are never read by any backend, so they are not checked.
    x = torch.randn(2, 128)
    _, _, b, b_s = _fp8_args()
    scale = torch.stack((torch.full_like(b_s, float("nan")), b_s))
    y = ops.grouped_matmul(x, b[None].expand(2, -1, -1), torch.tensor([0, 0, 2]), scale)
    assert torch.equal(y, ops.linear(x, b, b_s))


def test_scale_checks_step_aside_under_checks_shapes():
    a, a_s, b, b_s = _fp8_args()
    registry.configure(checks="shapes")
    try:
        y = ops.fp8_matmul(a, a_s, b, _poison(b_s, float("nan")), out_dtype=torch.float32)
    finally:
        registry.reset()
    assert torch.isnan(y).all()
