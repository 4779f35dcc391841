"""Sinkhorn-Knopp as mHC runs it: doubly stochastic after 20 iterations, stable under composition,
identical across backends (the cuda code path is exercised on CPU)."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from v4hal import ops
from v4hal.backends import registry
from v4hal.ops._check import OpInputError

cuda_mhc = registry.family_view("cuda", "mhc")

BACKENDS = ["cpu", "cpu_fast", "mindspore"]
LAYERS = 61  # V4-Pro depth: two mHC sites per layer


def _logits(count, n=4, spread=1.0, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(count, n, n, generator=g, dtype=torch.float64) * spread).to(dtype)


@pytest.mark.parametrize("backend", BACKENDS)
def test_rows_and_columns_sum_to_one_after_20_iterations(backend):
    logits = _logits(512, dtype=torch.float32)
    with registry.forced(backend):
        m = ops.sinkhorn(logits, iters=20, eps=1e-6)
    assert m.dtype == torch.float32 and bool((m > 0).all())
    assert float((m.sum(-1) - 1).abs().max()) < 1e-3
    assert float((m.sum(-2) - 1).abs().max()) < 1e-3


def test_cuda_code_path_exercised_on_cpu_matches_reference():
    logits = _logits(64, spread=3.0)
    with registry.forced("cpu"):
        ref = ops.sinkhorn(logits, 20, 1e-6)
    torch.testing.assert_close(cuda_mhc.sinkhorn(logits.clone(), 20, 1e-6), ref, rtol=1e-12, atol=1e-14)


def test_zero_logits_give_the_uniform_matrix_by_hand():
    n, eps = 4, 1e-6
    m = ops.sinkhorn(torch.zeros(1, n, n, dtype=torch.float64), iters=1, eps=eps)
    # softmax = 1/n, + eps, then each column divided by its sum n*(1/n + eps) + eps.
    expected = (1 / n + eps) / (n * (1 / n + eps) + eps)
    torch.testing.assert_close(m, torch.full((1, n, n), expected, dtype=torch.float64), rtol=1e-15, atol=0)


def test_one_iteration_is_softmax_then_column_normalisation():
    logits = torch.tensor([[[0.0, 1.0], [2.0, 0.5]]], dtype=torch.float64)
    s = torch.softmax(logits, -1) + 1e-6
    expected = s / (s.sum(-2, keepdim=True) + 1e-6)
    torch.testing.assert_close(ops.sinkhorn(logits, 1, 1e-6), expected, rtol=1e-15, atol=0)


def test_composite_of_many_comb_matrices_stays_non_expansive():
    """The product over a 61-layer model's 122 mHC sites keeps its largest row and column sum
    (its inf- and 1-norm) near 1; row-softmax alone, the unconstrained mix, does not."""
    logits = _logits(2 * LAYERS, seed=3)
    combs = ops.sinkhorn(logits, 20, 1e-6)
    product, unconstrained = torch.eye(4, dtype=torch.float64), torch.eye(4, dtype=torch.float64)
    for c, raw in zip(combs, torch.softmax(logits, -1)):
        product, unconstrained = product @ c, unconstrained @ raw
    assert abs(float(product.sum(-1).max()) - 1) < 2e-3
    assert abs(float(product.sum(-2).max()) - 1) < 2e-3
    assert float(unconstrained.sum(-2).max()) > 1.2  # the property is not automatic


@settings(max_examples=25, deadline=None)
@given(n=st.integers(2, 8), count=st.integers(1, 6), iters=st.integers(1, 30),
       spread=st.floats(0.0, 6.0), seed=st.integers(0, 2**16))
def test_fast_path_equals_reference_and_stays_positive(n, count, iters, spread, seed):
    logits = _logits(count, n, spread, seed)
    with registry.forced("cpu"):
        ref = ops.sinkhorn(logits, iters, 1e-6)
    with registry.forced("cpu_fast"):
        fast = ops.sinkhorn(logits, iters, 1e-6)
    torch.testing.assert_close(fast, ref, rtol=1e-12, atol=1e-14)
    assert bool((ref > 0).all())
    # the last step divides each column by (its sum + eps): no column sum can exceed 1.
    assert float(ref.sum(-2).max()) <= 1.0


def test_bad_inputs_name_op_and_argument():
    with pytest.raises(OpInputError, match=r"sinkhorn: argument 'logits' expected square"):
        ops.sinkhorn(torch.zeros(2, 4, 3))
    bad = torch.zeros(2, 4, 4)
    bad[1, 2, 3] = float("nan")
    with pytest.raises(OpInputError, match=r"sinkhorn: argument 'logits' expected finite values"):
        ops.sinkhorn(bad)
    with pytest.raises(OpInputError, match=r"sinkhorn: argument 'iters' expected a positive int"):
        ops.sinkhorn(torch.zeros(4, 4), iters=0)
    with pytest.raises(OpInputError, match=r"sinkhorn: argument 'iters' expected at most 100, got 1000000000"):
        ops.sinkhorn(torch.zeros(4, 4), iters=10**9)
    with pytest.raises(OpInputError, match=r"sinkhorn: argument 'logits' expected dtype float32 or float64"):
        ops.sinkhorn(torch.zeros(4, 4, dtype=torch.bfloat16))
