"""Lightning indexer: scores (hand-checked and against transformers' scorer), top-k with
causality at compressed granularity and -1 slots, tie-aware judging, backend agreement (the cuda
code path exercised on CPU), and bad input."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from transformers.models.deepseek_v4.modeling_deepseek_v4 import DeepseekV4IndexerScorer

from v4hal import ops
from v4hal.backends import registry
from v4hal.backends.cpu import attention as ref_impl
from v4hal.backends.cpu_fast import attention as fast_impl
from v4hal.backends.mindspore import attention as ms_impl
from v4hal.bench.attention_layers import TINY_V4, v4_config
from v4hal.bench.cases_attention import topk_agrees
from v4hal.ops._check import OpInputError

cuda_impl = registry.family_view("cuda", "attention")

D64 = torch.float64
IMPLS = [fast_impl, cuda_impl, ms_impl]
IDS = ["cpu_fast", "cuda code path exercised on CPU", "mindspore"]


def test_scores_hand_checked():
    # Two heads; head 0 sees dot 2 (kept), head 1 sees dot -3 (relu'd away).
    q = torch.tensor([[[[1.0, 1.0], [-1.0, -2.0]]]], dtype=D64)  # [1, 1, 2, 2]
    k = torch.tensor([[[1.0, 1.0]]], dtype=D64)
    w = torch.tensor([[[0.5, 4.0]]], dtype=D64)
    assert ops.indexer_scores(q, k, w, 0.25).item() == pytest.approx(0.25 * 0.5 * 2)


def test_scores_match_transformers_scorer():
    cfg = v4_config("compressed_sparse_attention", **TINY_V4)
    scorer = DeepseekV4IndexerScorer(cfg).double()
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        scorer.weights_proj.weight.copy_(torch.randn(scorer.weights_proj.weight.shape, generator=g))
    x = torch.randn(2, 5, cfg.hidden_size, generator=g, dtype=D64)
    q = torch.randn(2, 5, cfg.index_n_heads, cfg.index_head_dim, generator=g, dtype=D64)
    k = torch.randn(2, 7, cfg.index_head_dim, generator=g, dtype=D64)
    ref = scorer(q, k, x)
    ours = ops.indexer_scores(q, k, x @ scorer.weights_proj.weight.T, (cfg.index_head_dim * cfg.index_n_heads) ** -0.5)
    torch.testing.assert_close(ours, ref.double(), rtol=1e-5, atol=1e-5)  # transformers scores in float32


def test_topk_causality_at_compressed_granularity():
    # ratio 4: entry t closes at token 4t+3. Query at position 6 sees entry 0 only; 7 sees 0 and 1.
    scores = torch.tensor([[[1.0, 9.0, 5.0], [1.0, 9.0, 5.0], [1.0, 9.0, 5.0]]])
    pos = torch.tensor([[2, 6, 7]])
    got = ops.indexer_topk(scores, 2, pos, ratio=4)
    assert got.tolist() == [[[-1, -1], [0, -1], [1, 0]]]
    assert got.dtype == torch.int32
    assert ops.indexer_topk(scores, 3).tolist()[0][0] == [1, 2, 0]  # no positions: all visible


@pytest.mark.parametrize("impl", IMPLS, ids=IDS)
def test_topk_and_select_agree_with_reference(impl):
    g = torch.Generator().manual_seed(1)
    b, s, t, h, d, ratio = 2, 9, 6, 4, 8, 4
    q, k, w = (torch.randn(b, s, h, d, generator=g, dtype=D64), torch.randn(b, t, d, generator=g, dtype=D64),
               torch.randn(b, s, h, generator=g, dtype=D64))
    pos = (torch.arange(s) + t * ratio - s).view(1, s).expand(b, -1)
    scores = ref_impl.indexer_scores(q, k, w, 0.3)
    torch.testing.assert_close(impl.indexer_scores(q, k, w, 0.3), scores)
    ref = ref_impl.indexer_topk(scores, 3, pos, ratio)
    for got in (impl.indexer_topk(scores, 3, pos, ratio), impl.indexer_select(q, k, w, 0.3, 3, pos, ratio)):
        ok, note = topk_agrees(ref, got, scores, 1e-9)
        assert ok, note


def test_tie_aware_judge_accepts_ties_and_rejects_wrong_picks():
    scores = torch.tensor([[[3.0, 2.0, 2.0, 1.0]]], dtype=D64)
    ref = torch.tensor([[[0, 1]]])
    assert topk_agrees(ref, torch.tensor([[[0, 2]]]), scores, 1e-9)[0]  # 2 ties with 1
    ok, note = topk_agrees(ref, torch.tensor([[[0, 3]]]), scores, 1e-9)
    assert not ok and "tie band" in note
    assert not topk_agrees(ref, torch.tensor([[[0, 0]]]), scores, 1e-9)[0]  # duplicate
    assert not topk_agrees(ref, torch.tensor([[[0, -1]]]), scores, 1e-9)[0]  # lost a visible slot
    assert not topk_agrees(torch.tensor([[[0, -1]]]), torch.tensor([[[-1, 0]]]), scores, 1e-9)[0]


@settings(max_examples=25, deadline=None)
@given(st.integers(1, 6), st.integers(1, 12), st.integers(1, 4), st.integers(0, 2**16))
def test_fast_topk_is_tie_aware_equal_on_tied_scores(s, t, ratio, seed):
    g = torch.Generator().manual_seed(seed)
    scores = torch.randint(0, 3, (1, s, t), generator=g).double()  # many exact ties
    k = int(torch.randint(1, t + 1, (1,), generator=g))
    pos = torch.randint(0, t * ratio + 2, (1, s), generator=g)
    ref = ref_impl.indexer_topk(scores, k, pos, ratio)
    ok, note = topk_agrees(ref, fast_impl.indexer_topk(scores, k, pos, ratio), scores, 1e-12)
    assert ok, note
    visible = ((pos + 1) // ratio).clamp(max=t)
    assert torch.equal((ref >= 0).sum(-1), visible.clamp(max=k))


def test_select_clamps_topk_to_entries_and_runs_on_every_backend():
    g = torch.Generator().manual_seed(2)
    q, k, w = torch.randn(1, 3, 2, 4, generator=g), torch.randn(1, 2, 4, generator=g), torch.randn(1, 3, 2, generator=g)
    outs = {}
    for backend in ("cpu", "cpu_fast", "mindspore"):
        with registry.forced(backend):
            outs[backend] = ops.indexer_select(q, k, w, 0.5, 512, torch.tensor([[5, 6, 7]]), 4)
    assert outs["cpu"].shape == (1, 3, 2)
    assert outs["cpu"][0, 0].tolist()[1] == -1  # position 5 sees only entry 0
    for backend in ("cpu_fast", "mindspore"):
        assert torch.equal(outs[backend], outs["cpu"])


@pytest.mark.parametrize("backend", ["cpu", "cpu_fast", "mindspore"])
def test_nan_scores_are_refused_by_every_backend(backend):
    """A NaN score has no rank (backends used to pick different indices among all-NaN scores):
    indexer_topk refuses it, and indexer_select refuses the NaN/Inf inputs that make one."""
    scores = torch.randn(1, 2, 6)
    scores[0, 1] = float("nan")
    q, k, w = torch.randn(1, 2, 3, 4), torch.randn(1, 5, 4), torch.randn(1, 2, 3)
    with registry.forced(backend):
        with pytest.raises(OpInputError, match=r"indexer_topk: argument 'scores' expected no NaN .* got 6 NaN"):
            ops.indexer_topk(scores, 3)
        with pytest.raises(OpInputError, match="indexer_topk: argument 'scores'"):
            ops.indexer_topk(scores, 3, torch.tensor([[1, 5]]), 1)
        for name, bad in (("q", q.clone()), ("k", k.clone()), ("weights", w.clone())):
            bad.view(-1)[0] = float("nan") if name != "weights" else float("inf")
            args = {"q": q, "k": k, "weights": w, name: bad}
            with pytest.raises(OpInputError, match=f"indexer_select: argument '{name}' expected finite values"):
                ops.indexer_select(args["q"], args["k"], args["weights"], 0.5, 3)


@pytest.mark.parametrize("backend", ["cpu_fast", "mindspore"])
def test_scores_propagate_nan_like_the_reference(backend):
    """NaN in a query head or a key row gives NaN scores where the reference has them (MindSpore's
    relu used to turn them into 0)."""
    g = torch.Generator().manual_seed(4)
    q, k, w = torch.randn(1, 3, 2, 4, generator=g), torch.randn(1, 5, 4, generator=g), torch.randn(1, 3, 2, generator=g)
    q[0, 0, 1, 2] = float("nan")
    k[0, 3, 0] = float("nan")
    with registry.forced("cpu"):
        ref = ops.indexer_scores(q, k, w, 0.5)
    with registry.forced(backend):
        out = ops.indexer_scores(q, k, w, 0.5)
    assert ref.isnan().sum() == 5 + 2  # query 0's row, and entry 3 for the other two queries
    torch.testing.assert_close(out, ref, equal_nan=True)


def _raises(fn, op, arg):
    with pytest.raises(OpInputError) as e:
        fn()
    assert e.value.op == op and e.value.arg == arg, str(e.value)
    assert op in str(e.value) and arg in str(e.value)


def test_bad_input_is_named():
    q, k, w = torch.randn(1, 2, 3, 4), torch.randn(1, 5, 4), torch.randn(1, 2, 3)
    _raises(lambda: ops.indexer_scores(q, torch.randn(1, 5, 6), w, 1.0), "indexer_scores", "k")  # head dims differ
    _raises(lambda: ops.indexer_scores(q, k.unsqueeze(2), w, 1.0), "indexer_scores", "k")  # BSND key: wrong layout
    _raises(lambda: ops.indexer_scores(q, k, w[..., :2], 1.0), "indexer_scores", "weights")
    _raises(lambda: ops.indexer_scores(q, k[:, :0], w, 1.0), "indexer_scores", "k")  # empty cache
    scores = torch.randn(1, 2, 5)
    _raises(lambda: ops.indexer_topk(scores, 6), "indexer_topk", "k")  # top-k larger than the entries
    _raises(lambda: ops.indexer_topk(scores, 2, torch.zeros(1, 3, dtype=torch.long)), "indexer_topk", "positions")
    _raises(lambda: ops.indexer_topk(scores, 2, torch.zeros(1, 2, dtype=torch.long), ratio=0), "indexer_topk", "ratio")
    _raises(lambda: ops.indexer_select(q, k, w, 1.0, 0), "indexer_select", "topk")
