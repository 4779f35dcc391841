"""The Ascend numerics emulator (v4hal.tools.ascend.emulator): each emulated op against a float64
statement of its documented math written here independently, the documented refusals, the
registry switch, and "flips": a deliberately wrong backend call that parity on the emulator catches."""

import pytest
import torch

from v4hal.backends import ascend, registry
from v4hal.bench import parity
from v4hal.bench.cases import parity_cases
from v4hal.tools.ascend.emulator import DeviceError, Emulator, NotEmulated, emulated_ops

from ascend_util import Flipped, answer_npu_with

A2, A3, A5 = Emulator("A2"), Emulator("A3"), Emulator("A5")
BF = torch.bfloat16


def g(seed=0):
    return torch.Generator().manual_seed(seed)


def rnd(*shape, dtype=torch.float32, seed=0):
    return torch.randn(*shape, generator=g(seed)).to(dtype)


def close(out, ref, dtype=BF):
    rtol = {BF: 1.6e-2, torch.float16: 2e-3, torch.float32: 1e-5}[dtype]
    torch.testing.assert_close(out.double(), ref.double(), rtol=rtol, atol=rtol * float(ref.abs().max()) / 8)


# ----------------------------------------------------------------------------------- basic / mHC

def test_rms_norm_matches_formula():
    x, w = rnd(3, 5, 64, dtype=BF), rnd(64, dtype=BF, seed=1)
    y, rstd = A3.npu_rms_norm(x, w, epsilon=1e-6)
    xd = x.double()
    ref = xd / torch.sqrt((xd * xd).mean(-1, keepdim=True) + 1e-6) * w.double()
    close(y, ref)
    assert y.dtype == BF and rstd.shape == (3, 5, 1) and rstd.dtype == torch.float32


def test_mhc_pre_sinkhorn_post_match_formulas():
    t, n, d = 3, 4, 32
    x = rnd(t, n, d, dtype=BF)
    phi, alpha, bias = rnd(n * n + 2 * n, n * d, seed=1) * 0.05, torch.tensor([0.7, 1.3, 0.4]), rnd(n * n + 2 * n, seed=2)
    h_in, h_post, h_res = A5.npu_mhc_pre(x, phi, alpha, bias, norm_eps=1e-6, hc_eps=1e-4)[:3]
    flat = x.double().reshape(t, n * d)
    mix = flat @ phi.double().t() / torch.sqrt((flat ** 2).mean(-1, keepdim=True) + 1e-6)
    pre = 1 / (1 + torch.exp(-(0.7 * mix[:, :n] + bias[:n].double()))) + 1e-4
    close(h_in, torch.einsum("ti,tid->td", pre, x.double()))
    close(h_post, 2 / (1 + torch.exp(-(1.3 * mix[:, n:2 * n] + bias[n:2 * n].double()))), torch.float32)
    close(h_res, (0.4 * mix[:, 2 * n:] + bias[2 * n:].double()).view(t, n, n), torch.float32)
    y = A5.npu_mhc_sinkhorn(h_res, eps=1e-4, num_iters=20)[0]
    m = torch.softmax(h_res.double(), -1) + 1e-4
    m = m / (m.sum(-2, keepdim=True) + 1e-4)
    for _ in range(19):
        m = m / (m.sum(-1, keepdim=True) + 1e-4)
        m = m / (m.sum(-2, keepdim=True) + 1e-4)
    close(y, m, torch.float32)
    h_out = rnd(t, d, dtype=BF, seed=3)
    out = A5.npu_mhc_post(x, y, h_out, h_post)
    ref = torch.einsum("tij,tid->tjd", y.double(), x.double()) + h_post.double().unsqueeze(-1) * h_out.double().unsqueeze(1)
    close(out, ref)


# ------------------------------------------------------------------------------------- attention

def _topk_desc(scores, k):
    return [sorted(range(len(r)), key=lambda j: -r[j])[:k] for r in scores.tolist()]


