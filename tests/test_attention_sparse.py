"""sparse_attention and window_indices: hand-checked values in float64, agreement of every
backend implementation (the cuda code path exercised on CPU), properties, and bad input."""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from v4hal import ops
from v4hal.backends import registry
from v4hal.backends.cpu import attention as ref_impl
from v4hal.backends.cpu_fast import attention as fast_impl
from v4hal.backends.mindspore import attention as ms_impl
from v4hal.ops._check import OpInputError

cuda_impl = registry.family_view("cuda", "attention")

D64 = torch.float64


def test_hand_checked_two_entries_with_sink_and_hole():
    # One query, one head: logits 0 and log 3 over rows 0 and 1, sink logit 0, one -1 slot.
    q = torch.tensor([[[[1.0, 0.0]]]], dtype=D64)
    kv = torch.tensor([[[0.0, 5.0], [math.log(3), 7.0], [100.0, 100.0]]], dtype=D64)
    idx = torch.tensor([[[0, -1, 1]]], dtype=torch.int32)
    out, lse = ops.sparse_attention(q, kv, idx, 1.0, sink=torch.zeros(1, dtype=D64), return_lse=True)
    # weights 1/5 (row 0), 3/5 (row 1), sink takes 1/5 and contributes nothing
    want = (1 / 5) * kv[0, 0] + (3 / 5) * kv[0, 1]
    torch.testing.assert_close(out[0, 0, 0], want)
    torch.testing.assert_close(lse[0, 0, 0], torch.tensor(math.log(5), dtype=D64))


def test_mla_value_is_the_leading_v_dim_channels_and_duplicates_count_twice():
    q = torch.tensor([[[[0.0, 0.0, 0.0]]]], dtype=D64)  # all logits 0: weights by multiplicity
    kv = torch.tensor([[[1.0, 2.0, 9.0], [4.0, 8.0, 9.0]]], dtype=D64)
    out = ops.sparse_attention(q, kv, torch.tensor([[[0, 0, 1]]]), 0.5, v_dim=2)
    torch.testing.assert_close(out[0, 0, 0], torch.tensor([2.0, 4.0], dtype=D64))


def test_a_query_with_no_entry_gives_zero_and_minus_inf_lse():
    q = torch.randn(1, 2, 3, 4, dtype=D64)
    kv = torch.randn(1, 5, 4, dtype=D64)
    idx = torch.tensor([[[-1, -1], [2, -1]]])
    out, lse = ops.sparse_attention(q, kv, idx, 0.5, return_lse=True)
    assert torch.equal(out[0, 0], torch.zeros(3, 4, dtype=D64)) and torch.isinf(lse[0, 0]).all()
    torch.testing.assert_close(out[0, 1], kv[0, 2].expand(3, 4))  # one entry: its value exactly


def _random_case(g, b=2, s=5, n=13, h=3, d=8, k=7, v_dim=None, sink=True):
    idx = torch.randint(-1, n, (b, s, k), generator=g)
    return (torch.randn(b, s, h, d, generator=g, dtype=D64), torch.randn(b, n, d, generator=g, dtype=D64), idx,
            d ** -0.5, torch.randn(h, generator=g, dtype=D64) if sink else None, v_dim or d)


@pytest.mark.parametrize("impl", [fast_impl, cuda_impl, ms_impl], ids=["cpu_fast", "cuda code path exercised on CPU",
                                                                        "mindspore"])
@pytest.mark.parametrize("mla", [False, True])
def test_implementations_agree_with_the_reference(impl, mla):
    g = torch.Generator().manual_seed(0)
    args = _random_case(g, d=12, v_dim=8 if mla else None, sink=not mla)
    ref_out, ref_lse = ref_impl.sparse_attention(*args)
    out, lse = impl.sparse_attention(*args)
    torch.testing.assert_close(out, ref_out)
    torch.testing.assert_close(lse, ref_lse)


@pytest.mark.parametrize("mla", [False, True])
def test_cpu_fast_all_rows_and_gathered_forms_agree(mla, monkeypatch):
    """cpu_fast scores every row with two GEMMs when the KV rows are few per pick (a prompt) and
    gathers the picked rows otherwise (decode); both equal the reference, with -1 holes,
    duplicated picks, rows without any entry, a sink and v_dim < D, also in tiny query chunks."""
    g = torch.Generator().manual_seed(3)
    q, kv, idx, scale, sink, v_dim = _random_case(g, s=6, n=9, k=11, d=12, v_dim=8 if mla else None, sink=not mla)
    idx[0, 0] = -1
    idx[1, 2, :4] = 5
    ref = ref_impl.sparse_attention(q, kv, idx, scale, sink, v_dim)
    for factor in (0, 100):  # gathered only / all rows only
        monkeypatch.setattr(fast_impl, "DENSE_ROWS_PER_PICK", factor)
        for chunk in (fast_impl.CPU_CHUNK, 1):
            torch.testing.assert_close(fast_impl.sparse_attention(q, kv, idx, scale, sink, v_dim, chunk), ref)


