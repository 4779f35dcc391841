"""moe_route: hand-checked cases in float64, transformers' routers on the same weights, every
backend against the reference, ties, bad input and properties."""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from v4hal import ops
from v4hal.backends import registry
from v4hal.ops._check import OpInputError

cuda_moe = registry.family_view("cuda", "moe")


def route(logits, topk, **kw):
    """Route with gate = identity, so the logits are the hidden states themselves."""
    logits = torch.as_tensor(logits, dtype=torch.float64)
    return ops.moe_route(logits, torch.eye(logits.shape[-1], dtype=torch.float64), topk, **kw)


def by_id(weights, ids):
    """Rows sorted by expert id, so results compare independent of the top-k order."""
    ids_sorted, perm = ids.sort(dim=-1)
    return weights.gather(1, perm), ids_sorted


def test_softmax_renormalized_by_hand():
    w, ids = route([[1.0, 3.0, 2.0, 0.0]], 2, scoring="softmax")
    assert ids.tolist() == [[1, 2]]
    e = [math.exp(v) for v in (1.0, 3.0, 2.0, 0.0)]
    expected = [e[1] / (e[1] + e[2]), e[2] / (e[1] + e[2])]
    assert torch.allclose(w, torch.tensor([expected], dtype=torch.float64), atol=1e-15)
    assert w.dtype == torch.float64 and ids.dtype == torch.int64


def test_softmax_unnormalized_with_scaling():
    w, ids = route([[1.0, 3.0, 2.0, 0.0]], 2, scoring="softmax", renormalize=False, routed_scaling_factor=2.5)
    total = sum(math.exp(v) for v in (1.0, 3.0, 2.0, 0.0))
    assert torch.allclose(w, 2.5 * torch.tensor([[math.exp(3) / total, math.exp(2) / total]], dtype=torch.float64))


def test_sigmoid_bias_steers_choice_not_weight():
    logits = [[2.0, 1.0, 0.0, -1.0]]
    bias = torch.tensor([0.0, 0.0, 5.0, 0.0], dtype=torch.float64)
    w, ids = route(logits, 2, scoring="sigmoid", bias=bias, renormalize=False)
    assert ids.tolist() == [[2, 0]]  # expert 2 wins only through its bias
    s = lambda v: 1 / (1 + math.exp(-v))  # noqa: E731
    assert torch.allclose(w, torch.tensor([[s(0.0), s(2.0)]], dtype=torch.float64))


def test_sqrtsoftplus_scores():
    w, ids = route([[0.5, -2.0, 1.5]], 1, scoring="sqrtsoftplus", renormalize=False)
    assert ids.tolist() == [[2]]
    assert math.isclose(w.item(), math.sqrt(math.log1p(math.exp(1.5))), rel_tol=1e-14)


def test_group_limited_by_hand():
    # 8 experts in 4 groups of 2, keep the best 2 groups. Max-scored groups (no bias): group 3 has
    # the best single expert, group 1 the second; group 0 holds the 2nd-best expert overall but
    # its group max (0.8) loses to group 1 (0.85).
    logits = torch.tensor([[0.8, 0.1, 0.85, 0.0, -1.0, -1.0, 0.9, -5.0]])
    _, ids = route(logits, 2, scoring="sigmoid", n_group=4, topk_group=2, renormalize=False)
    assert sorted(ids[0].tolist()) == [2, 6]
    # With a (zero) bias the group score is the top-2 sum of sigmoids: groups 0 (0.69 + 0.52) and
    # 1 (0.70 + 0.50) beat group 3 (0.71 + 0.01), so expert 6, the best overall, is out.
    _, ids = route(logits, 2, scoring="sigmoid", n_group=4, topk_group=2, bias=torch.zeros(8, dtype=torch.float64))
    assert sorted(ids[0].tolist()) == [0, 2]


def test_hash_routing_uses_table_and_scores():
    tid2eid = torch.tensor([[0, 1], [3, 2], [2, 0]])
    logits = torch.tensor([[[0.0, 1.0, 2.0, 3.0], [1.0, 1.0, 1.0, 1.0]]], dtype=torch.float64)
    w, ids = ops.moe_route(logits, torch.eye(4, dtype=torch.float64), 2, scoring="sqrtsoftplus",
                           input_ids=torch.tensor([[1, 2]]), tid2eid=tid2eid, routed_scaling_factor=1.5)
    assert ids.tolist() == [[3, 2], [2, 0]]
    sp = lambda v: math.sqrt(math.log1p(math.exp(v)))  # noqa: E731
    row0 = [sp(3.0), sp(2.0)]
    assert torch.allclose(w[0], 1.5 * torch.tensor(row0, dtype=torch.float64) / sum(row0))
    assert torch.allclose(w[1], torch.tensor([0.75, 0.75], dtype=torch.float64))


