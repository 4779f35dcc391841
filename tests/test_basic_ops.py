"""rms_norm and linear: hand-checked cases, transformers' RMSNorm on the same weights, every weight
format of linear, bad input, and a property test across backends."""

import pytest
import torch
from hypothesis import given, settings, strategies as st

from v4hal import ops
from v4hal.backends import registry
from v4hal.ops._check import OpInputError

cuda_basic = registry.family_view("cuda", "basic")

BACKENDS = ["cpu", "cpu_fast", "mindspore"]


@pytest.mark.parametrize("backend", BACKENDS)
def test_rms_norm_by_hand(backend):
    x = torch.tensor([[3.0, 4.0], [0.0, 0.0]], dtype=torch.float64)
    with registry.forced(backend):
        y = ops.rms_norm(x, torch.tensor([1.0, 2.0], dtype=torch.float64), eps=1e-6)
        unweighted = ops.rms_norm(x, None, eps=1e-6)
    rms = (12.5 + 1e-6) ** 0.5
    assert torch.allclose(y[0], torch.tensor([3 / rms, 8 / rms], dtype=torch.float64), rtol=1e-6)
    assert torch.allclose(unweighted[0], torch.tensor([3 / rms, 4 / rms], dtype=torch.float64), rtol=1e-6)
    assert y[1].tolist() == [0.0, 0.0]  # eps keeps an all-zero row finite


@pytest.mark.parametrize("backend", BACKENDS)
def test_rms_norm_matches_transformers(backend):
    from transformers.models.deepseek_v4.modeling_deepseek_v4 import DeepseekV4RMSNorm

    g = torch.Generator().manual_seed(0)
    norm = DeepseekV4RMSNorm(64, eps=1e-6)
    with torch.no_grad():
        norm.weight.copy_(torch.randn(64, generator=g))
    x = torch.randn(3, 5, 64, generator=g) * 4
    with registry.forced(backend), torch.no_grad():
        y = ops.rms_norm(x, norm.weight, eps=1e-6)
        expected = norm(x)
    assert torch.allclose(y, expected, rtol=1e-5, atol=1e-6)


def _weights(fmt, n, k, g):
    w = torch.randn(n, k, generator=g) * 0.05
    if fmt == "dense":
        return w, None, w.double()
    if fmt == "fp8":
        q, s = ops.quantize_fp8(w, (128, 128))
        return q, s, ops.dequantize_fp8(q, s, (128, 128), out_dtype=torch.float64)
    if fmt == "fp4":
        p, s = ops.quantize_fp4(w)
        return p, s, ops.dequantize_fp4(p, s, out_dtype=torch.float64)
    q, s = ops.quantize_int8(w)
    return q, s, q.double() * s.double().unsqueeze(-1)


@pytest.mark.parametrize("fmt", ["dense", "fp8", "fp4", "int8"])
def test_dequantize_weight_every_format(fmt):
    """The matrix absorbed MLA multiplies by: the exact dequantization of each format."""
    weight, scale, w = _weights(fmt, 200, 256, torch.Generator().manual_seed(2))
    assert torch.equal(ops.dequantize_weight(weight, scale, torch.float64), w)
    assert ops.dequantize_weight(weight, scale, torch.bfloat16).dtype == torch.bfloat16


def test_dequantize_weight_reads_e8m0_scales_and_refuses_exponent_bytes_as_integers():
    weight, scale, w = _weights("fp8", 200, 256, torch.Generator().manual_seed(3))
    e8m0 = torch.exp2(torch.randint(-10, 5, scale.shape).float())  # powers of two: exact as float8_e8m0fnu
    want = ops.dequantize_weight(weight, e8m0, torch.float64)
    assert torch.equal(ops.dequantize_weight(weight, e8m0.to(torch.float8_e8m0fnu), torch.float64), want)
    with pytest.raises(OpInputError, match="dequantize_weight.*'scale'.*float8_e8m0fnu.*uint8"):
        ops.dequantize_weight(weight, e8m0.to(torch.float8_e8m0fnu).view(torch.uint8), torch.float64)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("fmt", ["dense", "fp8", "fp4", "int8"])
def test_linear_every_weight_format(backend, fmt):
    g = torch.Generator().manual_seed(1)
    weight, scale, w = _weights(fmt, 40, 256, g)
    x = torch.randn(2, 3, 256, generator=g)
    bias = torch.randn(40, generator=g)
    with registry.forced(backend):
        y = ops.linear(x, weight, scale, bias)
    expected = x.double() @ w.T + bias.double()
    assert y.shape == (2, 3, 40) and y.dtype == torch.float32
    # quantized formats also quantize the activation (1x128 e4m3 / per-token int8)
    rtol = {"dense": 1e-5, "fp8": 0.1, "fp4": 1e-2, "int8": 0.05}[fmt]
    assert torch.allclose(y.double(), expected, rtol=rtol, atol=rtol * expected.abs().max().item())


