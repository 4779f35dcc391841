"""kv_compress: hand-checked pooling, the overlapping CSA variant, incremental (decode) use with
the open window carried in state equal to one-shot use, transformers' compressors on the same
weights, backend agreement (the cuda code path exercised on CPU), and bad input."""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from transformers.models.deepseek_v4.modeling_deepseek_v4 import DeepseekV4HCACompressor

from v4hal import ops
from v4hal.backends.cpu import attention as ref_impl
from v4hal.backends.mindspore import attention as ms_impl
from v4hal.bench.attention_layers import TINY_V4, v4_config, v4_pair
from v4hal.model.attention_v4 import V4Compressor
from v4hal.ops._check import OpInputError
from v4hal.backends import registry

cuda_impl = registry.family_view("cuda", "attention")

D64 = torch.float64


def test_plain_pooling_hand_checked():
    # ratio 2, one channel: gates 0 and log 3 -> weights 1/4, 3/4; RMSNorm of one value is its sign.
    kv = torch.tensor([[[2.0], [6.0], [1.0]]], dtype=D64)
    gate = torch.tensor([[[0.0], [math.log(3)], [0.0]]], dtype=D64)
    out, state = ops.kv_compress(kv, gate, torch.zeros(2, 1, dtype=D64), torch.tensor([5.0], dtype=D64), 2, eps=1e-12)
    assert out.shape == (1, 1, 1) and out.item() == pytest.approx(5.0)  # 0.25*2 + 0.75*6 = 5 > 0 -> 1 * weight 5
    assert state.emitted == 1 and state.kv.shape == (1, 1, 1) and state.kv.item() == 1.0


def test_overlap_pools_previous_series_a_with_current_series_b():
    d, r = 2, 2
    kv = torch.arange(16, dtype=D64).view(1, 4, 4)  # two windows of 2 tokens, channels [a0 a1 b0 b1]
    zero = torch.zeros(1, 4, 4, dtype=D64)
    out, state = ops.kv_compress(kv, zero, torch.zeros(r, 2 * d, dtype=D64), torch.ones(d, dtype=D64), r,
                                 overlap=True, eps=0.0)
    raw = []
    raw.append(kv[0, 0:2, 2:].mean(0))  # window 0: no previous window, its series b only
    raw.append(torch.cat([kv[0, 0:2, :2], kv[0, 2:4, 2:]]).mean(0))  # window 1: a of window 0 + b of window 1
    want = torch.stack([v / v.pow(2).mean().sqrt() for v in raw])
    torch.testing.assert_close(out[0], want)
    torch.testing.assert_close(state.prev_kv[0], kv[0, 2:4, :2])


@settings(max_examples=20, deadline=None)
@given(st.booleans(), st.integers(1, 5), st.lists(st.integers(0, 7), min_size=1, max_size=5), st.integers(0, 2**16))
def test_incremental_equals_one_shot(overlap, ratio, splits, seed):
    g = torch.Generator().manual_seed(seed)
    n, d = sum(splits), 3
    c = 2 * d if overlap else d
    kv, gate = torch.randn(2, n, c, generator=g, dtype=D64), torch.randn(2, n, c, generator=g, dtype=D64)
    bias, w = torch.randn(ratio, c, generator=g, dtype=D64), torch.randn(d, generator=g, dtype=D64)
    whole, _ = ops.kv_compress(kv, gate, bias, w, ratio, overlap=overlap)
    parts, state, at = [], None, 0
    for step in splits:
        out, state = ops.kv_compress(kv[:, at:at + step], gate[:, at:at + step], bias, w, ratio, overlap=overlap,
                                     state=state)
        parts.append(out)
        at += step
    torch.testing.assert_close(torch.cat(parts, 1), whole)
    assert state.emitted == n // ratio and state.kv.shape[1] == n % ratio


@pytest.mark.parametrize("impl", [cuda_impl, ms_impl], ids=["cuda code path exercised on CPU", "mindspore"])
@pytest.mark.parametrize("overlap", [False, True])
def test_implementations_agree_with_the_reference(impl, overlap):
    g = torch.Generator().manual_seed(0)
    r, d = 4, 6
    c = 2 * d if overlap else d
    args = (torch.randn(2, 3 * r, c, generator=g, dtype=D64), torch.randn(2, 3 * r, c, generator=g, dtype=D64),
            torch.randn(r, c, generator=g, dtype=D64), torch.randn(d, generator=g, dtype=D64), r, overlap, 1e-6,
            torch.randn(2, r, d, generator=g, dtype=D64) if overlap else None,
            torch.randn(2, r, d, generator=g, dtype=D64) if overlap else None)
    torch.testing.assert_close(impl.kv_compress(*args), ref_impl.kv_compress(*args))


def test_hca_compressor_matches_transformers():
    cfg = v4_config("heavily_compressed_attention", **TINY_V4)
    ref = DeepseekV4HCACompressor(cfg).double()
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in ref.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    ours = V4Compressor(cfg.hidden_size, cfg.head_dim, 8, False, cfg.rms_norm_eps).double()
    ours.load_state_dict(ref.state_dict())
    x = torch.randn(2, 19, cfg.hidden_size, generator=g, dtype=D64)  # two full windows + 3 tokens
    pos = torch.arange(19).view(1, -1).expand(2, -1)
    want, _ = ref(x, None, pos, None, 0)
    rope = v4_pair("heavily_compressed_attention", cfg)[0].c.rope_compress
    got, state = ours.entries(x, None, rope)
    torch.testing.assert_close(got, want.squeeze(1), rtol=1e-6, atol=1e-6)
    assert state.kv.shape[1] == 3


def _raises(fn, arg):
    with pytest.raises(OpInputError) as e:
        fn()
    assert e.value.op == "kv_compress" and e.value.arg == arg, str(e.value)
    assert "kv_compress" in str(e.value) and arg in str(e.value)


def test_bad_input_is_named():
    kv = torch.randn(1, 4, 6)
    bias, w = torch.zeros(2, 6), torch.ones(3)
    kc = ops.kv_compress
    _raises(lambda: kc(kv, kv[..., :5], bias, torch.ones(6), 2), "gate")
    _raises(lambda: kc(kv, kv, bias[:1], torch.ones(6), 2), "position_bias")  # bias rows != ratio
    _raises(lambda: kc(kv, kv, bias, w, 2), "norm_weight")  # plain variant: entry dim = channels
    _raises(lambda: kc(kv[..., :5], kv[..., :5], torch.zeros(2, 5), w, 2, overlap=True), "kv")  # odd channels
    _raises(lambda: kc(kv, kv, bias, torch.ones(6), 0), "ratio")
    _raises(lambda: kc(kv.unsqueeze(2), kv.unsqueeze(2), bias, torch.ones(6), 2), "kv")  # BSND: wrong layout
    state = ops.CompressState(torch.zeros(2, 1, 6), torch.zeros(2, 1, 6))
    _raises(lambda: kc(kv, kv, bias, torch.ones(6), 2, state=state), "state")  # batch mismatch
    _raises(lambda: kc(kv, kv, bias, torch.ones(6), 2, state="open window"), "state")