def test_ties_pick_k_distinct_experts_with_equal_weights():
    w, ids = route(torch.zeros(3, 8), 3, scoring="softmax")
    assert all(len(set(r)) == 3 for r in ids.tolist())
    assert torch.allclose(w, torch.full((3, 3), 1 / 3, dtype=torch.float64))


# --- transformers' routers on the same weights ------------------------------------------------

def _v4_config(**kw):
    from transformers.models.deepseek_v4.modeling_deepseek_v4 import DeepseekV4Config

    return DeepseekV4Config(hidden_size=32, moe_intermediate_size=16, n_routed_experts=16, num_experts_per_tok=4,
                            num_hidden_layers=2, mlp_layer_types=["hash_moe", "moe"], vocab_size=50, **kw)


# transformers 5.23's ACT2FN has no "softmax", so its V4 router only builds with these two.
@pytest.mark.parametrize("scoring", ["sqrtsoftplus", "sigmoid"])
def test_matches_deepseek_v4_topk_router(scoring):
    from transformers.models.deepseek_v4.modeling_deepseek_v4 import DeepseekV4TopKRouter

    torch.manual_seed(0)
    router = DeepseekV4TopKRouter(_v4_config(scoring_func=scoring)).requires_grad_(False)
    router.weight.normal_(0, 0.5)
    router.e_score_correction_bias.normal_(0, 0.2)
    x = torch.randn(3, 5, 32)
    _, ref_w, ref_ids = router(x)
    w, ids = ops.moe_route(x, router.weight, 4, scoring=scoring, bias=router.e_score_correction_bias,
                           routed_scaling_factor=router.routed_scaling_factor)
    (rw, rids), (ow, oids) = by_id(ref_w, ref_ids), by_id(w, ids)
    assert torch.equal(rids, oids)
    torch.testing.assert_close(ow, rw)


def test_matches_deepseek_v4_hash_router():
    from transformers.models.deepseek_v4.modeling_deepseek_v4 import DeepseekV4HashRouter

    torch.manual_seed(1)
    router = DeepseekV4HashRouter(_v4_config()).requires_grad_(False)
    router.weight.normal_(0, 0.5)
    router.tid2eid.copy_(torch.stack([torch.randperm(16)[:4] for _ in range(50)]))
    x, input_ids = torch.randn(2, 6, 32), torch.randint(0, 50, (2, 6))
    _, ref_w, ref_ids = router(x, input_ids)
    w, ids = ops.moe_route(x, router.weight, 4, scoring="sqrtsoftplus", input_ids=input_ids,
                           tid2eid=router.tid2eid, routed_scaling_factor=router.routed_scaling_factor)
    assert torch.equal(ids, ref_ids)
    torch.testing.assert_close(w, ref_w)


@pytest.mark.parametrize("norm_topk_prob", [True, False])
def test_matches_deepseek_v3_grouped_router(norm_topk_prob):
    from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3Config, DeepseekV3TopkRouter

    torch.manual_seed(2)
    cfg = DeepseekV3Config(hidden_size=32, n_routed_experts=32, num_experts_per_tok=4, n_group=8, topk_group=3,
                           routed_scaling_factor=2.5, norm_topk_prob=norm_topk_prob)
    router = DeepseekV3TopkRouter(cfg).requires_grad_(False)
    router.weight.normal_(0, 0.5)
    router.e_score_correction_bias.normal_(0, 0.3)
    x = torch.randn(4, 7, 32)
    _, ref_w, ref_ids = router(x)
    w, ids = ops.moe_route(x, router.weight, 4, scoring="sigmoid", bias=router.e_score_correction_bias,
                           n_group=8, topk_group=3, renormalize=norm_topk_prob, routed_scaling_factor=2.5)
    (rw, rids), (ow, oids) = by_id(ref_w, ref_ids), by_id(w, ids)
    assert torch.equal(rids, oids)
    torch.testing.assert_close(ow, rw)


# --- backends against the reference ------------------------------------------------------------

ROUTE_SETTINGS = [dict(scoring="sqrtsoftplus", bias=True), dict(scoring="sigmoid", bias=True, n_group=4, topk_group=2),
                  dict(scoring="softmax"), dict(scoring="sqrtsoftplus", hash=True)]


