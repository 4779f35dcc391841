"""moe_forward and model.moe.MoE: transformers' DeepseekV4SparseMoeBlock (hash and top-k layers) and
DeepseekV3MoE on the same weights, every backend against the float64 reference, quantized experts,
bad input."""

import pytest
import torch
import torch.nn.functional as F

from v4hal import ops
from v4hal.backends import registry
from v4hal.model.moe import MoE
from v4hal.ops._check import OpInputError

cuda_moe = registry.family_view("cuda", "moe")


def _randomize(module, seed, std=0.3):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, t in list(module.named_parameters()) + list(module.named_buffers()):
            if name.endswith("tid2eid"):
                t.copy_(torch.stack([torch.randperm(t.shape[1] * 4, generator=g)[: t.shape[1]] for _ in range(t.shape[0])]))
            elif t.is_floating_point():
                t.copy_(torch.randn(t.shape, generator=g) * (0.1 if "bias" in name else std))


def _v4_block(layer, experts=16, topk=4):
    from transformers.models.deepseek_v4.modeling_deepseek_v4 import DeepseekV4Config, DeepseekV4SparseMoeBlock

    cfg = DeepseekV4Config(hidden_size=64, moe_intermediate_size=32, n_routed_experts=experts,
                           num_experts_per_tok=topk, num_hidden_layers=2, mlp_layer_types=["hash_moe", "moe"],
                           vocab_size=40, swiglu_limit=0.6, routed_scaling_factor=1.5)
    block = DeepseekV4SparseMoeBlock(cfg, layer).float().requires_grad_(False)
    _randomize(block, seed=layer)
    return cfg, block


@pytest.mark.parametrize("layer", [0, 1], ids=["hash", "topk"])
def test_module_matches_deepseek_v4_block(layer):
    cfg, block = _v4_block(layer)
    ours = MoE(64, 32, 16, 1, 4, scoring_func="sqrtsoftplus", routed_scaling_factor=1.5, swiglu_limit=0.6,
               hash_vocab_size=40 if layer == 0 else None, dtype=torch.float32)
    ours.load_state_dict(block.state_dict(), strict=True)  # same tensor names, nothing left over
    x, input_ids = torch.randn(3, 5, 64), torch.randint(0, 40, (3, 5))
    ref = block(x, input_ids) if layer == 0 else block(x)
    out = ours(x, input_ids)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)


def test_module_matches_deepseek_v3_moe():
    from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3Config, DeepseekV3MoE

    cfg = DeepseekV3Config(hidden_size=64, moe_intermediate_size=32, n_routed_experts=32, num_experts_per_tok=4,
                           n_group=8, topk_group=3, n_shared_experts=2, routed_scaling_factor=2.5)
    block = DeepseekV3MoE(cfg).float().requires_grad_(False)
    _randomize(block, seed=7)
    ours = MoE(64, 32, 32, 2, 4, scoring_func="sigmoid", n_group=8, topk_group=3, routed_scaling_factor=2.5,
               dtype=torch.float32)
    ours.load_state_dict(block.state_dict(), strict=True)
    x = torch.randn(2, 9, 64)
    torch.testing.assert_close(ours(x), block(x), rtol=1e-5, atol=2e-5)


def _forward_args(g, dtype=torch.float64, hash_layer=False, tokens=11, experts=12):
    h, inter = 48, 32
    gate_up = torch.randn(experts, 2 * inter, h, generator=g) * 0.2
    down = torch.randn(experts, h, inter, generator=g) * 0.2
    kw = dict(scoring="sqrtsoftplus", routed_scaling_factor=1.5, swiglu_limit=0.8,
              shared=ops.SharedExpertWeights(*(torch.randn(s, generator=g).to(dtype) * 0.2
                                               for s in ((inter, h), (inter, h), (h, inter)))))
    if hash_layer:
        kw.update(input_ids=torch.randint(0, 20, (tokens,), generator=g),
                  tid2eid=torch.stack([torch.randperm(experts, generator=g)[:3] for _ in range(20)]))
    else:
        kw.update(bias=torch.randn(experts, generator=g) * 0.1)
    x = torch.randn(tokens, h, generator=g).to(dtype)
    return x, torch.randn(experts, h, generator=g).to(dtype), ops.ExpertWeights(gate_up.to(dtype), down.to(dtype)), kw