IMPLS_ALL = [ref_impl, fast_impl, cuda_impl, ms_impl]
IMPL_IDS = ["cpu", "cpu_fast", "cuda code path exercised on CPU", "mindspore"]


@pytest.mark.parametrize("impl", IMPLS_ALL, ids=IMPL_IDS)
@pytest.mark.parametrize("s,n", [(1, 40), (6, 9)], ids=["decode (gathered rows)", "prompt (rows few per pick)"])
def test_rows_no_query_picks_do_not_reach_the_result(impl, s, n):
    """NaN / Inf in KV rows that no index names (row 0 among them, which -1 slots must not read)
    change nothing: the result equals the one over a cache where those rows are finite."""
    g = torch.Generator().manual_seed(7)
    q, kv, idx, scale, sink, v_dim = _random_case(g, s=s, n=n, k=5, d=12, v_dim=8)
    idx = torch.where(idx > 0, idx.remainder(n - 3) + 1, -1)  # rows 1 .. n-3 only
    idx[:, :, 1] = -1
    clean_out, clean_lse = ref_impl.sparse_attention(q, kv, idx, scale, sink, v_dim)
    bad = kv.clone()
    bad[:, 0], bad[0, n - 2, 3], bad[1, n - 1, 0] = float("nan"), float("inf"), float("-inf")
    out, lse = impl.sparse_attention(q, bad, idx, scale, sink, v_dim)
    torch.testing.assert_close(out, clean_out)
    torch.testing.assert_close(lse, clean_lse)
    window_clean = impl.window_attention(q, kv, 3, scale, sink)
    bad = kv.clone()
    bad[:, : n - s - 2] = float("nan")  # older than every query's window of 3
    torch.testing.assert_close(impl.window_attention(q, bad, 3, scale, sink), window_clean)


def test_chunk_size_does_not_change_results():
    """A device's chunks (DEVICE_CHUNK, what cuda and ascend inherit) hold more queries than the
    CPU's; neither size changes the output."""
    g = torch.Generator().manual_seed(1)
    args = _random_case(g, s=9)
    whole = fast_impl.sparse_attention(*args, chunk_elems=fast_impl.DEVICE_CHUNK)
    tiny_chunks = fast_impl.sparse_attention(*args, chunk_elems=1)
    torch.testing.assert_close(tiny_chunks, whole)


@settings(max_examples=25, deadline=None)
@given(st.integers(1, 3), st.integers(1, 4), st.integers(1, 9), st.integers(1, 6), st.integers(0, 2**16))
def test_equals_softmax_over_the_selected_set_and_ignores_order(h, s, n, k, seed):
    g = torch.Generator().manual_seed(seed)
    q, kv, idx, scale, sink, v = _random_case(g, b=1, s=s, n=n, h=h, d=4, k=k)
    out = ops.sparse_attention(q, kv, idx, scale, sink=sink)
    perm = torch.randperm(k, generator=g)
    torch.testing.assert_close(ops.sparse_attention(q, kv, idx[..., perm], scale, sink=sink), out)
    for si in range(s):
        sel = idx[0, si][idx[0, si] >= 0]
        logits = scale * q[0, si] @ kv[0, sel].T  # [H, k']
        full = torch.cat([logits, sink.view(h, 1)], -1).softmax(-1)[:, :-1]
        torch.testing.assert_close(out[0, si], full @ kv[0, sel])


def test_window_indices_hand_checked():
    pos = torch.tensor([[3, 4, 5]])
    got = ops.window_indices(pos, 3, start=2)
    assert got.tolist() == [[[-1, 0, 1], [0, 1, 2], [1, 2, 3]]]
    assert got.dtype == torch.int32


