"""MXFP4 (V4 routed experts): e2m1 codes two per byte (low nibble first) with ue8m0 1x32 scales.
Hand-checked packing and ties, scale formats, round trips, bad input, property tests across
backends ("cuda-on-cpu": the cuda module's functions on CPU tensors)."""

import pytest
import torch
from hypothesis import given, settings, strategies as st

from v4hal import ops
from v4hal.backends import registry
from v4hal.backends.cpu import quant as ref
from v4hal.ops._check import OpInputError
from quant_util import CPU_IMPLS, run_impl

BACKENDS = ["cpu", "cpu_fast", "mindspore"]


def block_of(values, fill=6.0):
    """One 32-wide block whose amax is 6 (scale exactly 1), the given values first."""
    row = torch.full((32,), fill)
    row[: len(values)] = torch.tensor(values)
    return row.unsqueeze(0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_packing_order_low_nibble_first(backend):
    w = block_of([0.5, -1.0, 6.0, -6.0])
    with registry.forced(backend):
        packed, scale = ops.quantize_fp4(w)
    assert scale.tolist() == [[1.0]]
    # codes: 0.5 -> 1, -1.0 -> 8|2 = 10, 6 -> 7, -6 -> 15; byte = even | odd << 4
    assert packed[0, :2].tolist() == [1 | 10 << 4, 7 | 15 << 4]


@pytest.mark.parametrize("backend", BACKENDS)
def test_ties_go_to_the_even_code(backend):
    mids = [0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0, -0.25]
    with registry.forced(backend):
        packed, _ = ops.quantize_fp4(block_of(mids))
        values = ops.dequantize_fp4(packed, torch.ones(1, 1), out_dtype=torch.float32)
    # 0.25 -> 0, 0.75 -> 1.0, 1.25 -> 1.0, 1.75 -> 2.0, 2.5 -> 2.0, 3.5 -> 4.0, 5 -> 4.0, -0.25 -> +0
    assert values[0, :8].tolist() == [0.0, 1.0, 1.0, 2.0, 2.0, 4.0, 4.0, 0.0]
    assert packed[0, 3].item() >> 4 == 0  # -0.25 rounds to +0, never the -0 code 8


@pytest.mark.parametrize("backend", BACKENDS)
def test_scale_is_a_power_of_two_rounded_up(backend):
    w = torch.zeros(2, 64)
    w[0, 0] = 7.0     # 7/6 -> 2
    w[0, 32] = 6.0    # exactly 1
    w[1, 0] = 0.3     # 0.05 -> 0.0625
    with registry.forced(backend):
        _, scale = ops.quantize_fp4(w)
    assert scale[0].tolist() == [2.0, 1.0]
    assert scale[1, 0].item() == 0.0625
    assert scale[1, 1].item() == 2.0 ** -15  # all-zero block: amax floored at 1e-4, 1e-4/6 -> 2**-15


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("fmt", ["fp32", "uint8", "e8m0"])
def test_scale_formats_agree(backend, fmt):
    g = torch.Generator().manual_seed(0)
    packed, scale = ref.quantize_fp4(torch.randn(4, 96, generator=g))
    exponent = (torch.log2(scale).round() + 127).to(torch.uint8)
    given_scale = {"fp32": scale, "uint8": exponent, "e8m0": exponent.view(torch.float8_e8m0fnu)}[fmt]
    with registry.forced(backend):
        out = ops.dequantize_fp4(packed, given_scale, out_dtype=torch.float32)
    assert torch.equal(out, ref.dequantize_fp4(packed, scale, torch.float32))


def test_round_trip_within_half_a_step():
    g = torch.Generator().manual_seed(1)
    w = torch.randn(16, 128, generator=g)
    packed, scale = ops.quantize_fp4(w)
    back = ops.dequantize_fp4(packed, scale, out_dtype=torch.float32)
    s = scale.repeat_interleave(32, -1)
    # the e2m1 grid's widest gap is 2 (between 4 and 6): error <= 1 x scale
    assert bool(((back - w).abs() <= s).all())


@pytest.mark.parametrize("backend", BACKENDS)
def test_fp4_matmul_float_and_fp8_activations(backend):
    g = torch.Generator().manual_seed(2)
    packed, scale = ref.quantize_fp4(torch.randn(48, 256, generator=g))
    w = ref.dequantize_fp4(packed, scale, torch.float64)
    x = torch.randn(3, 256, generator=g)
    a, a_s = ops.quantize_fp8(x, (1, 128))
    a_values = a.double() * a_s.double().repeat_interleave(128, -1)
    with registry.forced(backend):
        y_float = ops.fp4_matmul(x, packed, scale, out_dtype=torch.float32).double()
        y_fp8 = ops.fp4_matmul(a, packed, scale, a_s, out_dtype=torch.float32).double()
    for y, expected in ((y_float, x.double() @ w.T), (y_fp8, a_values @ w.T)):
        # cpu_fast rounds float activations to BF16 (the weight is exact in BF16)
        assert torch.allclose(y, expected, rtol=1e-2, atol=1e-2 * expected.abs().max().item())
        assert float(1 - 2 * (y * expected).sum() / ((y * y).sum() + (expected * expected).sum())) < 1e-5


@pytest.mark.parametrize("call, arg", [
    (lambda: ops.quantize_fp4(torch.ones(4, 48)), "w"),
    (lambda: ops.quantize_fp4(torch.ones(4, 64, dtype=torch.int8)), "w"),
    (lambda: ops.quantize_fp4(torch.full((2, 32), float("nan"))), "w"),
    (lambda: ops.quantize_fp4(torch.ones(0, 32)), "w"),
    (lambda: ops.dequantize_fp4(torch.ones(4, 16, dtype=torch.int8), torch.ones(4, 1)), "packed"),
    (lambda: ops.dequantize_fp4(torch.ones(4, 16, dtype=torch.uint8), torch.ones(4, 2)), "scale"),
    (lambda: ops.dequantize_fp4(torch.ones(4, 16, dtype=torch.uint8), torch.ones(4, 1, dtype=torch.float16)), "scale"),
    (lambda: ops.fp4_matmul(torch.ones(2, 64), torch.ones(4, 16, dtype=torch.uint8), torch.ones(4, 1)), "b"),
    (lambda: ops.fp4_matmul(torch.ones(2, 32).to(torch.float8_e4m3fn), torch.ones(4, 16, dtype=torch.uint8),
                            torch.ones(4, 1), torch.ones(2, 2)), "a_scale"),
])
def test_bad_input_names_op_and_argument(call, arg):
    with pytest.raises(OpInputError) as err:
        call()
    assert str(err.value).split(":")[0] in ("quantize_fp4", "dequantize_fp4", "fp4_matmul")
    assert f"argument '{arg}'" in str(err.value)


@settings(max_examples=8, deadline=None)
@given(n=st.integers(1, 64), k_blocks=st.integers(1, 4), m=st.integers(1, 6), log_scale=st.integers(-10, 10),
       seed=st.integers(0, 2 ** 16))
def test_every_backend_matches_the_reference(n, k_blocks, m, log_scale, seed):
    k = 32 * k_blocks
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=g) * 2.0 ** log_scale
    packed, scale = ref.quantize_fp4(w)
    x = torch.randn(m, k, generator=g)
    expected = x.double() @ ref.dequantize_fp4(packed, scale, torch.float64).T
    for name in CPU_IMPLS:
        if name != "cuda-on-cpu":
            p2, s2 = run_impl(name, "quantize_fp4", w)
            assert torch.equal(p2, packed) and torch.equal(s2, scale), name
        d = run_impl(name, "dequantize_fp4", packed, scale, torch.float32)
        assert torch.equal(d, ref.dequantize_fp4(packed, scale, torch.float32)), name
        y = run_impl(name, "fp4_matmul", x, packed, scale, None, torch.float32).double()
        bound = 1e-2 * (x.double().abs() @ ref.dequantize_fp4(packed, scale, torch.float64).abs().T) + 1e-30
        assert bool(((y - expected).abs() <= bound).all()), name


def test_device_path_dequantizes_exactly():
    """The table lookup cuda and ascend inherit from cpu_fast on a device, on CPU tensors."""
    from v4hal.backends.cpu_fast import quant as fast

    g = torch.Generator().manual_seed(4)
    packed = torch.randint(0, 256, (6, 48), generator=g, dtype=torch.uint8)
    scale = torch.randint(110, 140, (6, 3), generator=g, dtype=torch.uint8)
    for dtype in (torch.float32, torch.bfloat16, torch.float64):
        assert torch.equal(fast._dequantize_fp4_on_device(packed, scale, dtype), ref.dequantize_fp4(packed, scale, dtype))