@pytest.mark.parametrize("hash_layer", [False, True], ids=["topk", "hash"])
@pytest.mark.parametrize("backend", ["cpu_fast", "mindspore"])
def test_backends_match_reference(backend, hash_layer):
    x, gate, experts, kw = _forward_args(torch.Generator().manual_seed(11), hash_layer=hash_layer)
    ref = ops.moe_forward(x, gate, experts, 3, **kw)
    with registry.forced(backend):
        out = ops.moe_forward(x, gate, experts, 3, **kw)
    torch.testing.assert_close(out, ref, rtol=1e-6, atol=1e-8)


@pytest.mark.parametrize("hash_layer", [False, True], ids=["topk", "hash"])
@pytest.mark.parametrize("tokens", [1, 2, 3])
def test_decode_sized_fast_path_matches_reference(tokens, hash_layer):
    """Up to FEW_ROWS (token, expert) pairs cpu_fast runs each chosen expert directly (3 tokens x
    top-3 is past it and takes the sorted path); float64 and bf16 against the reference."""
    for dtype, tol in ((torch.float64, 1e-12), (torch.bfloat16, 1.6e-2)):
        x, gate, experts, kw = _forward_args(torch.Generator().manual_seed(tokens), dtype=dtype, hash_layer=hash_layer,
                                             tokens=tokens)
        ref = ops.moe_forward(x, gate, experts, 3, **kw)
        with registry.forced("cpu_fast"):
            out = ops.moe_forward(x, gate, experts, 3, **kw)
        assert out.dtype == dtype and out.shape == x.shape
        torch.testing.assert_close(out.double(), ref.double(), rtol=tol, atol=tol)


def test_cuda_forward_code_path_exercised_on_cpu():
    # The cuda module's own functions, called directly on CPU BF16 tensors (torch._grouped_mm runs).
    x, gate, experts, kw = _forward_args(torch.Generator().manual_seed(12), dtype=torch.bfloat16, tokens=64)
    w, ids = cuda_moe.moe_route(x, gate, 3, "sqrtsoftplus", kw["bias"], 1, 1, True, 1.5, None, None)
    d = cuda_moe.moe_dispatch(x, ids, 12, None)
    up = cuda_moe.grouped_matmul(d.permuted, experts.gate_up, d.offsets, None, "dense", "fp32")
    y = cuda_moe.grouped_matmul(cuda_moe.swiglu(up, 0.8), experts.down, d.offsets, None, "dense", "fp32")
    out = cuda_moe.moe_combine(y, w, d)
    kw.pop("shared")
    with registry.forced("cpu"):
        ref = ops.moe_forward(x.double(), gate.double(), ops.ExpertWeights(*(t.double() for t in experts[:2])), 3,
                              **{k: (v.double() if isinstance(v, torch.Tensor) and v.is_floating_point() else v)
                                 for k, v in kw.items()})
    torch.testing.assert_close(out.double(), ref, rtol=1.6e-2, atol=2e-2)


def test_bf16_fast_path_within_bf16_tolerance_of_float64_reference():
    x, gate, experts, kw = _forward_args(torch.Generator().manual_seed(13), dtype=torch.bfloat16, tokens=32)
    with registry.forced("cpu_fast"):
        out = ops.moe_forward(x, gate, experts, 3, **kw)
    up = lambda v: v.double() if isinstance(v, torch.Tensor) and v.is_floating_point() else v  # noqa: E731
    ref = ops.moe_forward(up(x), up(gate), ops.ExpertWeights(*(up(t) for t in experts)), 3,
                          **{k: (ops.SharedExpertWeights(*(up(t) for t in v)) if k == "shared" else up(v))
                             for k, v in kw.items()})
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.double(), ref, rtol=1.6e-2, atol=2e-2)


