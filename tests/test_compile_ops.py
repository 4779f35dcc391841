"""Every op a V4 / V3.2 decode step calls traces under `torch.compile(fullgraph=True,
dynamic=False)` on the cpu and cpu_fast backends into one graph with nothing data-dependent in it
(dynamo only: the graphs run eagerly, which keeps this fast), and the compiled call gives what
the eager call gives. Quantized weights may break the graph but must
stay right; whole tiny V4 and V3.2 decoder layers compile with no break inside ops/ or backends/."""

import copy

import pytest
import torch

from compile_util import data_dependent
from v4hal import ops
from v4hal.backends import registry
from v4hal.bench.cases_model import TINY_V32
from v4hal.model.config import preset
from v4hal.model.hyper import expand_streams
from v4hal.model.model import build
from v4hal.model.moe import MoE
from v4hal.model.rope import Rope

BACKENDS = ("cpu", "cpu_fast")
# cpu_fast's eager decode shortcuts (Python floats, complex RoPE, GEMV, per-expert loops) step
# aside under compile for tensor paths: the same math summed in another order, so float32 close.
# The cpu reference runs the same kernels either way, except for the MoE (see test_moe_forward).
F32 = dict(rtol=1e-5, atol=1e-5)
EXACT = dict(rtol=0, atol=0)


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def _g(seed=0):
    return torch.Generator().manual_seed(seed)


def _randn(*shape, seed=0, scale=1.0, dtype=torch.float32):
    return (torch.randn(*shape, generator=_g(seed)) * scale).to(dtype)


def _compiled_and_eager(fn, *args, backend, fullgraph=True):
    """fn's results compiled (first, from a registry with nothing chosen yet) and eager. With
    fullgraph: one graph, nothing in it data-dependent."""
    graphs = []

    def record(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    with registry.forced(backend), torch.no_grad():
        got = torch.compile(fn, backend=record, fullgraph=fullgraph, dynamic=False)(*args)
        want = fn(*args)
    if fullgraph:
        assert len(graphs) == 1 and not data_dependent(graphs[0]), data_dependent(graphs[0])
    return got, want


def _assert_same(fn, *args, backend, tol=F32, cpu_tol=EXACT, fullgraph=True):
    """Compiled == eager: within `tol` on cpu_fast, `cpu_tol` on the cpu reference."""
    got, want = _compiled_and_eager(fn, *args, backend=backend, fullgraph=fullgraph)
    torch.testing.assert_close(got, want, **(cpu_tol if backend == "cpu" else tol))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["f32", "bf16"])
def test_linear_and_norms(backend, dtype):
    x = _randn(2, 1, 64, dtype=dtype)
    w, bias = _randn(48, 64, seed=1, scale=0.1, dtype=dtype), _randn(48, seed=2, dtype=dtype)
    norm_w, ln_b = _randn(64, seed=3, dtype=dtype), _randn(64, seed=4, dtype=dtype)

    def step(x):
        h = ops.rms_norm(x, norm_w, 1e-6)
        return ops.linear(h, w, None, bias), ops.layer_norm(x, norm_w, ln_b, 1e-6), ops.rms_norm(x, None, 1e-6)

    _assert_same(step, x, backend=backend, tol=F32 if dtype == torch.float32 else EXACT)


