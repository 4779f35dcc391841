"""int8 W8A8 (Ascend A2/A3's path): symmetric per-token activations x per-channel weights with
exact int32 accumulation. Hand-checked cases, bad input, property tests across backends
("cuda-on-cpu": the cuda module's functions on CPU tensors)."""

import pytest
import torch
from hypothesis import given, settings, strategies as st

from v4hal import ops
from v4hal.backends import registry
from v4hal.backends.cpu import quant as ref
from v4hal.ops._check import OpInputError
from quant_util import CPU_IMPLS, run_impl

BACKENDS = ["cpu", "cpu_fast", "mindspore"]


@pytest.mark.parametrize("backend", BACKENDS)
def test_quantize_by_hand(backend):
    x = torch.tensor([[127.0, -63.5, 0.5, 1.5], [0.0, 0.0, 0.0, 0.0], [2.54, -1.27, 0.0, 0.0]])
    with registry.forced(backend):
        q, s = ops.quantize_int8(x)
    assert q[0].tolist() == [127, -64, 0, 2]  # -63.5 -> -64, 0.5 -> 0, 1.5 -> 2: half to even
    assert torch.allclose(s, torch.tensor([1.0, 1e-8 / 127, 0.02]))
    assert q[1].tolist() == [0, 0, 0, 0]  # an all-zero row: amax floored, no NaN
    assert q[2].tolist() == [127, -64, 0, 0]  # -1.27/0.02 = -63.5 in float32 rounds half to even


@pytest.mark.parametrize("backend", BACKENDS)
def test_int8_matmul_is_exact_int32_accumulation(backend):
    # 4096 products of 127 * 127 = 66,064,384 > 2**24: an fp32 accumulator would round; int32 must
    # not (float64 scales keep the epilogue exact too).
    a = torch.full((2, 4096), 127, dtype=torch.int8)
    a[1, 0] = 1
    b = torch.full((3, 4096), 127, dtype=torch.int8)
    with registry.forced(backend):
        y = ops.int8_matmul(a, torch.ones(2, dtype=torch.float64), b, torch.ones(3, dtype=torch.float64),
                            out_dtype=torch.float64)
    assert y[0].tolist() == [4096 * 16129.0] * 3
    assert y[1].tolist() == [4095 * 16129.0 + 127] * 3


@pytest.mark.parametrize("backend", BACKENDS)
def test_scales_are_per_token_and_per_channel(backend):
    a = torch.ones(2, 8, dtype=torch.int8)
    b = torch.ones(3, 8, dtype=torch.int8)
    with registry.forced(backend):
        y = ops.int8_matmul(a, torch.tensor([1.0, 2.0]), b, torch.tensor([1.0, 10.0, 100.0]), out_dtype=torch.float32)
    assert y.tolist() == [[8.0, 80.0, 800.0], [16.0, 160.0, 1600.0]]


@pytest.mark.parametrize("backend", BACKENDS)
def test_one_input_feature(backend):
    # K = 1 with several output channels: torch 2.13's CPU _int_mm answers garbage there.
    a = torch.tensor([[5], [-2]], dtype=torch.int8)
    b = torch.tensor([[3], [-7], [127]], dtype=torch.int8)
    with registry.forced(backend):
        y = ops.int8_matmul(a, torch.ones(2), b, torch.ones(3), out_dtype=torch.float32)
    assert y.tolist() == [[15.0, -35.0, 635.0], [-6.0, 14.0, -254.0]]


@pytest.mark.parametrize("call, arg", [
    (lambda: ops.quantize_int8(torch.ones(3, 4, dtype=torch.int32)), "x"),
    (lambda: ops.quantize_int8(torch.tensor([[1.0, float("inf")]])), "x"),
    (lambda: ops.quantize_int8(torch.ones(2, 0)), "x"),
    (lambda: ops.int8_matmul(torch.ones(2, 8, dtype=torch.int8), torch.ones(2), torch.ones(3, 4, dtype=torch.int8),
                             torch.ones(3)), "b"),
    (lambda: ops.int8_matmul(torch.ones(2, 8, dtype=torch.int8), torch.ones(3), torch.ones(3, 8, dtype=torch.int8),
                             torch.ones(3)), "a_scale"),
    (lambda: ops.int8_matmul(torch.ones(2, 8, dtype=torch.int8), torch.ones(2), torch.ones(3, 8, dtype=torch.int8),
                             torch.ones(1, 3)), "b_scale"),
    (lambda: ops.int8_matmul(torch.ones(2, 8), torch.ones(2), torch.ones(3, 8, dtype=torch.int8), torch.ones(3)), "a"),
])
def test_bad_input_names_op_and_argument(call, arg):
    with pytest.raises(OpInputError) as err:
        call()
    assert str(err.value).split(":")[0] in ("quantize_int8", "int8_matmul")
    assert f"argument '{arg}'" in str(err.value)


@settings(max_examples=8, deadline=None)
@given(m=st.integers(1, 24), n=st.integers(1, 64), k=st.integers(1, 600), log_scale=st.integers(-8, 8),
       seed=st.integers(0, 2 ** 16))
def test_every_backend_matches_the_reference(m, n, k, log_scale, seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(m, k, generator=g) * 2.0 ** log_scale
    qa, sa = ref.quantize_int8(x)
    qb, sb = ref.quantize_int8(torch.randn(n, k, generator=g))
    expected = (qa.long() @ qb.long().T).double() * sa.double().unsqueeze(-1) * sb.double()
    for name in CPU_IMPLS:
        q2, s2 = run_impl(name, "quantize_int8", x)
        assert torch.equal(s2, sa), name
        assert float((q2 != qa).double().mean()) <= 1e-3 and int((q2.int() - qa.int()).abs().max()) <= 1, name
        y = run_impl(name, "int8_matmul", qa, sa, qb, sb, torch.float32).double()
        assert torch.allclose(y, expected, rtol=1e-6, atol=1e-6 * expected.abs().max().item() + 1e-30), name


def test_device_path_matches_the_reference_where_float32_is_exact():
    """What cuda (below its _int_mm shapes) and ascend (float outputs, long K) inherit from cpu_fast
    on a device, exercised on CPU tensors: exact while every sum stays below 2**24."""
    from v4hal.backends.cpu_fast import quant as fast

    g = torch.Generator().manual_seed(3)
    a = torch.randint(-127, 128, (5, 1040), generator=g, dtype=torch.int8)
    b = torch.randint(-127, 128, (7, 1040), generator=g, dtype=torch.int8)
    sa, sb = torch.rand(5, generator=g) + 0.5, torch.rand(7, generator=g) + 0.5
    y = fast._int8_matmul_on_device(a, sa, b, sb, torch.float64)
    want = ref.int8_matmul(a, sa.double(), b, sb.double(), torch.float64)
    torch.testing.assert_close(y, want, rtol=1e-6, atol=0)
    assert y.dtype == torch.float64