def _stack_quantized(fmt, w):
    if fmt == "fp8":
        parts = [ops.quantize_fp8(e, (128, 128)) for e in w]
    elif fmt == "fp4":
        parts = [ops.quantize_fp4(e) for e in w]
    else:
        parts = [ops.quantize_int8(e) for e in w]
    return torch.stack([p[0] for p in parts]), torch.stack([p[1] for p in parts])


def _dequantized(fmt, q, s):
    if fmt == "fp8":
        return torch.stack([ops.dequantize_fp8(a, b, out_dtype=torch.float32) for a, b in zip(q, s)])
    if fmt == "fp4":
        return torch.stack([ops.dequantize_fp4(a, b, out_dtype=torch.float32) for a, b in zip(q, s)])
    return q.float() * s.unsqueeze(-1)


@pytest.mark.parametrize("fmt", ["fp8", "fp4", "int8"])
def test_quantized_experts_in_module(fmt):
    torch.manual_seed(3)
    moe = MoE(128, 128, 8, 1, 2, scoring_func="sigmoid", n_group=2, topk_group=1, routed_scaling_factor=2.5,
              dtype=torch.float32)
    _randomize(moe, seed=3, std=0.1)
    x = torch.randn(2, 6, 128)
    gu, dn = moe.experts.gate_up_proj.data.clone(), moe.experts.down_proj.data.clone()
    (qg, sg), (qd, sd) = _stack_quantized(fmt, gu), _stack_quantized(fmt, dn)
    # The same layer with the dequantized weights in float: what the quantized layer approximates
    # (FP4 is weight-only, so there it is the exact same product).
    with registry.forced("cpu"):
        moe.set_expert_weights(_dequantized(fmt, qg, sg), _dequantized(fmt, qd, sd))
        dense = moe(x)
        moe.set_expert_weights(qg, qd, sg, sd)
        assert f"format={fmt}" in repr(moe)
        out = moe(x)
    if fmt == "fp4":
        torch.testing.assert_close(out, dense, rtol=1e-4, atol=1e-5)
    else:  # activations quantized per 1x128 block (FP8) or per token (int8)
        diff = 1 - 2 * (out * dense).sum() / ((out * out).sum() + (dense * dense).sum())
        assert float(diff) < 1e-3, float(diff)


def _fp8_layer(scale_fmt):
    """A MoE layer whose routed and shared experts are FP8, activations scaled in scale_fmt."""
    torch.manual_seed(3)
    moe = MoE(128, 128, 8, 1, 2, scoring_func="sigmoid", n_group=2, topk_group=1, dtype=torch.float32)
    _randomize(moe, seed=3, std=0.1)
    gu, dn = moe.experts.gate_up_proj.data.clone(), moe.experts.down_proj.data.clone()
    (qg, sg), (qd, sd) = _stack_quantized("fp8", gu), _stack_quantized("fp8", dn)
    moe.set_expert_weights(qg, qd, sg, sd)
    moe.experts.act_scale_fmt = scale_fmt
    for lin in (moe.shared_experts.gate_proj, moe.shared_experts.up_proj, moe.shared_experts.down_proj):
        q, s = ops.quantize_fp8(lin.weight.data, (128, 128))
        lin.weight, lin.weight_scale_inv = torch.nn.Parameter(q, requires_grad=False), s
        lin.act_scale_fmt = scale_fmt
    return moe


