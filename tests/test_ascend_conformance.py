"""Conformance of every `npu_*` op the ascend backend calls, in the argument combinations it calls
them with, against float64 statements of the documented math written here (independently of the
emulator and of the cpu reference).

One suite, two kinds of target:
- the emulator of each chip (A2, A3, A5) on CPU tensors: runs everywhere, in the default selection;
- the real op, `torch_npu` on the NPU: the `device` parameter, marked `npu`. On an Ascend machine,
  `pytest -m npu tests/test_ascend_conformance.py` runs the same checks on the device's chip (inputs
  built on the host, moved to the NPU, outputs moved back), and each failure names the op and the
  assumption of docs/ascend.md ("Open points") that the device contradicts. Without torch_npu the
  device parameter is skipped with that reason, but it is deselected by default anyway: on CPU
  these checks run on the emulator, never skipped.
Tolerances are bf16 output rounding (the kernels may accumulate differently than the emulator);
top-k indices are compared tie-aware (a differing index passes only if its score ties the k-th).
"""

import importlib
import importlib.util

import pytest
import torch

from v4hal.backends import ascend
from v4hal.tools.ascend.emulator import Emulator

BF, F16, F32 = torch.bfloat16, torch.float16, torch.float32
EMULATED = ("A2", "A3", "A5")


class Target:
    """The ops under test: `Target("A3", ...)` is the emulator; `Target("device", ...)` is torch_npu
    on the NPU, called with every tensor argument moved there and its outputs moved back."""

    def __init__(self, name: str, chips):
        if name != "device":
            self.ops, self.chip, self.device = Emulator(name), name, torch.device("cpu")
            return
        if importlib.util.find_spec("torch_npu") is None:
            pytest.skip("the device target needs torch_npu (an Ascend machine with CANN); on CPU the emulator runs")
        self.ops = importlib.import_module("torch_npu")
        if not torch.npu.is_available():
            pytest.skip("torch_npu imported but no NPU is visible")
        self.chip, self.device = ascend.chip(), torch.device("npu")
        if self.chip not in chips:
            pytest.skip(f"documented for {'/'.join(chips)} only; this NPU is {self.chip}")

    def __getattr__(self, op_name):
        fn = getattr(self.ops, op_name)
        return lambda *a, **kw: _move(fn(*_move(a, self.device), **_move(kw, self.device)), torch.device("cpu"))


def _move(v, device):
    if isinstance(v, torch.Tensor):
        return v.to(device)
    if isinstance(v, (list, tuple)):
        return type(v)(_move(x, device) for x in v)
    if isinstance(v, dict):
        return {k: _move(x, device) for k, x in v.items()}
    return v


def on(chips=EMULATED):
    """Run the test once per emulated chip among `chips`, and on the device (marked npu); the `npu`
    fixture is the Target."""
    params = [pytest.param((c, chips), id=c) for c in EMULATED if c in chips]
    params.append(pytest.param(("device", chips), id="device", marks=pytest.mark.npu))
    return pytest.mark.parametrize("npu", params, indirect=True)


@pytest.fixture
def npu(request):
    return Target(*request.param)


def rnd(*shape, dtype=F32, seed=0, scale=1.0):
    return (torch.randn(*shape, generator=torch.Generator().manual_seed(seed)) * scale).to(dtype)


def close(out, ref, dtype=BF):
    rtol = {BF: 1.6e-2, F16: 2e-3, F32: 1e-5}[dtype]
    torch.testing.assert_close(out.double(), ref.double(), rtol=rtol, atol=rtol * float(ref.abs().max()) / 8)


# ----------------------------------------------------------------------------------- rms_norm

@on()
@pytest.mark.parametrize("dtype", [BF, F16, F32])
@pytest.mark.parametrize("shape", [(7, 64), (2, 5, 128)])
def test_rms_norm(npu, dtype, shape):
    x, w = rnd(*shape, dtype=dtype), rnd(shape[-1], dtype=dtype, seed=1)
    y, rstd = npu.npu_rms_norm(x, w, epsilon=1e-6)
    xd = x.double()
    inv = 1 / torch.sqrt((xd * xd).mean(-1, keepdim=True) + 1e-6)
    close(y, xd * inv * w.double(), dtype)
    close(rstd, inv, F32 if dtype == F32 else BF)