def test_window_plus_sparse_equals_dense_sliding_attention():
    """Window indices into raw rows reproduce a banded causal attention with a sink."""
    g = torch.Generator().manual_seed(2)
    s, h, d, w = 10, 2, 4, 3
    q, kv, sink = torch.randn(1, s, h, d, generator=g, dtype=D64), torch.randn(1, s, d, generator=g, dtype=D64), \
        torch.randn(h, generator=g, dtype=D64)
    out = ops.sparse_attention(q, kv, ops.window_indices(torch.arange(s).view(1, s), w, 0), 0.7, sink=sink)
    i = torch.arange(s)
    band = (i.view(-1, 1) - i.view(1, -1) >= 0) & (i.view(-1, 1) - i.view(1, -1) < w)
    logits = 0.7 * torch.einsum("shd,td->hst", q[0], kv[0]).masked_fill(~band, float("-inf"))
    p = torch.cat([logits, sink.view(h, 1, 1).expand(h, s, 1)], -1).softmax(-1)[..., :-1]
    torch.testing.assert_close(out[0], torch.einsum("hst,td->shd", p, kv[0]))


@pytest.mark.parametrize("impl", [ref_impl, fast_impl, cuda_impl, ms_impl],
                         ids=["cpu", "cpu_fast", "cuda code path exercised on CPU", "mindspore"])
@pytest.mark.parametrize("s,n", [(5, 9), (1, 3), (4, 4)])
def test_window_attention_equals_sparse_attention_over_window_indices(impl, s, n):
    g = torch.Generator().manual_seed(4)
    q, kv, sink = (torch.randn(2, s, 3, 8, generator=g, dtype=D64), torch.randn(2, n, 8, generator=g, dtype=D64),
                   torch.randn(3, generator=g, dtype=D64))
    idx = ops.window_indices((n - s + torch.arange(s)).view(1, s).expand(2, -1), 4, 0)
    want = ref_impl.sparse_attention(q, kv, idx, 0.3, sink, 8)
    got = impl.window_attention(q, kv, 4, 0.3, sink)
    torch.testing.assert_close(got[0], want[0])
    torch.testing.assert_close(got[1], want[1])


def _raises(fn, op, arg):
    with pytest.raises(OpInputError) as e:
        fn()
    assert e.value.op == op and e.value.arg == arg, str(e.value)
    assert op in str(e.value) and arg in str(e.value)
    return str(e.value)


def test_bad_input_is_named():
    q, kv = torch.randn(1, 2, 3, 8), torch.randn(1, 5, 8)
    idx = torch.zeros(1, 2, 4, dtype=torch.int32)
    sa = ops.sparse_attention
    msg = _raises(lambda: sa(q, kv, idx + 5, 1.0), "sparse_attention", "indices")
    assert "[-1, 4]" in msg
    _raises(lambda: sa(q, kv, idx - 2, 1.0), "sparse_attention", "indices")
    _raises(lambda: sa(q, kv.unsqueeze(2), idx, 1.0), "sparse_attention", "kv")  # BSND kv: wrong layout
    _raises(lambda: sa(q, torch.randn(1, 5, 6), idx, 1.0), "sparse_attention", "kv")  # head dims differ
    _raises(lambda: sa(q, kv, idx.float(), 1.0), "sparse_attention", "indices")
    _raises(lambda: sa(q, kv, idx[:, :1], 1.0), "sparse_attention", "indices")
    _raises(lambda: sa(q, kv, idx, 1.0, sink=torch.zeros(2)), "sparse_attention", "sink")
    _raises(lambda: sa(q, kv, idx, 1.0, v_dim=9), "sparse_attention", "v_dim")
    _raises(lambda: sa(q, kv, idx, -1.0), "sparse_attention", "scale")
    _raises(lambda: sa(q, kv[:, :0], idx, 1.0), "sparse_attention", "kv")  # empty cache
    _raises(lambda: ops.window_indices(torch.tensor([[1]]), 4, start=2), "window_indices", "positions")
    wa = ops.window_attention
    _raises(lambda: wa(q, kv[:, :1], 4, 1.0), "window_attention", "kv")  # fewer rows than queries
    _raises(lambda: wa(q, torch.randn(1, 5, 6), 4, 1.0), "window_attention", "kv")  # head dims differ
    _raises(lambda: wa(q, kv, 0, 1.0), "window_attention", "window")
    _raises(lambda: wa(q, kv, 4, 1.0, sink=torch.zeros(4)), "window_attention", "sink")


def test_contract_runs_on_every_cpu_backend():
    g = torch.Generator().manual_seed(3)
    q, kv, idx, scale, sink, _ = _random_case(g)
    outs = {}
    for backend in ("cpu", "cpu_fast", "mindspore"):
        with registry.forced(backend):
            outs[backend] = ops.sparse_attention(q, kv, idx, scale, sink=sink)
    torch.testing.assert_close(outs["cpu_fast"], outs["cpu"])
    torch.testing.assert_close(outs["mindspore"], outs["cpu"])
