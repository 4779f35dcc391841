"""NaN in the MoE family's inputs gives the same answer or the same error on every backend (the
MindSpore backend's clamps and max-with-zero would otherwise turn a NaN into a number)."""

import pytest
import torch

from v4hal import ops
from v4hal.backends import registry
from v4hal.ops._check import OpInputError

BACKENDS = ["cpu", "cpu_fast", "mindspore"]


def _experts(fmt, g):
    w = torch.randn(2, 16, 256, generator=g)
    quantize = {"fp8": lambda m: ops.quantize_fp8(m, (128, 128)), "int8": ops.quantize_int8}[fmt]
    parts = [quantize(w[e]) for e in range(2)]
    return torch.stack([p[0] for p in parts]), torch.stack([p[1] for p in parts])


@pytest.mark.parametrize("fmt", ["fp8", "int8"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_grouped_matmul_refuses_nan_activations_of_quantized_experts(fmt, backend):
    """Quantized experts quantize their activations, which refuses NaN/Inf: the contract checks
    it once, before any backend runs, so every backend gives the same error."""
    g = torch.Generator().manual_seed(0)
    weight, scale = _experts(fmt, g)
    x = torch.randn(4, 256, generator=g)
    x[3, 7] = float("nan")  # a row of the second expert
    with registry.forced(backend), \
            pytest.raises(OpInputError, match=r"grouped_matmul: argument 'x' expected finite values, got 1 NaN"):
        ops.grouped_matmul(x, weight, torch.tensor([0, 2, 4]), scale)


@pytest.mark.parametrize("backend", BACKENDS)
def test_swiglu_with_limit_keeps_nan(backend):
    gate_up = torch.randn(3, 8, generator=torch.Generator().manual_seed(1)) * 20
    gate_up[0, 1] = float("nan")  # gate half
    gate_up[1, 6] = float("nan")  # up half
    with registry.forced("cpu"):
        ref = ops.swiglu(gate_up, 7.0)
    with registry.forced(backend):
        out = ops.swiglu(gate_up, 7.0)
    assert ref.isnan().sum(-1).tolist() == [1, 1, 0]
    torch.testing.assert_close(out, ref, equal_nan=True)