def test_one_row_float32_product_compiles_to_a_reduction():
    # cpu_fast's compiled one-row product is a multiply-and-sum that inductor fuses into one pass
    # over the weight, not an MKL GEMV call (docs/model.md: 4.0 -> 2.4 ms for bench-v4's step).
    graphs = []

    def record(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    x, w, bias = _randn(1, 1, 64), _randn(48, 64, seed=1, scale=0.1), _randn(48, seed=2)
    with registry.forced("cpu_fast"), torch.no_grad():
        got = torch.compile(lambda x: ops.linear(x, w, None, bias), backend=record, fullgraph=True, dynamic=False)(x)
    calls = [str(n.target) for n in graphs[0].graph.nodes if n.op in ("call_function", "call_method")]
    assert "sum" in " ".join(calls) and not any("linear" in c or "mm" in c for c in calls), calls
    torch.testing.assert_close(got, x @ w.T + bias, **F32)


@pytest.mark.parametrize("backend", BACKENDS)
def test_fp8_linear_may_break_the_graph_but_stays_right(backend):
    x = _randn(2, 1, 256)
    w, scale = ops.quantize_fp8(_randn(128, 256, seed=1, scale=0.1), (128, 128))
    _assert_same(lambda x: ops.linear(x, w, scale), x, backend=backend, tol=EXACT, fullgraph=False)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("interleaved", [True, False], ids=["interleaved", "halves"])
def test_rope_tables_and_apply_rope(backend, interleaved):
    # The tables come from Rope.cos_sin inside the compiled step: its memo must step aside.
    rope = Rope.from_params(16, {"rope_type": "yarn", "rope_theta": 160000.0, "factor": 16.0,
                                 "original_max_position_embeddings": 64, "beta_fast": 32, "beta_slow": 1})
    x, positions = _randn(2, 1, 4, 16), torch.tensor([[37], [5]])

    def step(x, positions):
        cos, sin = rope.cos_sin(positions)
        return ops.apply_rope(x, cos.unsqueeze(-2), sin.unsqueeze(-2), interleaved)

    _assert_same(step, x, positions, backend=backend)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("overlap", [True, False], ids=["csa", "hca"])
def test_kv_compress_full_window(backend, overlap):
    b, ratio, d = 2, 4, 16
    c = 2 * d if overlap else d
    kv, gate = _randn(b, ratio, c), _randn(b, ratio, c, seed=1)
    bias, norm_w = _randn(ratio, c, seed=2, scale=0.1), _randn(d, seed=3)
    prev = (_randn(b, ratio, d, seed=4), _randn(b, ratio, d, seed=5)) if overlap else (None, None)
    state = ops.CompressState(kv.new_zeros(b, 0, c), gate.new_zeros(b, 0, c), *prev, emitted=0)

    def step(kv, gate):
        entries, rest = ops.kv_compress(kv, gate, bias, norm_w, ratio, overlap=overlap, state=state)
        return entries, rest.kv, rest.prev_kv, rest.prev_gate

    got, want = _compiled_and_eager(step, kv, gate, backend=backend)
    assert got[0].shape == (b, 1, d)
    torch.testing.assert_close(got, want, **EXACT)


@pytest.mark.parametrize("backend", BACKENDS)
def test_indexer_select_masks_what_positions_hide(backend):
    # 12 compressed entries, ratio 4: the query at 21 sees 5 of them, the one at 6 only 1; the
    # remaining slots of top-6 must come back -1.
    q, k, w = _randn(2, 1, 4, 16), _randn(2, 12, 16, seed=1), _randn(2, 1, 4, seed=2)
    positions = torch.tensor([[21], [6]])

    def step(q, k, w, positions):
        return ops.indexer_select(q, k, w, 0.125, 6, positions, 4)

    got, want = _compiled_and_eager(step, q, k, w, positions, backend=backend)
    assert torch.equal(got, want)
    assert (got[0, 0] >= 0).sum() == 5 and (got[1, 0] >= 0).sum() == 1


@pytest.mark.parametrize("backend", BACKENDS)
def test_sparse_and_window_attention(backend):
    q, kv, sink = _randn(2, 1, 4, 32), _randn(2, 10, 32, seed=1), _randn(4, seed=2)
    indices = torch.tensor([[[0, 3, 9, -1, 5, -1]], [[-1, -1, 2, 2, 7, 1]]], dtype=torch.int32)

    def step(q, kv, indices):
        out, lse = ops.sparse_attention(q, kv, indices, 0.2, sink=sink, v_dim=24, return_lse=True)
        return out, lse, ops.window_attention(q, kv, 4, 0.2, sink=sink)

    _assert_same(step, q, kv, indices, backend=backend)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["f32", "bf16"])
def test_mhc(backend, dtype):
    n, d = 4, 32
    x = _randn(2, 1, n, d, dtype=dtype)
    fn, base, scale = _randn((2 + n) * n, n * d, seed=1, scale=0.1), _randn((2 + n) * n, seed=2), _randn(3, seed=3)
    head_fn, head_base, head_scale = _randn(n, n * d, seed=4, scale=0.1), _randn(n, seed=5), _randn(1, seed=6)

    def step(x):
        layer_input, post, comb = ops.hc_pre(x, fn, scale, base, iters=20)
        new = ops.hc_post(layer_input * 2, x, post, comb)
        return layer_input, post, comb, new, ops.hc_head(new, head_fn, head_scale, head_base)

    # cpu_fast's eager decode path rounds the mixes in double precision, once, into x's dtype.
    tol = F32 if dtype == torch.float32 else dict(rtol=1.6e-2, atol=1e-5)
    _assert_same(step, x, backend=backend, tol=tol)


