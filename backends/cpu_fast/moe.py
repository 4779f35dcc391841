"""Fast MoE: a stable sort of the flattened expert ids replaces the reference's per-expert scans,
rows move with one `index_select`, and each expert runs one GEMM over its contiguous rows straight
into the output buffer. Nothing loops over tokens. Written device-agnostically: the cuda backend
runs these same functions on the GPU.

Routing (already batched in the reference) is inherited from `cpu`, and so is `moe_forward` (the
composition of the contracts) except for decode: a few tokens on the CPU run each chosen expert
as two matrix-vector products, without the sort / permute / combine machinery whose ~40 small ops
cost more than those products at decode. Quantized expert GEMMs go through the reference's
per-expert `ops.linear`, i.e. through the quant family's own fast paths."""

import torch

from v4hal import ops
from v4hal.backends import registry
from v4hal.backends.cpu_fast import cast, eager_on_cpu
from v4hal.backends.cpu_fast.basic import dense_linear
from v4hal.ops.moe import MoeDispatch

reference = registry.parent_family(__name__)


def sort_by_expert(topk_ids, num_experts, capacity):
    """(order, counts): `order` lists flat (token * k + choice) positions grouped by expert, stable,
    cut to `capacity` rows per expert; `counts` are the rows each expert keeps."""
    flat = topk_ids.reshape(-1)
    order = torch.argsort(flat, stable=True)
    # scatter_add rather than bincount: same counts, and it has a Meta kernel (Ascend dry runs).
    counts = torch.zeros(num_experts, dtype=torch.int64, device=flat.device).scatter_add_(0, flat, torch.ones_like(flat))
    if capacity is not None:
        starts = torch.cumsum(counts, 0) - counts
        rank = torch.arange(flat.numel(), device=flat.device) - starts[flat[order]]
        order = order[rank < capacity]
        counts = counts.clamp(max=capacity)
    return order, counts


def dispatch_state(hidden, topk_ids, order, counts):
    k = topk_ids.shape[1]
    row_of_slot = torch.full((topk_ids.numel(),), -1, dtype=torch.int64, device=hidden.device)
    row_of_slot[order] = torch.arange(order.numel(), device=hidden.device)
    token_index = order // k
    offsets = torch.cat([counts.new_zeros(1), torch.cumsum(counts, 0)])
    return MoeDispatch(hidden[token_index], counts, offsets, token_index,
                       row_of_slot.view(topk_ids.shape))


def moe_dispatch(hidden, topk_ids, num_experts, capacity):
    order, counts = sort_by_expert(topk_ids, num_experts, capacity)
    return dispatch_state(hidden, topk_ids, order, counts)


def grouped_matmul(x, weight, group_offsets, scale, fmt, act_scale_fmt):
    if fmt != "dense":
        return reference.grouped_matmul(x, weight, group_offsets, scale, fmt, act_scale_fmt)
    out = x.new_empty(x.shape[0], weight.shape[1])
    bounds = group_offsets.tolist()
    w = cast(weight, x.dtype)
    for e in range(weight.shape[0]):
        start, end = bounds[e], bounds[e + 1]
        if end > start:
            out[start:end] = dense_linear(x[start:end], w[e])
    return out


def swiglu(gate_up, limit):
    # Kept in the input's precision: for BF16 this is what transformers computes, within the BF16
    # tolerance of the float32 reference, and it skips two conversion passes over the buffer.
    gate, up = gate_up.chunk(2, dim=-1)
    if limit is not None:
        gate = gate.clamp(max=limit)
        up = up.clamp(min=-limit, max=limit)
    return torch.nn.functional.silu(gate).mul_(up)


def moe_combine(expert_out, topk_weights, state):
    # A gather into token-major [T, k, H] and a batched weighted sum: no scatter-add, whose CPU
    # kernel is the slow part of transformers' combine. The GEMM accumulates in float32; for BF16
    # rows the float32 weights enter as a BF16 pair (hi + lo) so they are not rounded to 8 bits.
    t, k = state.row_of_slot.shape
    rows = state.row_of_slot.reshape(-1)
    weights = torch.where(rows.view(t, k) >= 0, topk_weights, 0).unsqueeze(1)
    gathered = expert_out[rows.clamp(min=0)].view(t, k, -1)
    hi = weights.to(expert_out.dtype)
    if hi.dtype == weights.dtype:
        return torch.bmm(hi, gathered).squeeze(1)
    lo = (weights - hi.to(weights.dtype)).to(expert_out.dtype)
    return torch.baddbmm(torch.bmm(lo, gathered), hi, gathered).squeeze(1)


FEW_ROWS = 8  # (token, expert) pairs up to which moe_forward takes the decode path


def moe_forward(hidden, gate_weight, experts, topk, scoring, bias, n_group, topk_group, renormalize,
                routed_scaling_factor, input_ids, tid2eid, swiglu_limit, shared):
    x = hidden.reshape(-1, hidden.shape[-1])
    if (not eager_on_cpu(x) or x.shape[0] * topk > FEW_ROWS or experts.gate_up_scale is not None
            or not experts.gate_up.is_floating_point()):
        return reference.moe_forward(hidden, gate_weight, experts, topk, scoring, bias, n_group, topk_group,
                                     renormalize, routed_scaling_factor, input_ids, tid2eid, swiglu_limit, shared)
    weights, ids = ops.moe_route(hidden, gate_weight, topk, scoring, bias, n_group, topk_group,
                                 renormalize, routed_scaling_factor, input_ids, tid2eid)
    rows = []
    for t, chosen in enumerate(ids.tolist()):
        for e in chosen:
            gate_up, down = experts.gate_up[e], experts.down[e]
            rows.append(dense_linear(swiglu(dense_linear(x[t:t + 1], cast(gate_up, x.dtype)), swiglu_limit),
                                     cast(down, x.dtype)))
    cd = reference.compute_dtype(x)
    expert_out = cast(torch.cat(rows).view(x.shape[0], topk, -1), cd)
    out = cast(torch.bmm(cast(weights, cd).unsqueeze(1), expert_out).squeeze(1), x.dtype)
    if shared is not None:
        out = out + reference.shared_expert(x, shared, swiglu_limit)
    return out.reshape(hidden.shape)
