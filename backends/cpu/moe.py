"""Reference MoE: routing straight from the formulas, dispatch and combine as loops over experts /
choices, one `v4hal.ops.linear` per expert. Runs in float64 when handed float64 tensors.

`moe_forward` here is the composition of the family's contracts; other backends reuse it, so each
step runs on whichever backend the registry picks for it."""

import torch
import torch.nn.functional as F

from v4hal import ops
from v4hal.ops.moe import MoeDispatch

RENORM_EPS = 1e-20


def compute_dtype(t: torch.Tensor) -> torch.dtype:
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def router_scores(logits: torch.Tensor, scoring: str) -> torch.Tensor:
    if scoring == "softmax":
        return logits.softmax(dim=-1)
    if scoring == "sigmoid":
        return logits.sigmoid()
    return F.softplus(logits).sqrt()


def group_limited_choice(choice: torch.Tensor, n_group: int, topk_group: int, has_bias: bool) -> torch.Tensor:
    """Mask (to -inf) every expert outside the `topk_group` best groups. A group scores the sum of
    its two best choice scores when a correction bias is in play (DeepSeek V3's noaux_tc), else
    its best one."""
    groups = choice.unflatten(-1, (n_group, -1))
    if has_bias:
        group_score = groups.topk(min(2, groups.shape[-1]), dim=-1).values.sum(-1)
    else:
        group_score = groups.amax(-1)
    kept = group_score.topk(topk_group, dim=-1).indices
    keep = torch.zeros_like(group_score, dtype=torch.bool).scatter_(1, kept, torch.ones_like(kept, dtype=torch.bool))
    return choice.masked_fill(~keep.unsqueeze(-1).expand_as(groups).flatten(-2), float("-inf"))


def moe_route(hidden, gate_weight, topk, scoring, bias, n_group, topk_group, renormalize,
              routed_scaling_factor, input_ids, tid2eid):
    cd = compute_dtype(hidden)
    scores = router_scores(hidden.to(cd) @ gate_weight.to(cd).T, scoring)
    if tid2eid is not None:
        ids = tid2eid[input_ids].long()
    else:
        choice = scores if bias is None else scores + bias.to(cd)
        if n_group > 1:
            choice = group_limited_choice(choice, n_group, topk_group, bias is not None)
        ids = choice.topk(topk, dim=-1).indices
    weights = scores.gather(1, ids)
    if renormalize:
        weights = weights / (weights.sum(dim=-1, keepdim=True) + RENORM_EPS)
    return weights * routed_scaling_factor, ids


def moe_dispatch(hidden, topk_ids, num_experts, capacity):
    row_of_slot = torch.full(topk_ids.shape, -1, dtype=torch.int64, device=hidden.device)
    token_index, counts = [], []
    row = 0
    for e in range(num_experts):
        slots = (topk_ids == e).nonzero()  # (token, choice) pairs in row-major order
        if capacity is not None:
            slots = slots[:capacity]
        n = slots.shape[0]
        row_of_slot[slots[:, 0], slots[:, 1]] = torch.arange(row, row + n, device=hidden.device)
        token_index.append(slots[:, 0])
        counts.append(n)
        row += n
    token_index = torch.cat(token_index)
    counts = torch.tensor(counts, dtype=torch.int64, device=hidden.device)
    offsets = torch.cat([counts.new_zeros(1), counts.cumsum(0)])
    return MoeDispatch(hidden[token_index], counts, offsets, token_index, row_of_slot)


def grouped_matmul(x, weight, group_offsets, scale, fmt, act_scale_fmt):
    out = x.new_empty(x.shape[0], weight.shape[1])
    bounds = group_offsets.tolist()
    for e in range(weight.shape[0]):
        start, end = bounds[e], bounds[e + 1]
        if end > start:
            out[start:end] = ops.linear(x[start:end], weight[e], None if scale is None else scale[e],
                                        act_scale_fmt=act_scale_fmt)
    return out


def swiglu(gate_up, limit):
    gate, up = gate_up.to(compute_dtype(gate_up)).chunk(2, dim=-1)
    if limit is not None:
        gate = gate.clamp(max=limit)
        up = up.clamp(min=-limit, max=limit)
    return (F.silu(gate) * up).to(gate_up.dtype)


def moe_combine(expert_out, topk_weights, state):
    cd = compute_dtype(expert_out)
    out = torch.zeros(state.row_of_slot.shape[0], expert_out.shape[1], dtype=cd, device=expert_out.device)
    for j in range(state.row_of_slot.shape[1]):
        rows = state.row_of_slot[:, j]
        kept = rows >= 0
        out[kept] += topk_weights[kept, j, None].to(cd) * expert_out[rows[kept]].to(cd)
    return out.to(expert_out.dtype)


def shared_expert(x, shared, swiglu_limit):
    fmt = shared.act_scale_fmt
    gate = ops.linear(x, shared.gate, shared.gate_scale, act_scale_fmt=fmt)
    up = ops.linear(x, shared.up, shared.up_scale, act_scale_fmt=fmt)
    return ops.linear(ops.swiglu(torch.cat([gate, up], dim=-1), swiglu_limit), shared.down, shared.down_scale,
                      act_scale_fmt=fmt)


def gathered_experts(x, experts, weights, ids, swiglu_limit):
    """`sum_j weights[t, j] * down_e @ swiglu(gate_up_e @ x[t])`, e = ids[t, j], for float experts
    as gathers of the chosen experts' rows and reductions against the token, in float32 (float64
    for float64 input), cast to x's dtype once. No shape depends on the routing."""
    cd = compute_dtype(x)
    gate_up = (experts.gate_up[ids].to(cd) * x.to(cd)[:, None, None, :]).sum(-1)  # [T, k, 2I]
    act = swiglu(gate_up, swiglu_limit)
    down = (experts.down[ids].to(cd) * act.unsqueeze(-2)).sum(-1)  # [T, k, H]
    return (weights.to(cd).unsqueeze(-1) * down).sum(1).to(x.dtype)


def moe_forward(hidden, gate_weight, experts, topk, scoring, bias, n_group, topk_group, renormalize,
                routed_scaling_factor, input_ids, tid2eid, swiglu_limit, shared):
    x = hidden.reshape(-1, hidden.shape[-1])
    weights, ids = ops.moe_route(hidden, gate_weight, topk, scoring, bias, n_group, topk_group,
                                 renormalize, routed_scaling_factor, input_ids, tid2eid)
    if (torch.compiler.is_compiling() and experts.gate_up_scale is None and experts.gate_up.is_floating_point()
            and ids.numel() <= experts.gate_up.shape[0]):
        # The dispatch's row counts depend on the routing, which a compiled graph cannot hold;
        # gathers feeding reductions can, and the compiler fuses each pair, so no expert weight
        # is copied. They read one expert per (token, choice), where the dispatch reads each
        # chosen expert once: the same at decode, far more for a prompt, so only while the pairs
        # are at most the experts. Quantized experts keep the dispatch (the graph breaks there).
        out = gathered_experts(x, experts, weights, ids, swiglu_limit)
    else:
        state = ops.moe_dispatch(x, ids, experts.gate_up.shape[0])
        fmt = experts.act_scale_fmt
        h = ops.grouped_matmul(state.permuted, experts.gate_up, state.offsets, experts.gate_up_scale, fmt)
        y = ops.grouped_matmul(ops.swiglu(h, swiglu_limit), experts.down, state.offsets, experts.down_scale, fmt)
        out = ops.moe_combine(y, weights, state)
    if shared is not None:
        out = out + shared_expert(x, shared, swiglu_limit)
    return out.reshape(hidden.shape)
