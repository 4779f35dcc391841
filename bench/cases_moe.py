"""Parity and speed cases for the MoE family.

Routing runs at the real V4-Flash / V4-Pro / V3.2 shapes (hidden size, all 256 / 384 experts,
top-6 / top-8, V3.2's 8 groups keeping 4, V4's hash layers); expert GEMMs and the whole layer run
at the real hidden and expert widths with fewer experts (all of them would not fit in the ~3 GB a
case may use), in BF16, FP8, MXFP4 and int8. Small `quick` cases cover routing ties, experts that
receive no token and capacity drops. The speed case for the layer times transformers'
`DeepseekV4SparseMoeBlock` on the same weights in the same run.
"""

from __future__ import annotations

import torch

from v4hal import ops
from v4hal.bench.cases import SHAPES, Case, SpeedCase, Tolerance, randn

EXACT = Tolerance("exact")
ROUTE_TOL = {"weights": Tolerance("close", rtol=1e-4, atol=1e-6), "ids": EXACT}


def _by_id(out):
    """(weights, ids) rows sorted by expert id: backends may list the top-k in any order."""
    weights, ids = out
    ids_sorted, perm = ids.long().sort(dim=-1)
    return {"weights": weights.gather(1, perm), "ids": ids_sorted}


def _route_inputs(tokens, hidden, experts, topk, scoring, bias=True, n_group=1, topk_group=1, scale=1.0,
                  hash_vocab=0, ties=False):
    def make(g):
        x = randn(g, tokens, hidden, dtype=torch.bfloat16)
        gate = randn(g, experts, hidden, dtype=torch.bfloat16, scale=hidden ** -0.5)
        if ties:  # pairs of identical experts: equal scores everywhere
            gate = gate[: experts // 2].repeat_interleave(2, dim=0)
        kw = dict(hidden=x, gate_weight=gate, topk=topk, scoring=scoring, n_group=n_group, topk_group=topk_group,
                  routed_scaling_factor=scale)
        if hash_vocab:
            kw["input_ids"] = torch.randint(0, hash_vocab, (tokens,), generator=g)
            kw["tid2eid"] = torch.stack([torch.randperm(experts, generator=g)[:topk] for _ in range(hash_vocab)])
        elif bias:
            kw["bias"] = randn(g, experts, scale=0.01)
        return kw

    return make


def _tied_route_check(ref, out, inputs):
    """With duplicated experts any member of a tied pair may be picked: compare the pairs."""
    same = torch.equal(ref["ids"] // 2, out["ids"] // 2)
    return same, "" if same else "top-k differs beyond tied expert pairs"


def _tie_compare(out):
    got = _by_id(out)
    return {"weights": got["weights"], "ids": got["ids"] // 2 * 2}


V4F, V4P, V32 = SHAPES["v4-flash"], SHAPES["v4-pro"], SHAPES["v3.2"]

ROUTE_CASES = [
    ("small/sqrtsoftplus-bias", _route_inputs(8, 64, 16, 4, "sqrtsoftplus", scale=1.5), True),
    ("small/sigmoid-groups", _route_inputs(8, 64, 32, 8, "sigmoid", n_group=8, topk_group=4, scale=2.5), True),
    ("small/softmax-nobias", _route_inputs(8, 64, 16, 2, "softmax", bias=False), True),
    ("small/hash", _route_inputs(8, 64, 16, 4, "sqrtsoftplus", hash_vocab=50, scale=1.5), True),
    ("v4-flash/topk", _route_inputs(64, V4F["hidden"], V4F["experts"], V4F["topk"], "sqrtsoftplus", scale=1.5), False),
    ("v4-flash/hash", _route_inputs(64, V4F["hidden"], V4F["experts"], V4F["topk"], "sqrtsoftplus", scale=1.5,
                                    hash_vocab=V4F["vocab"]), False),
    ("v4-pro/topk", _route_inputs(64, V4P["hidden"], V4P["experts"], V4P["topk"], "sqrtsoftplus", scale=2.5), False),
    ("v3.2/groups", _route_inputs(64, V32["hidden"], V32["experts"], V32["topk"], "sigmoid", n_group=V32["n_group"],
                                  topk_group=V32["topk_group"], scale=V32["route_scale"]), False),
]

PARITY = [Case("moe_route", name, ops.moe_route, make, ROUTE_TOL, quick=quick, compare=_by_id)
          for name, make, quick in ROUTE_CASES]
PARITY.append(Case("moe_route", "small/ties", ops.moe_route,
                   _route_inputs(8, 64, 16, 4, "sigmoid", bias=False, ties=True),
                   ROUTE_TOL, quick=True, compare=_tie_compare, check=_tied_route_check))


def _dispatch_inputs(tokens, hidden, experts, topk, capacity=None, idle=0):
    """Random top-k ids; the last `idle` experts receive no token."""
    def make(g):
        ids = torch.stack([torch.randperm(experts - idle, generator=g)[:topk] for _ in range(tokens)])
        return dict(hidden=randn(g, tokens, hidden, dtype=torch.bfloat16), topk_ids=ids, num_experts=experts,
                    capacity=capacity)

    return make


def _dispatch_outputs(d):
    return {"permuted": d.permuted, "counts": d.counts, "offsets": d.offsets, "token_index": d.token_index,
            "row_of_slot": d.row_of_slot}


PARITY += [Case("moe_dispatch", name, ops.moe_dispatch, make, EXACT, quick=quick, compare=_dispatch_outputs)
           for name, make, quick in [
               ("small/idle-experts", _dispatch_inputs(12, 32, 16, 4, idle=6), True),
               ("small/capacity", _dispatch_inputs(12, 32, 8, 4, capacity=5), True),
               ("v4-flash", _dispatch_inputs(128, V4F["hidden"], V4F["experts"], V4F["topk"]), False),
               ("v3.2", _dispatch_inputs(128, V32["hidden"], V32["experts"], V32["topk"]), False)]]


def _quantize_experts(fmt, w):
    parts = []
    for e in w:
        if fmt == "fp8":
            parts.append(ops.quantize_fp8(e, (128, 128)))
        elif fmt == "fp4":  # V4 checkpoints store the ue8m0 exponents as float8_e8m0fnu
            q, s = ops.quantize_fp4(e)
            parts.append((q, s.to(torch.float8_e8m0fnu)))
        else:
            parts.append(ops.quantize_int8(e))
    return torch.stack([p[0] for p in parts]), torch.stack([p[1] for p in parts])


def _gmm_inputs(counts, n, k, fmt="dense", dtype=torch.bfloat16):
    def make(g):
        offsets = torch.tensor([0] + list(counts)).cumsum(0)
        w = randn(g, len(counts), n, k, scale=k ** -0.5)
        scale = None
        if fmt == "dense":
            w = w.to(dtype)
        else:
            w, scale = _quantize_experts(fmt, w)
        return dict(x=randn(g, sum(counts), k, dtype=dtype), weight=w, group_offsets=offsets, scale=scale)

    return make


def _gmm_tolerance(fmt, k):
    return Tolerance("fp8", diff=2e-3) if fmt in ("fp8", "int8") else Tolerance.for_dtype(torch.bfloat16, k)


GMM_CASES = [("small/dense-empty-experts", (3, 0, 5, 0, 8), 64, 128, "dense", True),
             ("small/fp8", (4, 0, 6), 128, 256, "fp8", True),
             ("small/fp4", (4, 0, 6), 64, 128, "fp4", True),
             # fewer rows than experts (decode): a backend may touch only the experts that have rows
             ("small/fp8-few-rows", (0, 2, 0, 0, 1, 0, 0, 0), 128, 256, "fp8", True),
             ("small/fp4-few-rows", (0, 0, 1, 0, 0, 2, 0, 0), 64, 128, "fp4", True),
             ("small/int8", (4, 0, 6), 64, 128, "int8", True),
             ("v4-flash/up-bf16", (12, 0, 30, 6), 2 * V4F["moe_inter"], V4F["hidden"], "dense", False),
             ("v4-flash/down-bf16", (12, 0, 30, 6), V4F["hidden"], V4F["moe_inter"], "dense", False),
             ("v4-flash/up-fp4", (12, 0, 30, 6), 2 * V4F["moe_inter"], V4F["hidden"], "fp4", False),
             ("v4-pro/up-fp4", (9, 3), 2 * V4P["moe_inter"], V4P["hidden"], "fp4", False),
             ("v3.2/up-fp8", (12, 0, 20), 2 * V32["moe_inter"], V32["hidden"], "fp8", False),
             ("v3.2/down-int8", (12, 0, 20), V32["hidden"], V32["moe_inter"], "int8", False)]

PARITY += [Case("grouped_matmul", name, ops.grouped_matmul, _gmm_inputs(counts, n, k, fmt), _gmm_tolerance(fmt, k),
                quick=quick) for name, counts, n, k, fmt, quick in GMM_CASES]


def _swiglu_inputs(rows, width, limit):
    return lambda g: dict(gate_up=randn(g, rows, 2 * width, dtype=torch.bfloat16, scale=4.0), limit=limit)


PARITY += [Case("swiglu", name, ops.swiglu, _swiglu_inputs(rows, width, limit), Tolerance.for_dtype(torch.bfloat16),
                quick=quick) for name, rows, width, limit, quick in [
               ("small/clamped", 16, 64, 10.0, True), ("small/plain", 16, 64, None, True),
               ("v4-flash", 256, V4F["moe_inter"], 10.0, False), ("v4-pro", 256, V4P["moe_inter"], 10.0, False)]]


def _combine(expert_out, topk_weights, topk_ids, num_experts, capacity):
    """moe_combine over the dispatch of `topk_ids` (the rows themselves come from `expert_out`)."""
    tokens = torch.zeros(topk_ids.shape[0], 1, device=expert_out.device)
    return ops.moe_combine(expert_out, topk_weights, ops.moe_dispatch(tokens, topk_ids, num_experts, capacity))


def _combine_inputs(tokens, hidden, experts, topk, capacity=None):
    def make(g):
        ids = torch.stack([torch.randperm(experts, generator=g)[:topk] for _ in range(tokens)])
        rows = int(ops.moe_dispatch(torch.zeros(tokens, 1), ids, experts, capacity).token_index.shape[0])
        return dict(expert_out=randn(g, rows, hidden, dtype=torch.bfloat16), topk_weights=torch.rand(tokens, topk, generator=g),
                    topk_ids=ids, num_experts=experts, capacity=capacity)

    return make


PARITY += [Case("moe_combine", name, _combine, make, Tolerance("close", rtol=1.6e-2, atol=1e-2), quick=quick)
           for name, make, quick in [("small", _combine_inputs(12, 32, 8, 3), True),
                                     ("small/capacity", _combine_inputs(12, 32, 4, 3, capacity=6), True),
                                     ("v4-flash", _combine_inputs(128, V4F["hidden"], V4F["experts"], V4F["topk"]), False)]]


def _forward_inputs(tokens, hidden, inter, experts, topk, scoring, fmt="dense", n_group=1, topk_group=1, scale=1.0,
                    limit=None, hash_vocab=0):
    def make(g):
        route = _route_inputs(tokens, hidden, experts, topk, scoring, n_group=n_group, topk_group=topk_group,
                              scale=scale, hash_vocab=hash_vocab)(g)
        gate_up = randn(g, experts, 2 * inter, hidden, scale=hidden ** -0.5)
        down = randn(g, experts, hidden, inter, scale=inter ** -0.5)
        if fmt == "dense":
            experts_w = ops.ExpertWeights(gate_up.bfloat16(), down.bfloat16())
        else:
            (qg, sg), (qd, sd) = _quantize_experts(fmt, gate_up), _quantize_experts(fmt, down)
            experts_w = ops.ExpertWeights(qg, qd, sg, sd)
        shared = ops.SharedExpertWeights(randn(g, inter, hidden, dtype=torch.bfloat16, scale=hidden ** -0.5),
                                         randn(g, inter, hidden, dtype=torch.bfloat16, scale=hidden ** -0.5),
                                         randn(g, hidden, inter, dtype=torch.bfloat16, scale=inter ** -0.5))
        return dict(route, experts=experts_w, swiglu_limit=limit, shared=shared)

    return make


def _forward_reference_inputs(inputs):
    """Float tensors to float64, inside the weight tuples too (quantized ones stay as they are)."""
    up = lambda v: v.double() if isinstance(v, torch.Tensor) and v.dtype in (torch.bfloat16, torch.float32) else v  # noqa: E731
    out = {k: up(v) for k, v in inputs.items()}
    out["experts"] = ops.ExpertWeights(*(up(t) for t in inputs["experts"]))
    out["shared"] = ops.SharedExpertWeights(*(up(t) for t in inputs["shared"]))
    return out


def _forward_tolerance(fmt):
    return Tolerance("fp8", diff=2e-3) if fmt in ("fp8", "int8") else Tolerance("close", rtol=1.6e-2, atol=2e-2)


FORWARD_CASES = [
    ("small/v4-topk", dict(tokens=16, hidden=64, inter=32, experts=16, topk=4, scoring="sqrtsoftplus", scale=1.5, limit=10.0), True),
    ("small/v4-hash", dict(tokens=16, hidden=64, inter=32, experts=16, topk=4, scoring="sqrtsoftplus", scale=1.5, limit=10.0,
                           hash_vocab=40), True),
    ("small/v3-groups", dict(tokens=16, hidden=64, inter=32, experts=32, topk=8, scoring="sigmoid", n_group=8, topk_group=4,
                             scale=2.5), True),
    ("small/v4-fp4", dict(tokens=8, hidden=64, inter=32, experts=8, topk=2, scoring="sqrtsoftplus", fmt="fp4", limit=10.0), True),
    ("v4-flash/E8-bf16", dict(tokens=16, hidden=V4F["hidden"], inter=V4F["moe_inter"], experts=8, topk=V4F["topk"],
                              scoring="sqrtsoftplus", scale=1.5, limit=10.0), False),
    ("v4-flash/E8-fp4", dict(tokens=16, hidden=V4F["hidden"], inter=V4F["moe_inter"], experts=8, topk=V4F["topk"],
                             scoring="sqrtsoftplus", scale=1.5, limit=10.0, fmt="fp4"), False),
    ("v3.2/E16-fp8", dict(tokens=16, hidden=V32["hidden"], inter=V32["moe_inter"], experts=16, topk=V32["topk"],
                          scoring="sigmoid", n_group=V32["n_group"], topk_group=V32["topk_group"], scale=V32["route_scale"],
                          fmt="fp8"), False),
]

PARITY += [Case("moe_forward", name, ops.moe_forward, _forward_inputs(**kw), _forward_tolerance(kw.get("fmt", "dense")),
                quick=quick, reference_inputs=_forward_reference_inputs) for name, kw, quick in FORWARD_CASES]


# --- speed -------------------------------------------------------------------------------------

def _v4_block(experts, device):
    from transformers.models.deepseek_v4.modeling_deepseek_v4 import DeepseekV4Config, DeepseekV4SparseMoeBlock

    cfg = DeepseekV4Config(n_routed_experts=experts, num_hidden_layers=4, mlp_layer_types=["moe"] * 4)
    with torch.device(device):
        block = DeepseekV4SparseMoeBlock(cfg, 3).to(torch.bfloat16).requires_grad_(False)
    g = torch.Generator().manual_seed(0)
    for name, p in block.named_parameters():
        p.copy_(randn(g, *p.shape, scale=p.shape[-1] ** -0.5))
    return cfg, block


def _forward_speed(tokens, experts):
    """moe_forward at V4-Flash widths (BF16) against transformers' block holding the same tensors."""
    def make(device):
        cfg, block = _v4_block(experts, device)
        x = randn(torch.Generator().manual_seed(1), 1, tokens, cfg.hidden_size, dtype=torch.bfloat16).to(device)
        gate, sh = block.gate, block.shared_experts
        args = dict(experts=ops.ExpertWeights(block.experts.gate_up_proj, block.experts.down_proj), topk=cfg.num_experts_per_tok,
                    scoring="sqrtsoftplus", bias=gate.e_score_correction_bias, routed_scaling_factor=cfg.routed_scaling_factor,
                    swiglu_limit=cfg.swiglu_limit,
                    shared=ops.SharedExpertWeights(sh.gate_proj.weight, sh.up_proj.weight, sh.down_proj.weight))
        return (lambda: ops.moe_forward(x, gate.weight, **args)), {"transformers DeepseekV4SparseMoeBlock": lambda: block(x)}

    return make


def _layer_flops(tokens, experts_per_tok, hidden, inter):
    return 2 * tokens * (experts_per_tok + 1) * 3 * hidden * inter


def _route_speed(tokens, experts):
    def make(device):
        from transformers.models.deepseek_v4.modeling_deepseek_v4 import DeepseekV4Config, DeepseekV4TopKRouter

        cfg = DeepseekV4Config(n_routed_experts=experts)
        router = DeepseekV4TopKRouter(cfg).to(device, torch.bfloat16).requires_grad_(False)
        g = torch.Generator().manual_seed(0)
        router.weight.copy_(randn(g, *router.weight.shape, scale=cfg.hidden_size ** -0.5))
        x = randn(g, tokens, cfg.hidden_size, dtype=torch.bfloat16).to(device)
        return (lambda: ops.moe_route(x, router.weight, 6, "sqrtsoftplus", router.e_score_correction_bias,
                                      routed_scaling_factor=1.5)), {"transformers DeepseekV4TopKRouter": lambda: router(x)}

    return make


def _permute_speed(tokens, experts, op):
    """moe_dispatch or moe_combine alone at the layer's shapes, beside the layer's own timing."""
    def make(device):
        g = torch.Generator().manual_seed(0)
        x = randn(g, tokens, V4F["hidden"], dtype=torch.bfloat16).to(device)
        ids = torch.stack([torch.randperm(experts, generator=g)[: V4F["topk"]] for _ in range(tokens)]).to(device)
        d = ops.moe_dispatch(x, ids, experts)
        w = torch.rand(tokens, V4F["topk"], generator=g).to(device)
        if op == "moe_dispatch":
            return (lambda: ops.moe_dispatch(x, ids, experts)), {}
        return (lambda: ops.moe_combine(d.permuted, w, d)), {}

    return make


SPEED = [
    SpeedCase("moe_forward", "v4-flash-E32-T512-bf16", _forward_speed(512, 32),
              flops=_layer_flops(512, V4F["topk"], V4F["hidden"], V4F["moe_inter"]),
              bytes=2 * (32 + 1) * 3 * V4F["hidden"] * V4F["moe_inter"]),
    SpeedCase("moe_forward", "v4-flash-E32-T16-bf16", _forward_speed(16, 32), quick=True,
              flops=_layer_flops(16, V4F["topk"], V4F["hidden"], V4F["moe_inter"]),
              bytes=2 * (32 + 1) * 3 * V4F["hidden"] * V4F["moe_inter"]),
    SpeedCase("moe_route", "v4-flash-E256-T512", _route_speed(512, V4F["experts"])),
    SpeedCase("moe_dispatch", "v4-flash-E32-T512", _permute_speed(512, 32, "moe_dispatch")),
    SpeedCase("moe_combine", "v4-flash-E32-T512", _permute_speed(512, 32, "moe_combine")),
]


def breakdown(tokens: int = 512, experts: int = 32, rounds: int = 5) -> dict[str, float]:
    """Median milliseconds of each step of the BF16 layer at V4-Flash widths on cpu_fast, with
    transformers' block, all timed in interleaved rounds in one process (robust to machine load).
    `python -m v4hal.bench.cases_moe` prints it with the routing + permutation + combine share."""
    import statistics

    from v4hal.backends import registry
    from v4hal.bench.speed import interleaved

    cfg, block = _v4_block(experts, "cpu")
    x = randn(torch.Generator().manual_seed(1), 1, tokens, cfg.hidden_size, dtype=torch.bfloat16)
    flat = x.view(-1, cfg.hidden_size)
    gate, sh = block.gate, block.shared_experts
    ew = ops.ExpertWeights(block.experts.gate_up_proj, block.experts.down_proj)
    shared = ops.SharedExpertWeights(sh.gate_proj.weight, sh.up_proj.weight, sh.down_proj.weight)
    topk, limit, scale = cfg.num_experts_per_tok, cfg.swiglu_limit, cfg.routed_scaling_factor
    with torch.no_grad(), registry.forced("cpu_fast"):
        def route():
            return ops.moe_route(x, gate.weight, topk, "sqrtsoftplus", gate.e_score_correction_bias,
                                 routed_scaling_factor=scale)

        w, ids = route()
        d = ops.moe_dispatch(flat, ids, experts)
        h = ops.grouped_matmul(d.permuted, ew.gate_up, d.offsets)
        a = ops.swiglu(h, limit)
        y = ops.grouped_matmul(a, ew.down, d.offsets)
        steps = {
            "moe_forward": lambda: ops.moe_forward(x, gate.weight, ew, topk, scoring="sqrtsoftplus",
                                                   bias=gate.e_score_correction_bias, routed_scaling_factor=scale,
                                                   swiglu_limit=limit, shared=shared),
            "transformers": lambda: block(x),
            "route": route,
            "dispatch": lambda: ops.moe_dispatch(flat, ids, experts),
            "up_gemm": lambda: ops.grouped_matmul(d.permuted, ew.gate_up, d.offsets),
            "swiglu": lambda: ops.swiglu(h, limit),
            "down_gemm": lambda: ops.grouped_matmul(a, ew.down, d.offsets),
            "combine": lambda: ops.moe_combine(y, w, d),
        }
        samples = interleaved(steps, rounds)
    return {name: statistics.median(v) * 1e3 for name, v in samples.items()}


if __name__ == "__main__":
    from v4hal.bench.machine import describe

    ms = breakdown()
    for name, value in ms.items():
        print(f"{name:14s} {value:10.1f} ms")
    overhead = ms["route"] + ms["dispatch"] + ms["combine"]
    print(f"route + dispatch + combine: {overhead:.1f} ms = {overhead / ms['moe_forward']:.1%} of moe_forward")
    print(f"moe_forward speedup over transformers' DeepseekV4SparseMoeBlock: {ms['transformers'] / ms['moe_forward']:.2f}x")
    print(describe(torch.device("cpu")))