def _moe(kind, dtype):
    torch.manual_seed(11)
    if kind == "groups":  # V3.2-style: sigmoid scores, correction bias, group-limited top-k, 2 shared
        moe = MoE(64, 32, 16, 2, 4, scoring_func="sigmoid", n_group=4, topk_group=2, routed_scaling_factor=2.5,
                  dtype=dtype)
    else:  # V4: sqrtsoftplus, clamped SwiGLU, top-k or hash-routed
        moe = MoE(64, 32, 16, 1, 4, scoring_func="sqrtsoftplus", routed_scaling_factor=1.5, swiglu_limit=0.6,
                  hash_vocab_size=40 if kind == "hash" else None, dtype=dtype)
    g = _g(12)
    with torch.no_grad():
        for name, t in list(moe.named_parameters()) + list(moe.named_buffers()):
            if name.endswith("tid2eid"):
                t.copy_(torch.stack([torch.randperm(16, generator=g)[:4] for _ in range(40)]))
            elif t.is_floating_point():
                t.copy_(torch.randn(t.shape, generator=g) * (0.1 if "bias" in name else 0.3))
    return moe


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kind", ["topk", "hash", "groups"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["f32", "bf16"])
def test_moe_forward(backend, kind, dtype):
    # Compiled, float experts run as gathers and reductions in float32 instead of the dispatch /
    # grouped GEMMs / combine (cpu) or the per-expert GEMVs (cpu_fast), which round BF16
    # intermediates: close, not equal, measured against the output's scale.
    moe = _moe(kind, dtype)
    x, input_ids = _randn(2, 1, 64, seed=13, dtype=dtype), torch.tensor([[3], [37]])
    got, want = _compiled_and_eager(lambda x, ids: moe(x, ids), x, input_ids, backend=backend)
    scale = want.abs().max()
    tol = F32 if dtype == torch.float32 else dict(rtol=1.6e-2, atol=1e-2)
    torch.testing.assert_close(got / scale, want / scale, **tol)


def _stacked_fp8(weights):
    q, s = zip(*(ops.quantize_fp8(w, (128, 128)) for w in weights))
    return torch.stack(q), torch.stack(s)


@pytest.mark.parametrize("backend", BACKENDS)
def test_fp8_experts_may_break_the_graph_but_stay_right(backend):
    moe = _moe("topk", torch.float32)
    (qg, sg), (qd, sd) = _stacked_fp8(moe.experts.gate_up_proj.data), _stacked_fp8(moe.experts.down_proj.data)
    moe.set_expert_weights(qg, qd, sg, sd)
    x = _randn(2, 1, 64, seed=13)
    _assert_same(lambda x, ids: moe(x, ids), x, torch.tensor([[3], [37]]), backend=backend, fullgraph=False)


# Where a break must not start: the ops, the backends, and the model modules built on them here.
# (The attention layer and its cache are outside this file's subject.)
NO_BREAKS_IN = ("/ops/", "/backends/", "/model/rope.py", "/model/moe.py", "/model/hyper.py")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", ["tiny-v4", "tiny-v32"])
def test_tiny_decoder_layers_decode_step(backend, name):
    """Every layer of a tiny model (V4: sliding, CSA with the indexer, HCA, hash and top-k MoE;
    V3.2: MLA with the DSA indexer, dense and group-routed MoE layers) decodes one token compiled
    as it does eagerly, from caches an eager prefill filled."""
    from torch._dynamo.backends.debugging import ExplainWithBackend

    args = preset("tiny") if name == "tiny-v4" else TINY_V32
    model = build(args).init_random(seed=5)
    ids = torch.randint(0, args.vocab_size, (2, 14), generator=_g(6))
    with registry.forced(backend), torch.no_grad():
        cache = model.new_cache()
        model(ids[:, :-1], cache=cache)
        step_ids, positions = ids[:, -1:], torch.full((2, 1), ids.shape[1] - 1)
        h = model.model.embed_tokens(step_ids)
        if args.is_v4:
            h = expand_streams(h, args.hc_mult)
        for layer, layer_cache in zip(model.model.layers, cache.layers):
            want = layer(h, positions, step_ids, copy.deepcopy(layer_cache))
            explain = ExplainWithBackend("eager")
            got = torch.compile(layer, backend=explain, dynamic=False)(h, positions, step_ids, copy.deepcopy(layer_cache))
            torch.testing.assert_close(got, want, **F32)
            sites = [f"{r.user_stack[-1].filename}:{r.user_stack[-1].lineno} {r.reason.splitlines()[0]}"
                     for r in explain.break_reasons if r.user_stack]
            assert not [site for site in sites if any(part in site for part in NO_BREAKS_IN)], sites
            assert not [n for gm in explain.graphs for n in data_dependent(gm)]
            h = want