# ---------------------------------------------------------------------------------- attention

def _index_scores(q, k, w):
    """[B, S1, S2] float64: sum_h w_h relu(q_h . k)."""
    return (torch.einsum("bshd,btd->bsht", q.double(), k[:, :, 0].double()).clamp_min(0)
            * w.double().unsqueeze(-1)).sum(2)


@on()
@pytest.mark.parametrize("dtype", [BF, F16])
@pytest.mark.parametrize("s1, s2, mode, count", [(5, 9, 3, 4), (4, 6, 3, 8), (1, 40, 3, 16), (3, 7, 0, 5)],
                         ids=["causal-prefill", "causal-fewer-keys", "decode", "mode0"])
def test_lightning_indexer_top_k(npu, dtype, s1, s2, mode, count):
    b, h, d = 2, 4, 32
    q, k, w = rnd(b, s1, h, d, dtype=dtype), rnd(b, s2, 1, d, dtype=dtype, seed=1), rnd(b, s1, h, dtype=dtype, seed=2)
    idx = npu.npu_lightning_indexer(q, k, w, layout_query="BSND", layout_key="BSND", sparse_count=count,
                                    sparse_mode=mode)[0]
    assert idx.shape == (b, s1, 1, count) and idx.dtype == torch.int32
    scores = _index_scores(q, k, w)
    for bi in range(b):
        for i in range(s1):
            visible = s2 if mode == 0 else i + s2 - s1 + 1  # rightDownCausal
            row, want = idx[bi, i, 0].tolist(), min(count, visible)
            assert all(v == -1 for v in row[want:]), ("-1 fills the slots past the visible keys", row)
            got = row[:want]
            assert len(set(got)) == want and all(0 <= v < visible for v in got), row
            ref = scores[bi, i, :visible]
            kth = ref.sort(descending=True).values[want - 1]
            tie = 2e-2 * float(ref.abs().max())
            assert all(float(ref[v]) >= kth - tie for v in got), ("a chosen key scores below the k-th", row)
            got_scores = ref[got]
            assert bool((got_scores[1:] <= got_scores[:-1] + tie).all()), ("best first", row)


def _attention64(q, keys, values, scale, sink=None):
    """(out, lse) over the given rows; a sink is one more logit with a zero value."""
    logits = q.double() @ keys.double().t() * scale
    m = logits.max(-1, keepdim=True).values
    if sink is not None:
        m = torch.maximum(m, sink.double().view(-1, 1))
    e = torch.exp(logits - m)
    denom = e.sum(-1, keepdim=True) + (0 if sink is None else torch.exp(sink.double().view(-1, 1) - m))
    return e @ values.double() / denom, (m + torch.log(denom)).squeeze(-1)


@on()
@pytest.mark.parametrize("mla", [False, True], ids=["v4-shared-kv-sink", "mla-absorb"])
@pytest.mark.parametrize("s1", [1, 3], ids=["decode", "prefill"])
def test_sparse_flash_attention(npu, mla, s1):
    b, n2, h, d, r, k = 1, 24, 4, 64, 16, 6
    q, kv = rnd(b, s1, h, d, dtype=BF), rnd(b, n2, 1, d, dtype=BF, seed=1)
    g = torch.Generator().manual_seed(5)
    idx = torch.stack([torch.randperm(n2, generator=g)[:k] for _ in range(s1)]).int()
    idx[0, -2:] = -1  # valid indices first, then -1 (what the backend passes)
    idx = idx.view(b, s1, 1, k).contiguous()
    sinks = None if mla else rnd(h, seed=2)
    extra = {}
    if mla:
        extra = dict(query_rope=rnd(b, s1, h, r, dtype=BF, seed=3), key_rope=rnd(b, n2, 1, r, dtype=BF, seed=4))
    out, smax, ssum = npu.npu_sparse_flash_attention(q, kv, kv, idx, 0.125, layout_query="BSND", layout_kv="BSND",
                                                     sparse_mode=0, attention_mode=2 if mla else 0,
                                                     return_softmax_lse=True, sinks=sinks, **extra)
    assert out.shape == q.shape and smax.shape == ssum.shape == (b, 1, s1, h)
    for i in range(s1):
        rows = [j for j in idx[0, i, 0].tolist() if j >= 0]
        qi, keys = q[0, i], kv[0, rows, 0]
        if mla:
            qi = torch.cat([qi, extra["query_rope"][0, i]], -1)
            keys = torch.cat([keys, extra["key_rope"][0, rows, 0]], -1)
        ref, lse = _attention64(qi, keys, kv[0, rows, 0], 0.125, sinks)
        close(out[0, i], ref)
        close(smax[0, 0, i] + torch.log(ssum[0, 0, i]), lse)  # lse = softmax_max + log(softmax_sum)


