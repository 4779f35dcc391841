"""Validation once: a public op reads tensor values on the host (each read a synchronisation on a
GPU or NPU) at most once for its checks, however many primitives it is built from. Counted with
`bench.host_reads.HostReads` (a patch of Tensor.item / tolist / bool / int / float / index)."""

import pytest
import torch

from v4hal import ops
from v4hal.backends import registry
from v4hal.bench.host_reads import HostReads

BACKENDS = ["cpu", "cpu_fast"]


def _checks(fn) -> HostReads:
    fn()  # first call: choices made, modules imported
    with HostReads() as reads:
        fn()
    return reads


def _fp8_linear():
    g = torch.Generator().manual_seed(0)
    q, s = ops.quantize_fp8(torch.randn(256, 512, generator=g), (128, 128))
    x = torch.randn(3, 512, generator=g)
    return lambda: ops.linear(x, q, s)


def _fp8_moe(tokens: int, hash_layer: bool):
    g = torch.Generator().manual_seed(1)
    e, h, i = 8, 128, 128

    def stack(n, k):
        parts = [ops.quantize_fp8(torch.randn(n, k, generator=g) * 0.1, (128, 128)) for _ in range(e)]
        return torch.stack([p[0] for p in parts]), torch.stack([p[1] for p in parts])

    (gu, gus), (dn, dns) = stack(2 * i, h), stack(h, i)
    shared = [ops.quantize_fp8(torch.randn(n, k, generator=g) * 0.1, (128, 128)) for n, k in ((i, h), (i, h), (h, i))]
    kw = dict(scoring="sigmoid", swiglu_limit=7.0,
              shared=ops.SharedExpertWeights(*(q for q, _ in shared), *(s for _, s in shared)))
    if hash_layer:
        kw.update(input_ids=torch.randint(0, 30, (tokens,), generator=g),
                  tid2eid=torch.stack([torch.randperm(e, generator=g)[:2] for _ in range(30)]))
    else:
        kw.update(bias=torch.randn(e, generator=g) * 0.1, n_group=2, topk_group=1)
    x, gate = torch.randn(tokens, h, generator=g), torch.randn(e, h, generator=g)
    return lambda: ops.moe_forward(x, gate, ops.ExpertWeights(gu, dn, gus, dns), 2, **kw)


def _sparse_attention():
    g = torch.Generator().manual_seed(2)
    q, kv = torch.randn(1, 4, 8, 64, generator=g), torch.randn(1, 40, 64, generator=g)
    idx = torch.randint(-1, 40, (1, 4, 16), generator=g, dtype=torch.int32)
    return lambda: ops.sparse_attention(q, kv, idx, 0.125, sink=torch.zeros(8))


CALLS = {"fp8 linear": _fp8_linear, "fp8 moe_forward decode": lambda: _fp8_moe(1, False),
         "fp8 moe_forward prefill": lambda: _fp8_moe(6, False), "fp8 hash moe_forward": lambda: _fp8_moe(3, True),
         "sparse_attention": _sparse_attention}


@pytest.mark.parametrize("call", CALLS)
@pytest.mark.parametrize("backend", BACKENDS)
def test_one_host_read_for_the_checks_of_a_public_call(backend, call):
    with registry.forced(backend):
        reads = _checks(CALLS[call]())
    assert reads.checks == 1, reads.where  # one: the checks read values, and read them together


@pytest.mark.parametrize("call", CALLS)
def test_shapes_mode_reads_nothing_for_checks(call):
    registry.configure(backend="cpu_fast", checks="shapes")
    try:
        assert _checks(CALLS[call]()).checks == 0
    finally:
        registry.reset()


def test_the_count_sees_a_composite_that_checks_again(monkeypatch):
    """A composite re-entering the public quant ops (the shape before validation once) validates
    three times, and the count says so."""
    from v4hal.backends.cpu import basic

    def reentering(x, weight, scale, bias, fmt, act_scale_fmt):
        a, a_scale = ops.quantize_fp8(x, ops.ACT_BLOCK, act_scale_fmt)
        return ops.fp8_matmul(a, a_scale, weight, scale, out_dtype=x.dtype)

    monkeypatch.setattr(basic, "composed_linear", reentering)
    with registry.forced("cpu"):
        reads = _checks(_fp8_linear())
    assert reads.checks == 3, reads.where  # linear's, quantize_fp8's finite x, fp8_matmul's scales


def test_a_weight_scale_is_read_once_until_it_changes(monkeypatch):
    """A scale that passed is not read again while it stays the same tensor, unchanged; a write
    to it (version counter) or another tensor is read again, so NaN still gets caught."""
    from v4hal.ops import _check

    read = []
    bounds = _check._bounds
    monkeypatch.setattr(_check, "_bounds", lambda t: read.append(t) or bounds(t))
    g = torch.Generator().manual_seed(3)
    q, s = ops.quantize_fp8(torch.randn(256, 512, generator=g), (128, 128))
    x = torch.randn(3, 512, generator=g)
    ops.linear(x, q, s)
    assert any(t is s for t in read)
    read.clear()
    ops.linear(x, q, s)
    assert [t is x for t in read] == [True]  # x is read each call; the weight's scale is not
    s2 = s.clone()
    s2[0, 0] = float("nan")
    with pytest.raises(ops.OpInputError, match="'scale'.*1 NaN"):
        ops.linear(x, q, s2)
    s[1, 1] = float("inf")
    with pytest.raises(ops.OpInputError, match="'scale'.*1 Inf"):
        ops.linear(x, q, s)
