"""Reference MoE: routing straight from the formulas, dispatch and combine as loops over experts /
choices. Runs in float64 when handed float64 tensors.

The expert GEMMs and the layer itself are the contract's composites (`v4hal.ops.moe`): one
`linear` per expert, and route -> dispatch -> experts -> combine + shared expert, each step on
whichever backend the registry picks for it."""

import torch
import torch.nn.functional as F

from v4hal.ops.moe import MoeDispatch, composed_grouped_matmul, composed_moe_forward

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


grouped_matmul = composed_grouped_matmul  # the reference is the composite


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


moe_forward = composed_moe_forward  # the reference is the composite