def test_linear_fp8_is_act_quant_then_fp8_matmul():
    g = torch.Generator().manual_seed(2)
    q, s = ops.quantize_fp8(torch.randn(64, 128, generator=g), (128, 128))
    x = torch.randn(5, 128, generator=g).bfloat16()
    a, a_s = ops.quantize_fp8(x, (1, 128))
    assert torch.equal(ops.linear(x, q, s), ops.fp8_matmul(a, a_s, q, s, out_dtype=torch.bfloat16))


@pytest.mark.parametrize("backend", ["cpu", "cpu_fast", "mindspore"])
def test_linear_fp8_ue8m0_activation_scales(backend):
    """act_scale_fmt="ue8m0": the activations' block scales are powers of two (DeepSeek's act_quant
    with scale_fmt ue8m0), which changes the product; a dense weight ignores it."""
    g = torch.Generator().manual_seed(4)
    q, s = ops.quantize_fp8(torch.randn(64, 256, generator=g), (128, 128))
    x = torch.randn(5, 256, generator=g) * 3.0
    a, a_s = ops.quantize_fp8(x, (1, 128), scale_fmt="ue8m0")
    assert torch.equal(a_s, torch.exp2(torch.log2(a_s).round()))
    with registry.forced(backend):
        y = ops.linear(x, q, s, act_scale_fmt="ue8m0")
        y_fp32 = ops.linear(x, q, s)
        w = torch.randn(8, 256, generator=g)
        assert torch.equal(ops.linear(x, w, act_scale_fmt="ue8m0"), ops.linear(x, w))
    with registry.forced("cpu"):
        expected = ops.fp8_matmul(a, a_s, q, s, out_dtype=torch.float32)
    torch.testing.assert_close(y, expected, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(y, y_fp32, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("call, arg", [
    (lambda: ops.rms_norm(torch.ones(2, 4, dtype=torch.int32)), "x"),
    (lambda: ops.rms_norm(torch.ones(2, 4), torch.ones(5)), "weight"),
    (lambda: ops.rms_norm(torch.ones(2, 4), None, eps=0.0), "eps"),
    (lambda: ops.rms_norm(torch.ones(0, 4)), "x"),
    (lambda: ops.linear(torch.ones(2, 8), torch.ones(3, 4)), "weight"),
    (lambda: ops.linear(torch.ones(2, 8), torch.ones(3, 8), torch.ones(3)), "scale"),
    (lambda: ops.linear(torch.ones(2, 128), torch.ones(3, 128).to(torch.float8_e4m3fn)), "scale"),
    (lambda: ops.linear(torch.ones(2, 128), torch.ones(3, 128).to(torch.float8_e4m3fn), torch.ones(2, 1)), "scale"),
    (lambda: ops.linear(torch.ones(2, 8), torch.ones(3, 8), None, torch.ones(4)), "bias"),
    (lambda: ops.linear(torch.ones(2, 8), torch.ones(3, 8, dtype=torch.int32)), "weight"),
    (lambda: ops.linear(torch.ones(2, 8), torch.ones(3, 8), act_scale_fmt="e8m0"), "act_scale_fmt"),
])
def test_bad_input_names_op_and_argument(call, arg):
    with pytest.raises(OpInputError) as err:
        call()
    assert str(err.value).split(":")[0] in ("rms_norm", "linear")
    assert f"argument '{arg}'" in str(err.value)


@settings(max_examples=8, deadline=None)
@given(rows=st.integers(1, 12), d=st.integers(1, 300), log_scale=st.integers(-20, 20),
       dtype=st.sampled_from([torch.float32, torch.bfloat16]), weighted=st.booleans(), seed=st.integers(0, 2 ** 16))
def test_rms_norm_every_backend_matches_the_reference(rows, d, log_scale, dtype, weighted, seed):
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(rows, d, generator=g) * 2.0 ** log_scale).to(dtype)
    w = torch.randn(d, generator=g).to(dtype) if weighted else None
    with registry.forced("cpu"):
        expected = ops.rms_norm(x.double(), None if w is None else w.double(), 1e-6)
    for name in ("cpu_fast", "mindspore", "cuda-on-cpu"):
        if name == "cuda-on-cpu":  # cuda code path exercised on CPU
            y = cuda_basic.rms_norm(x, w, 1e-6)
        else:
            with registry.forced(name):
                y = ops.rms_norm(x, w, 1e-6)
        assert y.dtype == dtype
        tol = 1.6e-2 if dtype == torch.bfloat16 else 1e-5
        assert torch.allclose(y.double(), expected, rtol=tol, atol=tol * 1e-3), name


def test_finite_check_decides_by_sum_then_exactly():
    """`_check.finite` decides by the tensor's [min, max] (one host read): a finite tensor whose
    sum would overflow passes, and NaN, Inf and an Inf pair are all refused with their count."""
    from v4hal.ops import _check

    _check.finite("op", "x", torch.tensor([3e38, 3e38, -1.0]))
    _check.finite("op", "x", torch.tensor([3e38, 3e38], dtype=torch.bfloat16))
    for bad, count in (([1.0, float("nan")], 1), ([float("inf"), 2.0], 1), ([float("inf"), float("-inf")], 2)):
        with pytest.raises(OpInputError, match=f"{count} NaN/Inf"):
            _check.finite("op", "x", torch.tensor(bad))


# cpu_fast's float32 product picks a kernel per call (backends/cpu_fast/basic.py); every choice
# must give the same product.
DENSE_CASES = {
    "one row, GEMV": ((1, 1, 512), (384, 512)),
    "one row, weight above the GEMV limit": ((1, 1, 1024), (1100, 1024)),
    "many rows": ((2, 37, 256), (300, 256)),
    "many rows, 4-D x": ((2, 3, 4, 96), (40, 96)),
    "no rows": ((0, 256), (64, 256)),
}


@pytest.mark.parametrize("kernels", ["picked", "without oneDNN"])
@pytest.mark.parametrize("case", DENSE_CASES)
@pytest.mark.parametrize("bias", [False, True])
def test_cpu_fast_dense_linear_every_kernel_matches_float64(case, kernels, bias, monkeypatch):
    from v4hal.backends.cpu_fast import basic as fast

    if kernels == "without oneDNN":
        monkeypatch.setattr(fast, "_ONEDNN", None)
    x_shape, w_shape = DENSE_CASES[case]
    g = torch.Generator().manual_seed(3)
    x, w = torch.randn(*x_shape, generator=g), torch.randn(*w_shape, generator=g) * 0.05
    b = torch.randn(w_shape[0], generator=g) if bias else None
    y = fast.dense_linear(x, w, b)
    expected = x.double() @ w.double().T + (0 if b is None else b.double())
    assert y.dtype == torch.float32 and y.shape == expected.shape
    assert torch.allclose(y.double(), expected, rtol=1e-5, atol=1e-5)


def test_cpu_fast_dense_linear_non_contiguous_operands():
    from v4hal.backends.cpu_fast import basic as fast

    g = torch.Generator().manual_seed(4)
    x = torch.randn(3, 64, 40, generator=g)[:, ::2].transpose(1, 2)  # [3, 40, 32], strided
    w = torch.randn(32, 48, generator=g).T                             # [48, 32], transposed
    assert torch.allclose(fast.dense_linear(x, w).double(), x.double() @ w.double().T, rtol=1e-5, atol=1e-5)
    one = x[:1, :1]
    assert torch.allclose(fast.dense_linear(one, w).double(), one.double() @ w.double().T, rtol=1e-5, atol=1e-5)


def test_cpu_fast_dense_linear_keeps_autograd_and_traces_to_plain_linear():
    """Gradients need F.linear (neither fast kernel has a backward), and a torch.jit.trace (the
    ONNX exporter) must record aten::linear, not a oneDNN op ONNX lacks."""
    from v4hal.backends.cpu_fast import basic as fast

    g = torch.Generator().manual_seed(6)
    x = torch.randn(4, 16, generator=g, requires_grad=True)
    w = torch.randn(8, 16, generator=g)
    fast.dense_linear(x, w).sum().backward()
    # Column sums of w, up to float32 summation order (a sum near zero has no relative precision).
    torch.testing.assert_close(x.grad, w.sum(0).expand(4, 16), rtol=1e-5, atol=1e-5)
    graph = str(torch.jit.trace(lambda t: fast.dense_linear(t, w), torch.randn(5, 16)).graph)
    assert "aten::linear" in graph and "mkldnn" not in graph


def test_cpu_fast_info_names_the_float32_kernel(monkeypatch):
    from v4hal.backends import cpu_fast
    from v4hal.backends.cpu_fast import basic as fast

    assert cpu_fast.versions()["float32 linear"] == fast.kernel()
    monkeypatch.setattr(fast, "_ONEDNN", None)
    assert cpu_fast.versions()["float32 linear"].startswith("torch (MKL)")
