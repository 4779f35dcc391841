"""mHC contracts: transformers' DeepseekV4HyperConnection / DeepseekV4HyperHead reproduced on the
same weights by every backend, hand-checked cases, the Ascend kernels' documented argument
meanings (with a stand-in torch_npu), and bad input."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from transformers import DeepseekV4Config
from transformers.models.deepseek_v4.modeling_deepseek_v4 import DeepseekV4HyperConnection, DeepseekV4HyperHead

from v4hal import ops
from v4hal.backends import ascend, registry
from v4hal.backends.ascend import mhc as ascend_mhc
from v4hal.backends.cpu_fast import mhc as fast_mhc
from v4hal.model.hyper import HyperConnection, HyperHead, expand_streams
from v4hal.ops._check import OpInputError

BACKENDS = ["cpu", "cpu_fast", "mindspore"]
D, N = 64, 4


def _config(d=D, n=N):
    return DeepseekV4Config(hidden_size=d, hc_mult=n, hc_sinkhorn_iters=20, hc_eps=1e-6, rms_norm_eps=1e-6)


def _pair(d=D, n=N, seed=0):
    torch.manual_seed(seed)
    ref = DeepseekV4HyperConnection(_config(d, n))
    with torch.no_grad():
        ref.fn.normal_(0.0, 0.3)
        ref.base.normal_(0.0, 0.5)
        ref.scale.uniform_(0.5, 1.5)
    ours = HyperConnection(d, n, 20, 1e-6, 1e-6)
    ours.load_state_dict(ref.state_dict())
    return ref, ours


def _head_pair(d=D, n=N):
    torch.manual_seed(1)
    ref = DeepseekV4HyperHead(_config(d, n))
    with torch.no_grad():
        ref.hc_fn.normal_(0.0, 0.3)
        ref.hc_base.normal_(0.0, 0.5)
        ref.hc_scale.fill_(1.25)
    ours = HyperHead(d, n, 1e-6, 1e-6)
    ours.load_state_dict(ref.state_dict())
    return ref, ours


def _transformers_post(post, comb, out, streams):
    dtype = streams.dtype
    return post.to(dtype).unsqueeze(-1) * out.unsqueeze(-2) + torch.matmul(comb.to(dtype).transpose(-1, -2), streams)


def test_parameter_names_are_transformers_names():
    ref, ours = _pair()
    assert set(ours.state_dict()) == set(ref.state_dict()) == {"fn", "base", "scale"}
    href, hours = _head_pair()
    assert set(hours.state_dict()) == set(href.state_dict()) == {"hc_fn", "hc_base", "hc_scale"}
    assert ours.fn.dtype == torch.float32 and tuple(ours.fn.shape) == (24, 4 * D)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_hyper_connection_reproduces_transformers(backend, dtype):
    ref, ours = _pair()
    g = torch.Generator().manual_seed(2)
    streams = torch.randn(2, 5, N, D, generator=g).to(dtype)
    out = torch.randn(2, 5, D, generator=g).to(dtype)
    with torch.no_grad():
        post_ref, comb_ref, collapsed_ref = ref(streams)
        new_ref = _transformers_post(post_ref, comb_ref, out, streams)
        with registry.forced(backend):
            collapsed, post, comb = ours(streams)
            new = ours.expand(out, streams, post, comb)
    assert collapsed.dtype == new.dtype == dtype and post.dtype == comb.dtype == torch.float32
    torch.testing.assert_close(post, post_ref, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(comb, comb_ref, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(collapsed, collapsed_ref, **({} if dtype == torch.float32 else dict(rtol=1.6e-2, atol=1e-2)))
    # transformers rounds post/comb to bf16 before mixing; we mix in float32 and round once.
    torch.testing.assert_close(new, new_ref, **(dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=1.6e-2, atol=4e-2)))


@pytest.mark.parametrize("backend", BACKENDS)
def test_hyper_head_reproduces_transformers(backend):
    ref, ours = _head_pair()
    x = torch.randn(3, 7, N, D)
    with torch.no_grad(), registry.forced(backend):
        torch.testing.assert_close(ours(x), ref(x), rtol=1e-5, atol=1e-5)


def test_one_pass_device_path_exercised_on_cpu_reproduces_transformers():
    """block=None: all tokens in one pass, what cuda and ascend (unfused) run on a device."""
    ref, ours = _pair()
    href, hours = _head_pair()
    streams, out = torch.randn(1, 4, N, D), torch.randn(1, 4, D)  # transformers takes [B, S, n, D]
    with torch.no_grad():
        post_ref, comb_ref, collapsed_ref = ref(streams)
        collapsed, post, comb = fast_mhc.hc_pre(streams, ours.fn, ours.scale, ours.base, 1e-6, 1e-6, 20, block=None)
        torch.testing.assert_close((collapsed, post, comb), (collapsed_ref, post_ref, comb_ref), rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(fast_mhc.hc_post(out, streams, post, comb, block=None),
                                   _transformers_post(post_ref, comb_ref, out, streams), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(fast_mhc.hc_head(streams, hours.hc_fn, hours.hc_scale, hours.hc_base, 1e-6, 1e-6, block=None),
                                   href(streams), rtol=1e-5, atol=1e-5)


def test_two_sites_of_a_layer_match_transformers_in_sequence():
    """A decoder layer's mHC plumbing (attn_hc, then ffn_hc, with stand-in sub-layers) over the
    streams a model starts from (the embedding copied into every stream)."""
    (ra, oa), (rf, of) = _pair(seed=3), _pair(seed=4)
    emb = torch.randn(2, 6, D)
    sub_a, sub_f = torch.nn.Linear(D, D), torch.nn.Linear(D, D)
    with torch.no_grad():
        s_ref = emb.unsqueeze(2).expand(-1, -1, N, -1).contiguous()
        s = expand_streams(emb, N)
        for ref, ours, sub in ((ra, oa, sub_a), (rf, of, sub_f)):
            post, comb, col = ref(s_ref)
            s_ref = _transformers_post(post, comb, sub(col), s_ref)
            col, post, comb = ours(s)
            s = ours.expand(sub(col), s, post, comb)
    torch.testing.assert_close(s, s_ref, rtol=1e-5, atol=1e-5)


def test_zero_projection_by_hand():
    """fn = 0 and base = 0: pre = 1/2 + eps for every stream, post = 2 * 1/2 = 1, comb uniform."""
    x = torch.arange(2 * 3 * 4 * 2, dtype=torch.float64).reshape(2, 3, 4, 2) / 10
    eps = 1e-6
    layer_input, post, comb = ops.hc_pre(x, torch.zeros(24, 8, dtype=torch.float64), torch.ones(3, dtype=torch.float64),
                                         torch.zeros(24, dtype=torch.float64), hc_eps=eps)
    torch.testing.assert_close(layer_input, (0.5 + eps) * x.sum(-2), rtol=1e-15, atol=0)
    torch.testing.assert_close(post, torch.ones(2, 3, 4, dtype=torch.float64), rtol=0, atol=0)
    torch.testing.assert_close(comb, torch.full((2, 3, 4, 4), 0.25, dtype=torch.float64), rtol=0, atol=1e-5)


def test_hc_post_by_hand():
    """new_j = post_j * out + sum_i comb[i, j] x_i, worked out for one token with n = 2."""
    x = torch.tensor([[[1.0, 2.0], [10.0, 20.0]]], dtype=torch.float64)
    out = torch.tensor([[100.0, 200.0]], dtype=torch.float64)
    post = torch.tensor([[0.5, 2.0]], dtype=torch.float64)
    comb = torch.tensor([[[0.75, 0.25], [0.25, 0.75]]], dtype=torch.float64)
    expected = torch.tensor([[[50 + 0.75 * 1 + 0.25 * 10, 100 + 0.75 * 2 + 0.25 * 20],
                              [200 + 0.25 * 1 + 0.75 * 10, 400 + 0.25 * 2 + 0.75 * 20]]], dtype=torch.float64)
    for backend in BACKENDS:
        with registry.forced(backend):
            torch.testing.assert_close(ops.hc_post(out, x, post, comb), expected, rtol=1e-15, atol=0)


@settings(max_examples=15, deadline=None)
@given(n=st.integers(1, 6), d=st.integers(1, 24), tokens=st.integers(1, 5), seed=st.integers(0, 999))
def test_fast_path_equals_reference_in_float64(n, d, tokens, seed):
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64)  # noqa: E731
    x, rows = r(tokens, n, d), (2 + n) * n
    args = (x, r(rows, n * d), r(3), r(rows))
    out = r(tokens, d)
    with registry.forced("cpu"):
        ref = ops.hc_pre(*args)
        ref_post = ops.hc_post(out, x, ref[1], ref[2])
        ref_head = ops.hc_head(x, r(n, n * d).clone(), torch.ones(1, dtype=torch.float64), torch.zeros(n, dtype=torch.float64))
    g.manual_seed(seed)  # same head weights again
    r(tokens, n, d), r(rows, n * d), r(3), r(rows), r(tokens, d)
    head_fn = r(n, n * d)
    with registry.forced("cpu_fast"):
        fast = ops.hc_pre(*args)
        torch.testing.assert_close(fast, ref, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(ops.hc_post(out, x, ref[1], ref[2]), ref_post, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(ops.hc_head(x, head_fn, torch.ones(1, dtype=torch.float64), torch.zeros(n, dtype=torch.float64)),
                                   ref_head, rtol=1e-12, atol=1e-12)


def test_fast_path_over_several_token_blocks_equals_reference():
    """130 tokens: two full cpu_fast blocks of 64 and a ragged one, with a batch axis."""
    g = torch.Generator().manual_seed(5)
    r = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64)  # noqa: E731
    x, out = r(2, 65, 4, 16), r(2, 65, 16)
    fn, scale, base, head_fn = r(24, 64), r(3), r(24), r(4, 64)
    results = {}
    for backend in ("cpu", "cpu_fast"):
        with registry.forced(backend):
            pre = ops.hc_pre(x, fn, scale, base)
            results[backend] = (*pre, ops.hc_post(out, x, pre[1], pre[2]), ops.hc_head(x, head_fn, scale[:1], base[:4]))
    torch.testing.assert_close(results["cpu_fast"], results["cpu"], rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("lead", [(1, 1), (2, 1), (1, 4), (1, 5)])
def test_decode_sized_scalar_path_equals_reference_in_float32(lead):
    """A few tokens take cpu_fast's Python-float path (5 tokens take the tensor path): float32
    results within float32 rounding of the reference, same shapes and dtypes."""
    g = torch.Generator().manual_seed(sum(lead))
    r = lambda *s: torch.randn(*s, generator=g)  # noqa: E731
    x, out = r(*lead, 4, 32), r(*lead, 32)
    fn, scale, base, head_fn = r(24, 128), r(3).abs() + 0.5, r(24), r(4, 128)
    assert fast_mhc._few(x) == (lead[0] * lead[1] <= fast_mhc.SCALAR_TOKENS)
    results = {}
    for backend in ("cpu", "cpu_fast"):
        with registry.forced(backend):
            pre = ops.hc_pre(x, fn, scale, base)
            results[backend] = (*pre, ops.hc_post(out, x, pre[1], pre[2]), ops.hc_head(x, head_fn, scale[:1], base[:4]),
                                ops.sinkhorn(pre[2].log()))
    for fast, ref in zip(results["cpu_fast"], results["cpu"]):
        assert fast.dtype == ref.dtype == torch.float32
        torch.testing.assert_close(fast, ref, rtol=1e-4, atol=1e-5)


# A stand-in for torch_npu's three mHC kernels, written from their documentation (the wheel's
# _op_plugin_docs.py and CANN's aclnnMhcPre / aclnnMhcSinkhorn / aclnnMhcPost pages): keyword-only
# parameters and dtype rules as documented, so a wrong call fails here as it would on the NPU.
class FakeNpu:
    def __init__(self):
        self.calls = []

    def npu_mhc_pre(self, x, phi, alpha, bias, *, gamma=None, norm_eps=1e-6, hc_eps=1e-6, out_flag=0, inner_precise=0):
        self.calls.append("npu_mhc_pre")
        assert x.dtype in (torch.bfloat16, torch.float16) and x.dim() in (3, 4)
        assert phi.dtype == alpha.dtype == bias.dtype == torch.float32 and gamma is None
        n = x.shape[-2]
        flat = x.flatten(-2).float()
        inv_rms = (flat.square().mean(-1) + norm_eps).rsqrt()
        w = (flat @ phi.T) * inv_rms.unsqueeze(-1)
        h_pre = torch.sigmoid(w[..., :n] * alpha[0] + bias[:n]) + hc_eps
        h_post = 2 * torch.sigmoid(w[..., n:2 * n] * alpha[1] + bias[n:2 * n])
        if alpha.numel() == 2:
            h_post = h_post + hc_eps
            h_res = torch.zeros(*w.shape[:-1], n, n)
        else:
            h_res = (w[..., 2 * n:] * alpha[2] + bias[2 * n:]).unflatten(-1, (n, n))
        h_in = (h_pre.unsqueeze(-1) * x.float()).sum(-2).to(x.dtype)
        return h_in, h_post, h_res, inv_rms, w / inv_rms.unsqueeze(-1), h_pre

    def npu_mhc_sinkhorn(self, x, *, eps=1e-6, num_iters=20, out_flag=0):
        self.calls.append("npu_mhc_sinkhorn")
        assert x.dtype == torch.float32 and x.shape[-1] in (4, 6, 8) and 1 <= num_iters <= 100
        y = torch.softmax(x, -1) + eps
        y = y / (y.sum(-2, keepdim=True) + eps)
        for _ in range(num_iters - 1):
            y = y / (y.sum(-1, keepdim=True) + eps)
            y = y / (y.sum(-2, keepdim=True) + eps)
        return y, x.new_empty(0), x.new_empty(0)

    def npu_mhc_post(self, x, h_res, h_out, h_post):
        self.calls.append("npu_mhc_post")
        assert x.dtype == h_out.dtype and h_res.dtype == h_post.dtype == torch.float32
        y = h_res.transpose(-1, -2) @ x.float() + h_out.float().unsqueeze(-2) * h_post.unsqueeze(-1)
        return y.to(x.dtype)


@pytest.fixture
def fake_a5(monkeypatch):
    fake = FakeNpu()
    monkeypatch.setattr(ascend, "_npu", fake)
    monkeypatch.setenv("V4HAL_ASCEND_CHIP", "A5")
    return fake


def test_ascend_kernels_called_with_documented_meanings(fake_a5):
    ref, ours = _pair()
    href, hours = _head_pair()
    streams, out = torch.randn(1, 3, N, D).bfloat16(), torch.randn(1, 3, D).bfloat16()
    with torch.no_grad():
        post_ref, comb_ref, collapsed_ref = ref(streams)
        collapsed, post, comb = ascend_mhc.hc_pre(streams, ours.fn, ours.scale, ours.base, 1e-6, 1e-6, 20)
        new = ascend_mhc.hc_post(out, streams, post, comb)
        head = ascend_mhc.hc_head(streams, hours.hc_fn, hours.hc_scale, hours.hc_base, 1e-6, 1e-6)
        head_ref = href(streams)
    assert fake_a5.calls == ["npu_mhc_pre", "npu_mhc_sinkhorn", "npu_mhc_post", "npu_mhc_pre"]
    torch.testing.assert_close((post, comb), (post_ref, comb_ref), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(collapsed, collapsed_ref, rtol=1.6e-2, atol=1e-2)
    torch.testing.assert_close(new, _transformers_post(post_ref, comb_ref, out, streams), rtol=1.6e-2, atol=4e-2)
    torch.testing.assert_close(head, head_ref, rtol=1.6e-2, atol=1e-2)


def test_ascend_takes_the_torch_path_where_the_kernels_do_not_apply(fake_a5, monkeypatch):
    _, ours = _pair()
    streams = torch.randn(3, N, D)  # float32 streams: the fused kernels take bf16/fp16 only
    ascend_mhc.hc_pre(streams, ours.fn, ours.scale, ours.base, 1e-6, 1e-6, 20)
    assert fake_a5.calls == ["npu_mhc_sinkhorn"]  # the comb logits are float32, which it takes
    monkeypatch.setenv("V4HAL_ASCEND_CHIP", "A2")  # the pinned wheel documents them for A5 only
    ascend_mhc.hc_pre(streams.bfloat16(), ours.fn, ours.scale, ours.base, 1e-6, 1e-6, 20)
    assert fake_a5.calls == ["npu_mhc_sinkhorn"]


def _not_contiguous(t, kind):
    """The same values in a non-contiguous layout: every axis reversed in memory, or every other
    element of a twice-as-wide buffer along the last axis."""
    if kind == "transposed":
        return t.permute(*reversed(range(t.dim()))).contiguous().permute(*reversed(range(t.dim())))
    wide = torch.zeros(*t.shape[:-1], 2 * t.shape[-1], dtype=t.dtype)
    wide[..., ::2] = t
    return wide[..., ::2]


@pytest.mark.parametrize("kind", ["transposed", "stepped"])
@pytest.mark.parametrize("tokens", [2, 70], ids=["decode-sized", "blocks"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_non_contiguous_inputs_give_the_contiguous_result(backend, tokens, kind):
    g = torch.Generator().manual_seed(8)
    x = torch.randn(tokens, N, D, generator=g)
    fn, base = torch.randn(24, N * D, generator=g) * 0.1, torch.randn(24, generator=g) * 0.5
    scale, head_fn = torch.rand(3, generator=g) + 0.5, torch.randn(N, N * D, generator=g) * 0.1
    out = torch.randn(tokens, D, generator=g)
    odd = {name: _not_contiguous(t, kind) for name, t in dict(x=x, fn=fn, base=base, head_fn=head_fn, out=out).items()}
    assert not odd["x"].is_contiguous()
    with registry.forced(backend):
        want = ops.hc_pre(x, fn, scale, base)
        got = ops.hc_pre(odd["x"], odd["fn"], scale, odd["base"])
        for a, b in zip(got, want):
            torch.testing.assert_close(a, b)
        post, comb = want[1], want[2]
        torch.testing.assert_close(ops.hc_post(odd["out"], odd["x"], _not_contiguous(post, kind),
                                               _not_contiguous(comb, kind)), ops.hc_post(out, x, post, comb))
        torch.testing.assert_close(ops.hc_head(odd["x"], odd["head_fn"], scale[:1], odd["base"][:N]),
                                   ops.hc_head(x, head_fn, scale[:1], base[:N]))
        logits = torch.randn(tokens, N, N, generator=g)
        torch.testing.assert_close(ops.sinkhorn(_not_contiguous(logits, kind)), ops.sinkhorn(logits))


def test_stream_count_mismatch():
    _, ours = _pair()
    with pytest.raises(OpInputError, match=r"hc_pre: argument 'fn' expected 192 columns .*stream count"):
        ops.hc_pre(torch.randn(2, 3, D), ours.fn, ours.scale, ours.base)
    with pytest.raises(OpInputError, match=r"hc_pre: argument 'fn' expected 15 rows for 3 streams"):
        ops.hc_pre(torch.randn(2, 3, D), torch.zeros(24, 3 * D), ours.scale, ours.base)
    with pytest.raises(OpInputError, match=r"hc_post: argument 'comb' expected shape \(2, 4, 4\)"):
        ops.hc_post(torch.randn(2, D), torch.randn(2, 4, D), torch.ones(2, 4), torch.ones(2, 3, 3))
    with pytest.raises(OpInputError, match=r"hc_post: argument 'post' expected shape \(2, 4\)"):
        ops.hc_post(torch.randn(2, D), torch.randn(2, 4, D), torch.ones(2, 6), torch.ones(2, 4, 4))
    with pytest.raises(OpInputError, match=r"hc_head: argument 'fn' expected 4 rows"):
        ops.hc_head(torch.randn(2, 4, D), torch.zeros(24, 4 * D), torch.ones(1), torch.zeros(4))


def test_non_finite_mixes():
    _, ours = _pair()
    x = torch.randn(2, 4, D)
    x[1, 2, 5] = float("inf")
    with pytest.raises(OpInputError, match=r"hc_pre: argument 'x' expected finite values \(the mHC mixes"):
        ops.hc_pre(x, ours.fn, ours.scale, ours.base)
    post = torch.ones(2, 4)
    post[0, 1] = float("nan")
    with pytest.raises(OpInputError, match=r"hc_post: argument 'post' expected finite values"):
        ops.hc_post(torch.randn(2, D), torch.randn(2, 4, D), post, torch.ones(2, 4, 4))
    with pytest.raises(OpInputError, match=r"hc_pre: argument 'fn' expected finite values"):
        ops.hc_pre(torch.randn(2, 4, D), ours.fn.detach() * float("nan"), ours.scale, ours.base)
    with pytest.raises(OpInputError, match=r"hc_head: argument 'x' expected finite values"):
        ops.hc_head(x, torch.zeros(4, 4 * D), torch.ones(1), torch.zeros(4))


def test_other_bad_input():
    _, ours = _pair()
    with pytest.raises(OpInputError, match=r"hc_pre: argument 'x' expected a 3 or 4-d tensor"):
        ops.hc_pre(torch.randn(4, D), ours.fn, ours.scale, ours.base)
    with pytest.raises(OpInputError, match=r"hc_pre: argument 'hc_eps' expected a positive float"):
        ops.hc_pre(torch.randn(2, 4, D), ours.fn, ours.scale, ours.base, hc_eps=-1.0)
    with pytest.raises(OpInputError, match=r"hc_pre: argument 'iters' expected at most 100, got 1000000000"):
        ops.hc_pre(torch.randn(2, 4, D), ours.fn, ours.scale, ours.base, iters=10**9)
    with pytest.raises(OpInputError, match=r"hc_pre: argument 'scale' expected shape \(3,\)"):
        ops.hc_pre(torch.randn(2, 4, D), ours.fn, torch.ones(1), ours.base)
    with pytest.raises(OpInputError, match=r"hc_post: argument 'out' expected shape \(2, 64\)"):
        ops.hc_post(torch.randn(2, D + 1), torch.randn(2, 4, D), torch.ones(2, 4), torch.ones(2, 4, 4))