def test_lightning_indexer_causal_topk():
    b, s1, s2, h, d, k = 1, 3, 6, 2, 16, 5
    q, key, w = rnd(b, s1, h, d, dtype=BF), rnd(b, s2, 1, d, dtype=BF, seed=1), rnd(b, s1, h, dtype=BF, seed=2)
    idx = A3.npu_lightning_indexer(q, key, w, sparse_count=k, sparse_mode=3)[0]
    assert idx.shape == (b, s1, 1, k) and idx.dtype == torch.int32
    scores = (torch.einsum("shd,td->sht", q[0].double(), key[0, :, 0].double()).clamp_min(0)
              * w[0].double().unsqueeze(-1)).sum(1)
    for i in range(s1):
        visible = i + s2 - s1 + 1  # rightDownCausal
        want = _topk_desc(scores[i:i + 1, :visible], min(k, visible))[0]
        got = idx[0, i, 0].tolist()
        assert got[:len(want)] == want and all(v == -1 for v in got[len(want):])


def _attention64(q, keys, values, scale, sink=None):
    logits = q.double() @ keys.double().t() * scale
    m = logits.max(-1, keepdim=True).values
    if sink is not None:
        m = torch.maximum(m, sink.double().view(-1, 1))
    e = torch.exp(logits - m)
    denom = e.sum(-1, keepdim=True) + (0 if sink is None else torch.exp(sink.double().view(-1, 1) - m))
    return e @ values.double() / denom, (m + torch.log(denom)).squeeze(-1)


@pytest.mark.parametrize("mla", [False, True])
def test_sparse_flash_attention_matches_gathered_softmax(mla):
    b, s1, n2, h, d, r, k = 1, 2, 9, 3, 16, 8, 4
    q, kv = rnd(b, s1, h, d, dtype=BF), rnd(b, n2, 1, d, dtype=BF, seed=1)
    idx = torch.tensor([[[[3, 0, 7, -1]], [[8, 8, 2, 5]]]], dtype=torch.int32)
    sinks = None if mla else rnd(h, seed=2)
    extra = {}
    if mla:
        extra = dict(query_rope=rnd(b, s1, h, r, dtype=BF, seed=3), key_rope=rnd(b, n2, 1, r, dtype=BF, seed=4))
    out, smax, ssum = A3.npu_sparse_flash_attention(q, kv, kv, idx, 0.25, sparse_mode=0, attention_mode=2 if mla else 0,
                                                     return_softmax_lse=True, sinks=sinks, **extra)
    assert smax.shape == ssum.shape == (b, 1, s1, h)
    for i in range(s1):
        rows = [j for j in idx[0, i, 0].tolist() if j >= 0]
        qi, keys = q[0, i], kv[0, rows, 0]
        if mla:
            qi = torch.cat([qi, extra["query_rope"][0, i]], -1)
            keys = torch.cat([keys, extra["key_rope"][0, rows, 0]], -1)
        ref, lse = _attention64(qi, keys, kv[0, rows, 0], 0.25, sinks)
        close(out[0, i], ref)
        close(smax[0, 0, i] + torch.log(ssum[0, 0, i]), lse, torch.float32)


def test_fused_infer_attention_band_mode():
    b, s, h, d, window = 1, 6, 2, 16, 3
    q, kv = rnd(b, s, h, d, dtype=BF), rnd(b, s, 1, d, dtype=BF, seed=1)
    mask = torch.triu(torch.ones(2048, 2048, dtype=torch.bool), diagonal=1)
    out, lse = A2.npu_fused_infer_attention_score_v2(q, kv, kv, atten_mask=mask, num_query_heads=h, num_key_value_heads=1,
                                                     softmax_scale=0.3, pre_tokens=window - 1, next_tokens=0,
                                                     input_layout="BSND", sparse_mode=4, return_softmax_lse=True)
    assert lse.shape == (b, h, s, 1)
    for i in range(s):
        rows = list(range(max(0, i - window + 1), i + 1))
        ref, ref_lse = _attention64(q[0, i], kv[0, rows, 0], kv[0, rows, 0], 0.3)
        close(out[0, i], ref)
        close(lse[0, :, i, 0], ref_lse, torch.float32)


# ------------------------------------------------------------------------------------------- MoE