@on()
@pytest.mark.parametrize("s1", [1, 3], ids=["decode", "prefill"])
def test_kv_quant_sparse_flash_attention_int8_paged(npu, s1):
    """The int8 KV cache (attention_mode 2, combine mode, per-tile scales): each key token is
    512 int8 codes, 64 bf16 RoPE values and 4 float32 scales (one per 128 codes) concatenated
    into 656 bytes; a code reads back as code * scale, rounded to bf16 (the cube's input: so does
    vllm-ascend's reference of this kernel); positions go through the block table."""
    b, h, blocks, bs, k = 2, 8, 3, 16, 10
    g = torch.Generator().manual_seed(6)
    codes = torch.randint(-127, 128, (blocks, bs, 1, 512), generator=g, dtype=torch.int8)
    rope = rnd(blocks, bs, 1, 64, dtype=BF, seed=7)
    scales = torch.rand(blocks, bs, 1, 4, generator=g) * 0.02 + 1e-3
    key = torch.cat([codes, rope.view(torch.int8), scales.view(torch.int8)], -1).contiguous()
    table = torch.tensor([[2, 0], [1, 2]], dtype=torch.int32)
    lengths = torch.tensor([32, 20], dtype=torch.int32)
    q = rnd(b, s1, h, 576, dtype=BF, seed=8)
    idx = torch.stack([torch.stack([torch.randperm(int(n), generator=g)[:k] for _ in range(s1)]) for n in lengths])
    idx[0, 0, -3:] = -1  # valid indices first, then -1 (what the backend passes)
    idx = idx.int().unsqueeze(2).contiguous()
    out = npu.npu_kv_quant_sparse_flash_attention(
        q, key, key, idx, 576 ** -0.5, key_quant_mode=2, value_quant_mode=2, block_table=table,
        actual_seq_lengths_kv=lengths, sparse_block_size=1, layout_query="BSND", layout_kv="PA_BSND",
        sparse_mode=0, attention_mode=2, quant_scale_repo_mode=1, tile_size=128, rope_head_dim=64)
    assert out.shape == (b, s1, h, 512) and out.dtype == BF
    latent = (codes.double().view(blocks, bs, 4, 128) * scales.double().view(blocks, bs, 4, 1)).view(blocks, bs, 512)
    latent = latent.to(BF).double()
    rows = torch.cat([latent, rope[:, :, 0].double()], -1)
    for bi in range(b):
        for i in range(s1):
            pos = [p for p in idx[bi, i, 0].tolist() if p >= 0]
            keys = torch.stack([rows[table[bi, p // bs], p % bs] for p in pos])
            ref, _ = _attention64(q[bi, i], keys, keys[:, :512], 576 ** -0.5)
            close(out[bi, i], ref)


@on(("A2", "A3"))
@pytest.mark.parametrize("s", [1, 7], ids=["decode-last-window", "band-prefill"])
def test_fused_infer_attention_band(npu, s):
    b, h, d, window = 1, 4, 64, 3
    q, kv = rnd(b, s, h, d, dtype=BF), rnd(b, s if s > 1 else window, 1, d, dtype=BF, seed=1)
    mask = torch.triu(torch.ones(2048, 2048, dtype=torch.bool), diagonal=1) if s > 1 else None
    out, lse = npu.npu_fused_infer_attention_score_v2(
        q, kv, kv, atten_mask=mask, num_query_heads=h, num_key_value_heads=1, softmax_scale=0.3,
        pre_tokens=window - 1, next_tokens=0, input_layout="BSND", sparse_mode=4 if s > 1 else 0,
        return_softmax_lse=True)
    assert lse.shape == (b, h, s, 1)
    for i in range(s):
        rows = list(range(max(0, i - window + 1), i + 1)) if s > 1 else list(range(window))
        ref, ref_lse = _attention64(q[0, i], kv[0, rows, 0], kv[0, rows, 0], 0.3)
        close(out[0, i], ref)
        close(lse[0, :, i, 0], ref_lse)


# ----------------------------------------------------------------------------------------- MoE

@on()
@pytest.mark.parametrize("how", ["softmax-groups-by-max", "sigmoid-bias-groups-by-top2", "hash"])
def test_gating_top_k(npu, how):
    t, e, k, groups, kept = 6, 32, 4, 4, 2
    x = rnd(t, e)
    kw = dict(k_group=kept, group_count=groups, renorm=0, out_flag=False, routed_scaling_factor=2.5, eps=1e-20)
    bias = rnd(e, seed=1) * 0.1 if how.startswith("sigmoid") else None
    if how == "hash":
        tid2eid = torch.stack([torch.randperm(e, generator=torch.Generator().manual_seed(v))[:k] for v in range(50)]).int()
        ids_in = torch.randint(0, 50, (t,), generator=torch.Generator().manual_seed(3)).int()
        kw.update(k_group=1, group_count=1, input_ids=ids_in, tid2eid=tid2eid)
    y, ids, _ = npu.npu_moe_gating_top_k(x, k, bias=bias, group_select_mode=1 if bias is not None else 0,
                                         norm_type=1 if how.startswith("sigmoid") else 0, **kw)
    score = torch.sigmoid(x.double()) if how.startswith("sigmoid") else torch.softmax(x.double(), -1)
    for i in range(t):
        if how == "hash":
            want = tid2eid[int(ids_in[i])].tolist()
        else:
            ranked = score[i] + (0 if bias is None else bias.double())
            per = ranked.view(groups, -1)
            gscore = per.topk(2, -1).values.sum(-1) if bias is not None else per.max(-1).values
            allowed = [j for j in range(e) if j // (e // groups) in gscore.topk(kept).indices.tolist()]
            want = sorted(allowed, key=lambda j: -float(ranked[j]))[:k]
        assert ids[i].tolist() == want
        w = score[i, want]
        close(y[i], w / w.sum() * 2.5, F32)  # renormalised, then routed_scaling_factor


@on()
@pytest.mark.parametrize("dtype", [BF, F32])
def test_init_routing_grouped_matmul_finalize(npu, dtype):
    """The backend's MoE pipeline: permute (gather index), one grouped GEMM over cumulative group
    ends, combine with a choice-major index."""
    t, k, e, hdim, n = 7, 2, 4, 32, 16
    x = rnd(t, hdim, dtype=dtype)
    ids = torch.randint(0, e, (t, k), generator=torch.Generator().manual_seed(1)).int()
    ids[:, 1] = (ids[:, 0] + 1) % e  # distinct choices per token
    xs, row, counts, _ = npu.npu_moe_init_routing_v2(
        x, ids, active_num=t * k, expert_num=e, drop_pad_mode=0, expert_tokens_num_type=1,
        expert_tokens_num_flag=True, quant_mode=-1, active_expert_range=[0, e], row_idx_type=0)
    assert counts.tolist() == torch.bincount(ids.view(-1).long(), minlength=e).tolist()
    row = row.long()
    assert sorted(row.tolist()) == list(range(t * k))
    for s in range(t * k):  # row_idx_type 0: slot t*K+j -> its row in expanded_x
        assert torch.equal(xs[row[s]], x[s // k])
    expert_of_row = torch.repeat_interleave(torch.arange(e), counts)
    assert all(int(ids.view(-1)[s]) == int(expert_of_row[row[s]]) for s in range(t * k)), "rows grouped by expert"
    w = rnd(e, hdim, n, dtype=dtype, seed=2)
    y = npu.npu_grouped_matmul([xs], [w], group_list=counts.cumsum(0), split_item=2, group_type=0,
                               group_list_type=0)[0]
    close(y, torch.stack([xs[r].double() @ w[expert_of_row[r]].double() for r in range(t * k)]), dtype)
    scales = rnd(t, k, dtype=dtype, seed=3)
    out = npu.npu_moe_finalize_routing(y, None, None, None, scales, row.view(t, k).t().reshape(-1).int(),
                                       export_for_source_row=None, drop_pad_mode=0, k=k)
    ref = torch.stack([sum(scales[i, j].double() * y[row[i * k + j]].double() for j in range(k)) for i in range(t)])
    close(out, ref, dtype)


@on()
def test_grouped_matmul_bf16_over_a_transposed_expert_stack(npu):
    """How FP8 / MXFP4 experts reach the op once decoded: BF16, the weight a transposed view of an
    [E, N, K] stack (read as [E, K, N]), cumulative ends with empty experts (repeated ends)."""
    m, kdim, n = 5, 64, 24
    x = rnd(m, kdim, dtype=BF)
    stack = rnd(3, n, kdim, dtype=BF, seed=1)  # [E, N, K], as checkpoints store experts
    ends = torch.tensor([2, 2, 5])
    y = npu.npu_grouped_matmul([x], [stack.transpose(1, 2)], group_list=ends, split_item=2, group_type=0,
                               group_list_type=0)[0]
    expert = [0, 0, 2, 2, 2]
    close(y, torch.stack([stack[expert[r]].double() @ x[r].double() for r in range(m)]), BF)


@on()
def test_grouped_matmul_int8_per_token(npu):
    m, kdim, n, e = 9, 64, 16, 3
    xq = torch.randint(-127, 128, (m, kdim), generator=torch.Generator().manual_seed(0), dtype=torch.int8)
    w = torch.randint(-127, 128, (e, kdim, n), generator=torch.Generator().manual_seed(1), dtype=torch.int8)
    scale, pts = torch.rand(e, n) * 0.01, torch.rand(m) * 0.01
    ends = torch.tensor([4, 4, 9])
    y = npu.npu_grouped_matmul([xq], [w], scale=[scale], per_token_scale=[pts], group_list=ends, split_item=2,
                               group_type=0, group_list_type=0, output_dtype=15)[0]  # 15 = bfloat16
    expert = [0, 0, 0, 0, 2, 2, 2, 2, 2]
    ref = torch.stack([(xq[r].double() @ w[expert[r]].double()) * scale[expert[r]].double() * pts[r].double()
                       for r in range(m)])
    assert y.dtype == BF
    close(y, ref)


@on()
def test_swiglu_and_clipped_swiglu(npu):
    x = rnd(3, 32, dtype=BF, scale=4)
    a, b = x.double()[:, :16], x.double()[:, 16:]
    close(npu.npu_swiglu(x, dim=-1), a * torch.sigmoid(a) * b)
    ac, bc = a.clamp(max=5.0), b.clamp(-5.0, 5.0)  # V4's clamp, front/back halves
    close(npu.npu_clipped_swiglu(x, dim=-1, alpha=1.0, limit=5.0, bias=0.0, interleaved=False),
          ac * torch.sigmoid(ac) * bc)


# --------------------------------------------------------------------------------------- quant

@on()
@pytest.mark.parametrize("dtype", [BF, F16])
def test_dynamic_quant_and_int8_quant_matmul(npu, dtype):
    x = rnd(5, 64, dtype=dtype)
    q, s = npu.npu_dynamic_quant(x)
    amax = x.double().abs().amax(-1)
    close(s, amax / 127, F32)
    assert torch.equal(q, torch.round(x.double() / (amax / 127).unsqueeze(-1)).to(torch.int8))  # half to even
    w = torch.randint(-127, 128, (8, 64), generator=torch.Generator().manual_seed(1), dtype=torch.int8)
    ws = torch.rand(8) * 0.01
    y = npu.npu_quant_matmul(q, w.t(), ws, pertoken_scale=s, output_dtype=dtype)
    assert y.dtype == dtype
    close(y, (q.double() @ w.double().t()) * ws.double() * s.double().unsqueeze(-1), dtype)


@on(("A5",))
def test_fp8_block_quant_matmul(npu):
    m, kdim, n = 3, 256, 384
    a = rnd(m, kdim, scale=3).to(torch.float8_e4m3fn)
    b = rnd(kdim, n, seed=1, scale=3).to(torch.float8_e4m3fn)
    ps, ws = torch.rand(m, 2) + 0.5, torch.rand(2, 3) + 0.5
    y = npu.npu_quant_matmul(a, b, ws, pertoken_scale=ps, output_dtype=BF, group_sizes=[1, 128, 128])
    ref = sum((a.double()[:, i * 128:(i + 1) * 128] @ b.double()[i * 128:(i + 1) * 128])
              * ps.double()[:, i:i + 1] * ws.double()[i].repeat_interleave(128) for i in range(2))
    close(y, ref)


@on(("A5",))
def test_dynamic_mx_quant_cublas_rule(npu):
    x = rnd(2, 384, dtype=BF, scale=10)
    y, codes = npu.npu_dynamic_mx_quant(x, axis=-1, round_mode="rint", dst_type=292, block_size=128, scale_alg=1,
                                        max_low_bound=1e-4)
    assert codes.shape == (2, 2, 2) and codes.dtype == torch.uint8 and y.dtype == torch.float8_e4m3fn
    for blk in range(3):
        part = x[:, blk * 128:(blk + 1) * 128].double()
        expo = torch.ceil(torch.log2(part.abs().amax(-1).clamp_min(1e-4) / 448))  # amax / 448 rounded up
        assert codes.view(2, -1)[:, blk].tolist() == (expo + 127).long().tolist()
        dec = y[:, blk * 128:(blk + 1) * 128].double() * torch.exp2(expo).unsqueeze(-1)
        assert bool(((dec - part).abs() <= part.abs() / 16 + torch.exp2(expo - 9).unsqueeze(-1)).all())


# ----------------------------------------------------------------------------------------- mHC

@on(("A5",))
def test_mhc_pre_sinkhorn_post(npu):
    t, n, d = 3, 4, 32
    x = rnd(t, n, d, dtype=BF)
    phi, alpha, bias = rnd(n * n + 2 * n, n * d, seed=1) * 0.05, torch.tensor([0.7, 1.3, 0.4]), rnd(n * n + 2 * n, seed=2)
    h_in, h_post, h_res = npu.npu_mhc_pre(x, phi, alpha, bias, gamma=None, norm_eps=1e-6, hc_eps=1e-4, out_flag=0)[:3]
    flat = x.double().reshape(t, n * d)
    mix = flat @ phi.double().t() / torch.sqrt((flat ** 2).mean(-1, keepdim=True) + 1e-6)
    pre = torch.sigmoid(0.7 * mix[:, :n] + bias[:n].double()) + 1e-4  # parts: pre, post, res
    close(h_in, torch.einsum("ti,tid->td", pre, x.double()))
    close(h_post, 2 * torch.sigmoid(1.3 * mix[:, n:2 * n] + bias[n:2 * n].double()))
    close(h_res, (0.4 * mix[:, 2 * n:] + bias[2 * n:].double()).view(t, n, n))
    # alpha [2]: pre and post only (the backend's hc_head)
    close(npu.npu_mhc_pre(x, phi[:2 * n], alpha[:2], bias[:2 * n], gamma=None, norm_eps=1e-6, hc_eps=1e-4,
                          out_flag=0)[0], torch.einsum("ti,tid->td", pre, x.double()))
    y = npu.npu_mhc_sinkhorn(h_res, eps=1e-4, num_iters=20, out_flag=0)[0]
    m = torch.softmax(h_res.double(), -1) + 1e-4
    m = m / (m.sum(-2, keepdim=True) + 1e-4)
    for _ in range(19):
        m = m / (m.sum(-1, keepdim=True) + 1e-4)
        m = m / (m.sum(-2, keepdim=True) + 1e-4)
    close(y, m)
    h_out = rnd(t, d, dtype=BF, seed=3)
    out = npu.npu_mhc_post(x, y, h_out, h_post)
    close(out, torch.einsum("tij,tid->tjd", y.double(), x.double())
          + h_post.double().unsqueeze(-1) * h_out.double().unsqueeze(1))