def _route_inputs(setting, g):
    x, gate = torch.randn(9, 24, generator=g), torch.randn(16, 24, generator=g)
    kw = {k: v for k, v in setting.items() if k not in ("bias", "hash")}
    if setting.get("bias"):
        kw["bias"] = torch.randn(16, generator=g) * 0.1
    if setting.get("hash"):
        kw["input_ids"] = torch.randint(0, 30, (9,), generator=g)
        kw["tid2eid"] = torch.stack([torch.randperm(16, generator=g)[:4] for _ in range(30)])
    return x, gate, kw


@pytest.mark.parametrize("setting", ROUTE_SETTINGS, ids=lambda s: "-".join(f"{k}" for k in s))
@pytest.mark.parametrize("backend", ["cpu_fast", "mindspore"])
def test_backend_matches_reference(setting, backend):
    x, gate, kw = _route_inputs(setting, torch.Generator().manual_seed(3))
    with registry.forced("cpu"):
        ref_w, ref_ids = ops.moe_route(x, gate, 4, **kw)
    with registry.forced(backend):
        w, ids = ops.moe_route(x, gate, 4, **kw)
    (rw, rids), (ow, oids) = by_id(ref_w, ref_ids), by_id(w, ids)
    assert torch.equal(rids, oids.long())
    torch.testing.assert_close(ow.float(), rw, rtol=1e-5, atol=1e-6)


def test_cuda_route_code_path_exercised_on_cpu():
    x, gate, kw = _route_inputs(ROUTE_SETTINGS[1], torch.Generator().manual_seed(4))
    ref = ops.moe_route(x, gate, 4, **kw)
    bias = kw.pop("bias")
    out = cuda_moe.moe_route(x, gate, 4, kw["scoring"], bias, kw["n_group"], kw["topk_group"], True, 1.0, None, None)
    assert torch.equal(out[1], ref[1]) and torch.equal(out[0], ref[0])


# --- bad input ---------------------------------------------------------------------------------

def _bad(arg, **kw):
    base = dict(hidden=torch.randn(4, 8), gate_weight=torch.randn(6, 8), topk=2)
    base.update(kw)
    with pytest.raises(OpInputError) as err:
        ops.moe_route(**base)
    assert err.value.op == "moe_route" and err.value.arg == arg, str(err.value)
    assert "moe_route" in str(err.value) and arg in str(err.value)


def test_bad_inputs():
    _bad("topk", topk=7)
    _bad("n_group", n_group=4)
    _bad("topk_group", n_group=3, topk_group=4)
    _bad("topk", topk=5, n_group=3, topk_group=2)
    _bad("scoring", scoring="relu")
    _bad("hidden", hidden=torch.randint(0, 3, (4, 8)))
    _bad("gate_weight", gate_weight=torch.randn(6, 9))
    _bad("bias", bias=torch.zeros(5))
    table = torch.randint(0, 6, (10, 2))
    _bad("input_ids", input_ids=torch.tensor([0, 1, 2, 10]), tid2eid=table)
    _bad("input_ids", input_ids=torch.tensor([0, 1, 2]), tid2eid=table)
    _bad("input_ids", input_ids=torch.tensor([0.0, 1, 2, 3]), tid2eid=table)
    _bad("tid2eid", input_ids=torch.tensor([0, 1, 2, 3]), tid2eid=torch.randint(0, 6, (10, 3)))
    _bad("tid2eid", input_ids=torch.tensor([0, 1, 2, 3]), tid2eid=torch.full((10, 2), 6))
    _bad("tid2eid", input_ids=torch.tensor([0, 1, 2, 3]))
    _bad("input_ids", tid2eid=table)


# --- properties --------------------------------------------------------------------------------

@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 2**16), groups=st.sampled_from([(1, 1), (4, 2), (8, 3)]),
       scoring=st.sampled_from(["softmax", "sigmoid", "sqrtsoftplus"]), scale=st.floats(0.5, 3.0))
def test_route_properties(seed, groups, scoring, scale):
    g = torch.Generator().manual_seed(seed)
    n_group, topk_group = groups
    x, gate, bias = torch.randn(5, 12, generator=g), torch.randn(32, 12, generator=g), torch.randn(32, generator=g)
    w, ids = ops.moe_route(x, gate, 3, scoring=scoring, bias=bias, n_group=n_group, topk_group=topk_group,
                           routed_scaling_factor=scale)
    assert all(len(set(r)) == 3 for r in ids.tolist())
    torch.testing.assert_close(w.sum(-1), torch.full((5,), scale))
    assert bool((w > 0).all())
    used_groups = ids // (32 // n_group)
    assert all(len(set(r)) <= topk_group for r in used_groups.tolist())