def test_gating_top_k_groups_bias_and_weights():
    t, e, k = 4, 16, 3
    x, bias = rnd(t, e), rnd(e, seed=1) * 0.1
    y, ids, _ = A3.npu_moe_gating_top_k(x, k, bias=bias, k_group=2, group_count=4, group_select_mode=1,
                                        norm_type=1, routed_scaling_factor=2.5, eps=1e-20)
    score = torch.sigmoid(x.double())
    ranked = score + bias.double()
    for i in range(t):
        groups = ranked[i].view(4, 4).topk(2, -1).values.sum(-1).topk(2).indices.tolist()
        allowed = [j for j in range(e) if j // 4 in groups]
        want = sorted(allowed, key=lambda j: -float(ranked[i, j]))[:k]
        assert ids[i].tolist() == want
        w = score[i, want]
        close(y[i], w / w.sum() * 2.5, torch.float32)


def test_init_routing_then_grouped_matmul_then_finalize():
    t, k, e, hdim, n = 5, 2, 3, 8, 4
    x, ids = rnd(t, hdim, dtype=BF), torch.tensor([[0, 2], [1, 0], [2, 2], [0, 1], [1, 1]], dtype=torch.int32)
    xs, row, counts, _ = A3.npu_moe_init_routing_v2(x, ids, active_num=t * k, expert_num=e, expert_tokens_num_type=1,
                                                    expert_tokens_num_flag=True, active_expert_range=[0, e])
    assert counts.tolist() == [3, 4, 3]
    for s in range(t * k):  # row_idx_type 0: slot t*K+j -> its row in expanded_x
        assert torch.equal(xs[row[s]], x[s // k])
    assert torch.equal(torch.tensor([int(ids.view(-1)[row.tolist().index(r)]) for r in range(t * k)]),
                       torch.tensor([0, 0, 0, 1, 1, 1, 1, 2, 2, 2]))
    w = rnd(e, hdim, n, dtype=BF, seed=2)
    y = A3.npu_grouped_matmul([xs], [w], group_list=counts.cumsum(0), split_item=2, group_type=0, group_list_type=0)[0]
    expert_of_row = torch.repeat_interleave(torch.arange(e), counts)
    close(y, torch.stack([xs[r].double() @ w[expert_of_row[r]].double() for r in range(t * k)]))
    scales = rnd(t, k, dtype=BF, seed=3)
    out = A3.npu_moe_finalize_routing(y, None, None, None, scales, row.view(t, k).t().reshape(-1).contiguous(), None, k=k)
    ref = torch.stack([sum(scales[i, j].double() * y[row[i * k + j]].double() for j in range(k)) for i in range(t)])
    close(out, ref)


def test_swiglu_and_clipped_swiglu():
    x = rnd(3, 16, dtype=BF) * 4
    a, b = x.double()[:, :8], x.double()[:, 8:]
    close(A3.npu_swiglu(x, dim=-1), a * torch.sigmoid(a) * b)
    ac, bc = a.clamp(max=5.0), b.clamp(-5.0, 5.0)
    close(A3.npu_clipped_swiglu(x, alpha=1.0, limit=5.0, bias=0.0, interleaved=False), ac * torch.sigmoid(ac) * bc)
    ai, bi = x.double()[:, 0::2].clamp(max=7.0), x.double()[:, 1::2].clamp(-7.0, 7.0)
    close(A3.npu_clipped_swiglu(x), ai * torch.sigmoid(1.702 * ai) * (bi + 1.0))


# ------------------------------------------------------------------------------------------ quant

def test_dynamic_quant_and_int8_quant_matmul():
    x = rnd(4, 32, dtype=BF)
    q, s = A2.npu_dynamic_quant(x)
    amax = x.double().abs().amax(-1)
    assert torch.allclose(s.double(), amax / 127, rtol=1e-6)
    assert torch.equal(q, torch.round(x.double() / (amax / 127).unsqueeze(-1)).to(torch.int8))
    w = torch.randint(-127, 128, (6, 32), generator=g(1), dtype=torch.int8)
    ws = torch.rand(6, generator=g(2)) * 0.01
    y = A2.npu_quant_matmul(q, w.t(), ws, pertoken_scale=s, output_dtype=BF)
    close(y, (q.double() @ w.double().t()) * ws.double() * s.double().unsqueeze(-1))


def test_fp8_block_quant_matmul_and_mx_quant_on_a5():
    m, kdim, n = 3, 256, 256
    a = (rnd(m, kdim) * 3).to(torch.float8_e4m3fn)
    b = (rnd(kdim, n, seed=1) * 3).to(torch.float8_e4m3fn)
    ps, ws = torch.rand(m, 2, generator=g(2)) + 0.5, torch.rand(2, 2, generator=g(3)) + 0.5
    y = A5.npu_quant_matmul(a, b, ws, pertoken_scale=ps, output_dtype=BF, group_sizes=[1, 128, 128])
    ref = sum((a.double()[:, i * 128:(i + 1) * 128] @ b.double()[i * 128:(i + 1) * 128])
              * ps.double()[:, i:i + 1] * ws.double()[i].repeat_interleave(128) for i in range(2))
    close(y, ref)
    x = rnd(2, 256, dtype=BF) * 10
    yq, codes = A5.npu_dynamic_mx_quant(x, dst_type=292, block_size=128, scale_alg=1, max_low_bound=1e-4)
    assert codes.shape == (2, 1, 2) and codes.dtype == torch.uint8
    for blk in range(2):
        part = x[:, blk * 128:(blk + 1) * 128].double()
        expo = torch.ceil(torch.log2(part.abs().amax(-1).clamp_min(1e-4) / 448))  # cuBLAS rule: amax/448 rounded up
        assert codes[:, 0, blk].tolist() == (expo + 127).long().tolist()
        dec = yq[:, blk * 128:(blk + 1) * 128].double() * torch.exp2(expo).unsqueeze(-1)
        # e4m3 keeps 3 mantissa bits (half an ulp: 2^-4 relative); subnormals below 2^-6 step by 2^-9
        assert bool(((dec - part).abs() <= part.abs() / 16 + torch.exp2(expo - 9).unsqueeze(-1)).all())


# ------------------------------------------------------------------------------ documented refusals

@pytest.mark.parametrize("call, match", [
    (lambda: A3.npu_lightning_indexer(rnd(1, 2, 2, 16), rnd(1, 4, 1, 16), rnd(1, 2, 2), sparse_count=2),
     "query dtype must be one of bfloat16, float16, got float32"),
    (lambda: A3.npu_lightning_indexer(rnd(1, 2, 2, 16, dtype=BF), rnd(1, 4, 1, 16, dtype=BF), rnd(1, 2, 2, dtype=BF),
                                      sparse_count=2049), "sparse_count must be in 1-2048"),
    (lambda: A2.npu_quant_matmul(torch.zeros(2, 128).to(torch.float8_e4m3fn), torch.zeros(128, 128).to(torch.float8_e4m3fn),
                                 torch.ones(1, 1), pertoken_scale=torch.ones(2, 1), output_dtype=BF,
                                 group_sizes=[1, 128, 128]), "no FP8 units"),
    (lambda: A2.npu_mhc_sinkhorn(rnd(2, 4, 4)), "not supported on A2"),
    (lambda: A5.npu_mhc_sinkhorn(rnd(2, 4, 4), num_iters=101), r"num_iters must be in \[1, 100\]"),
    (lambda: A2.npu_fused_infer_attention_score_v2(rnd(1, 1, 2, 16, dtype=BF), rnd(1, 3, 1, 16, dtype=BF), rnd(1, 3, 1, 16, dtype=BF),
                                                   learnable_sink=rnd(2, dtype=BF), num_query_heads=2, num_key_value_heads=1,
                                                   input_layout="BSND"), "learnable_sink is only supported with TND"),
    (lambda: A3.npu_moe_finalize_routing(rnd(4, 8), None, None, None, rnd(3, 2), torch.arange(6, dtype=torch.int32), None, k=2),
     r"expanded_permuted_rows must have shape \(6, 8\)"),
])
def test_documented_constraints_raise_device_error(call, match):
    with pytest.raises(DeviceError, match=match):
        call()


def test_unemulated_op_and_combination_raise_not_emulated():
    with pytest.raises(NotEmulated, match="npu_fusion_attention is not emulated"):
        A3.npu_fusion_attention
    with pytest.raises(NotEmulated, match="layout_query='TND'"):
        A3.npu_lightning_indexer(rnd(2, 2, 16, dtype=BF), rnd(4, 1, 16, dtype=BF), rnd(2, 2, dtype=BF), layout_query="TND")
    assert {"npu_sparse_flash_attention", "npu_moe_finalize_routing", "npu_dynamic_mx_quant"} <= set(emulated_ops())


# ------------------------------------------------------------------------------- switch + parity

def test_emulated_ascend_is_explicit_only_and_labelled(emulate):
    emulate("A3")
    assert registry.probe("ascend")[0] and ascend.chip() == "A3" and ascend.device().type == "cpu"
    assert registry.label("ascend") == "ascend (emulated A3)"
    assert registry.choose("rms_norm").backend != "ascend"  # auto never picks it
    assert registry.preferred_backend() != "ascend"
    with registry.forced("ascend"):
        assert registry.choose("rms_norm").backend == "ascend"
    from v4hal.backends import info

    text = info.format_text(info.report())
    assert "ascend (emulated A3) usable" in text and "auto never picks ascend (emulated A3)" in text


def _run(case_id):
    (case,) = [c for c in parity_cases(quick=True) if c.id == case_id]
    return parity.run_case(case, ["ascend"])[0]


def _lse_rebuilt_wrongly(fn, *a, **kw):
    out, smax, ssum = fn(*a, **kw)
    return out, ssum, smax


def _minus_one_first(fn, q, k, v, idx, *a, **kw):
    return fn(q, k, v, idx.flip(-1).contiguous(), *a, **kw)


def _wrong_sparse_mode(fn, *a, **kw):
    return fn(*a, **{**kw, "sparse_mode": 3})


def _scale_not_transposed(fn, x1, x2, scale, **kw):
    return fn(x1, x2, scale.t().contiguous(), **kw)


def _routing_index_inverted(fn, *a, **kw):
    xs, row, counts, sc = fn(*a, **kw)
    inverse = torch.empty_like(row)
    inverse[row.long()] = torch.arange(row.numel(), dtype=row.dtype)
    return xs, inverse, counts, sc


def _src_to_dst_token_major(fn, rows, s1, s2, b, scales, src, *a, **kw):
    k = scales.shape[1]
    return fn(rows, s1, s2, b, scales, src.view(k, -1).t().reshape(-1).contiguous(), *a, **kw)


@pytest.mark.parametrize("chip, case_id, op_name, change", [
    ("A3", "sparse_attention/small/mqa-sink-bf16", "npu_sparse_flash_attention", _lse_rebuilt_wrongly),
    ("A3", "sparse_attention/small/mqa-sink-bf16", "npu_sparse_flash_attention", _minus_one_first),
    ("A3", "sparse_attention/small/mla-bf16", "npu_sparse_flash_attention", _wrong_sparse_mode),
    ("A5", "fp8_matmul/batched", "npu_quant_matmul", _scale_not_transposed),
    ("A3", "moe_forward/small/v4-topk", "npu_moe_init_routing_v2", _routing_index_inverted),
    ("A3", "moe_combine/small", "npu_moe_finalize_routing", _src_to_dst_token_major),
])
def test_parity_on_the_emulator_catches_a_flipped_glue_decision(emulate, monkeypatch, chip, case_id, op_name, change):
    emulate(chip)
    baseline = _run(case_id)
    assert baseline["status"] == "pass", baseline["note"]
    answer_npu_with(monkeypatch, Flipped(Emulator(chip), op_name, change))
    row = _run(case_id)
    assert row["status"] == "fail", row


@pytest.mark.parametrize("chip", ["A2", "A3", "A5"])
def test_quick_parity_passes_on_the_emulator(emulate, chip):
    """CI's parity subset on the emulator: every quick case but the whole-model ones."""
    emulate(chip)
    cases = [c for c in parity_cases(quick=True) if c.op != "model_logits"]
    failed = [(r["case"], r["note"]) for c in cases for r in parity.run_case(c, ["ascend"]) if r["status"] != "pass"]
    assert not failed


def test_indexer_select_bf16_keeps_the_reference_ranking(emulate):
    """Regression: folding the scale into bf16 weights moved scores by up to 2^-9 relative, so the
    kernel picked keys outside the reference's tie band (V3.2 prefill in bf16)."""
    from v4hal.bench.cases_attention import _select_case

    emulate("A3")
    case = _select_case("v3.2-like-bf16", 1, 8, 1024, 64, 128, 256, 1, dtype=BF)
    row = parity.run_case(case, ["ascend"])[0]
    assert row["status"] == "pass", row["note"]
    assert ascend.npu().calls["npu_lightning_indexer"] >= 1


def test_moe_combine_weighs_in_float32_at_v4_flash_shape(emulate):
    """Regression: rounding float32 routing weights to the bf16 rows' dtype (finalize_routing wants
    them equal) put elements of the V4-Flash combine outside the bf16 tolerance."""
    emulate("A3")
    (case,) = [c for c in parity_cases() if c.id == "moe_combine/v4-flash"]
    row = parity.run_case(case, ["ascend"])[0]
    assert row["status"] == "pass", row["note"]