@pytest.mark.parametrize("backend", ["cpu", "cpu_fast", "mindspore"])
def test_fp8_layer_scales_every_activation_as_told(backend, fp8_scale_fmts):
    x = torch.randn(2, 6, 128, generator=torch.Generator().manual_seed(8))
    out = {}
    for fmt in ("fp32", "ue8m0"):
        moe = _fp8_layer(fmt)
        with registry.forced("cpu"):
            expected = moe(x)
        fp8_scale_fmts.clear()
        with registry.forced(backend):
            out[fmt] = moe(x)
        assert fp8_scale_fmts and set(fp8_scale_fmts) == {fmt}  # shared expert's three products (+ the routed ones off mindspore)
        if backend == "mindspore":  # its routed experts round to e4m3 by arithmetic: ties may round apart
            assert 1 - F.cosine_similarity(out[fmt].flatten(), expected.flatten(), dim=0) < 1e-6
        else:
            torch.testing.assert_close(out[fmt], expected, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(out["fp32"], out["ue8m0"], rtol=1e-4, atol=1e-5)


def test_bad_inputs():
    x, gate, experts, kw = _forward_args(torch.Generator().manual_seed(14))
    cases = [("gate_up", dict(experts=ops.ExpertWeights(experts.gate_up[:, :, :40], experts.down))),
             ("down", dict(experts=ops.ExpertWeights(experts.gate_up, experts.down[:, :40]))),
             ("down", dict(experts=ops.ExpertWeights(experts.gate_up, experts.down[:5]))),
             ("gate_weight", dict(gate_weight=gate[:5])),
             ("gate_up_scale", dict(experts=ops.ExpertWeights(experts.gate_up.to(torch.float8_e4m3fn), experts.down))),
             ("experts", dict(experts=(experts.gate_up, experts.down))),
             ("experts.act_scale_fmt", dict(experts=experts._replace(act_scale_fmt="ue8"))),
             ("shared.act_scale_fmt", dict(shared=kw["shared"]._replace(act_scale_fmt=None))),
             ("swiglu_limit", dict(swiglu_limit=-2.0))]
    for arg, change in cases:
        args = dict(hidden=x, gate_weight=gate, experts=experts, topk=3, **kw)
        args.update(change)
        with pytest.raises(OpInputError) as err:
            ops.moe_forward(**args)
        assert err.value.op == "moe_forward" and err.value.arg == arg, str(err.value)
    with pytest.raises(OpInputError, match="moe_forward.*topk"):
        ops.moe_forward(x, gate, experts, 13, **kw)
    hash_layer = MoE(16, 8, 4, 0, 2, hash_vocab_size=10, dtype=torch.float32)
    with pytest.raises(ValueError, match="input_ids"):
        hash_layer(torch.randn(2, 16))
    with pytest.raises(ValueError, match="scoring_func"):
        MoE(16, 8, 4, 0, 2, scoring_func="tanh")


def test_module_runs_every_registered_backend_choice_here():
    moe = MoE(32, 16, 8, 1, 2, dtype=torch.float32)
    _randomize(moe, seed=5)
    x = torch.randn(5, 32)
    ref = moe(x.double().float())
    for backend in ("cpu", "cpu_fast"):
        with registry.forced(backend):
            torch.testing.assert_close(moe(x), ref, rtol=1e-5, atol=1e-6)
    assert F.cosine_similarity(ref.flatten(), moe(x).flatten(), dim=0) > 0.999


def test_from_config_reads_model_args():
    from v4hal.model import config

    v4 = config.preset("tiny")
    hash_layer = next(i for i, t in enumerate(v4.mlp_layer_types) if t == "hash_moe")
    topk_layer = next(i for i, t in enumerate(v4.mlp_layer_types) if t == "moe")
    h, t = MoE.from_config(v4, hash_layer, device="meta"), MoE.from_config(v4, topk_layer, device="meta")
    assert h.is_hash and tuple(h.gate.tid2eid.shape) == (v4.vocab_size, v4.num_experts_per_tok)
    assert not t.is_hash and t.gate.e_score_correction_bias.dtype == torch.float32
    assert t.swiglu_limit == v4.swiglu_limit and t.norm_topk_prob
    v32 = MoE.from_config(config.preset("v3.2"), 5, device="meta")
    assert (v32.n_group, v32.topk_group, v32.swiglu_limit, v32.scoring_func) == (8, 4, None, "sigmoid")
    assert tuple(v32.experts.gate_up_proj.shape) == (256, 2 * 2048, 7168)
    assert v32.experts.weights().act_scale_fmt == v32.shared_experts.weights().act_scale_fmt == "ue8m0"
    assert t.experts.weights().act_scale_fmt == "fp32"
