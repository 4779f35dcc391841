"""MoE in MindSpore: the contracts' math written with `mindspore.ops`, converted at the boundary.

Inputs go to float32 (float64 stays float64): MindSpore's CPU MatMul has no BF16 kernel. The
permutation sorts unique keys `expert * (T * k) + position`, so it is stable whatever sort
MindSpore uses; expert GEMMs run one matmul per expert over its rows. Quantized experts are
decoded here: MXFP4 nibbles through the e2m1 table times the ue8m0 block scales; int8 W8A8 with
activations quantized per token; FP8 weights decoded from their bytes, activations quantized per
1x128 block (fp32 or ue8m0 scales) and rounded to the e4m3 grid by arithmetic (MindSpore's CPU
build has no float8 dtype), as DeepSeek's act_quant does."""

import torch

from v4hal.backends.mindspore import keep_nan, mops, ms, to_ms, to_torch
from v4hal.backends.mindspore.quant import bytes_in, ceil_log2, decode_e4m3, expand_blocks, pow2, round_e4m3
from v4hal.ops.moe import MoeDispatch
from v4hal.ops.quant import ACT_BLOCK, E2M1_VALUES, FP4_BLOCK, FP8_MAX, INT8_MAX, WEIGHT_BLOCK

RENORM_EPS = 1e-20


def _cd(t: torch.Tensor):
    return ms().float64 if t.dtype == torch.float64 else ms().float32


def _float(t: torch.Tensor, cd):
    return to_ms(t).astype(cd)


def _int(t: torch.Tensor):
    return to_ms(t.long())


def _scores(logits, scoring):
    ops = mops()
    if scoring == "softmax":
        return ops.softmax(logits, -1)
    if scoring == "sigmoid":
        return ops.sigmoid(logits)
    # MindSpore's softplus runs in float32 even for float64 input; the stable formula keeps the
    # input's precision: softplus(x) = max(x, 0) + log1p(exp(-|x|)).
    softplus = ops.relu(logits) + ops.log1p(ops.exp(-ops.abs(logits)))
    return ops.sqrt(softplus)


def moe_route(hidden, gate_weight, topk, scoring, bias, n_group, topk_group, renormalize,
              routed_scaling_factor, input_ids, tid2eid):
    ops = mops()
    cd = _cd(hidden)
    scores = _scores(ops.matmul(_float(hidden, cd), ops.transpose(_float(gate_weight, cd), (1, 0))), scoring)
    if tid2eid is not None:
        ids = ops.gather(_int(tid2eid), _int(input_ids), 0)
    else:
        choice = scores if bias is None else scores + _float(bias, cd)
        if n_group > 1:
            t, e = choice.shape
            groups = ops.reshape(choice, (t, n_group, e // n_group))
            if bias is not None:
                group_score = ops.sum(ops.topk(groups, min(2, e // n_group))[0], -1)
            else:
                group_score = ops.amax(groups, -1)
            kept = ops.topk(group_score, topk_group)[1]
            keep = ops.sum(ops.one_hot(kept, n_group, ms().Tensor(1.0, cd), ms().Tensor(0.0, cd)), 1)
            keep = ops.reshape(ops.broadcast_to(ops.expand_dims(keep, -1), groups.shape), (t, e))
            choice = ops.where(keep > 0, choice, ms().Tensor(float("-inf"), cd))
        ids = ops.topk(choice, topk)[1].astype(ms().int64)
    weights = ops.gather_elements(scores, 1, ids)
    if renormalize:
        weights = weights / (ops.sum(weights, -1, keepdim=True) + RENORM_EPS)
    weights = weights * routed_scaling_factor
    return to_torch(weights, torch.float64 if hidden.dtype == torch.float64 else torch.float32), to_torch(ids).long()


def moe_dispatch(hidden, topk_ids, num_experts, capacity):
    ops = mops()
    t, k = topk_ids.shape
    flat = ops.reshape(_int(topk_ids), (t * k,))
    position = ops.arange(0, t * k, dtype=ms().int64)
    order = ops.argsort(flat * (t * k) + position)
    sorted_experts = ops.gather(flat, order, 0)
    counts = ops.sum(ops.one_hot(flat, num_experts, ms().Tensor(1, ms().int64), ms().Tensor(0, ms().int64)), 0)
    if capacity is not None:
        starts = ops.cumsum(counts, 0) - counts
        rank = position - ops.gather(starts, sorted_experts, 0)
        order = ops.masked_select(order, rank < capacity)
        counts = ops.clamp(counts, max=capacity)
    n_rows = order.shape[0]
    rows = ops.arange(0, n_rows, dtype=ms().int64)
    row_of_slot = ops.tensor_scatter_elements(ops.full((t * k,), -1, dtype=ms().int64), order, rows, 0)
    token_index = ops.floor_div(order, k)
    counts_t = to_torch(counts).long()
    offsets = torch.cat([counts_t.new_zeros(1), counts_t.cumsum(0)])
    token_index_t = to_torch(token_index).long()
    permuted = to_torch(ops.gather(_float(hidden, _cd(hidden)), token_index, 0), hidden.dtype) if n_rows else hidden[:0]
    return MoeDispatch(permuted.to(hidden.device), counts_t, offsets, token_index_t,
                       to_torch(row_of_slot).long().view(t, k))


def _decode_fp4(packed, scale, cd):
    ops = mops()
    codes = _int(packed)
    nibbles = ops.stack([ops.bitwise_and(codes, ms().Tensor(15, ms().int64)),
                         ops.floor_div(codes, 16)], -1)
    nibbles = ops.reshape(nibbles, (packed.shape[0], packed.shape[1] * 2))
    table = ms().Tensor(list(E2M1_VALUES) + [-v for v in E2M1_VALUES], cd)
    values = ops.gather(table, nibbles, 0)
    if scale.dtype in (torch.float8_e8m0fnu, torch.uint8):
        exponents = _float(scale.view(torch.uint8), cd)
        block_scale = ops.pow(ms().Tensor(2.0, cd), exponents - 127)
    else:
        block_scale = _float(scale, cd)
    return values * ops.repeat_interleave(block_scale, FP4_BLOCK, 1)[:, : values.shape[1]]


def _expert_gemm(x, weight, scale, fmt, act_scale_fmt, cd):
    """x: mindspore [rows, K] in cd; weight / scale: one expert's torch tensors."""
    ops = mops()
    if fmt == "dense":
        return ops.matmul(x, ops.transpose(_float(weight, cd), (1, 0)))
    if fmt == "fp4":
        return ops.matmul(x, ops.transpose(_decode_fp4(weight, scale, cd), (1, 0)))
    if fmt == "int8":
        x_scale = ops.clamp(ops.amax(ops.abs(x), -1, keepdims=True), min=1e-8) / INT8_MAX
        xq = ops.clamp(ops.round(x / x_scale), -INT8_MAX, INT8_MAX)
        # Integer products summed exactly: float64 holds every int8 dot product of these sizes.
        acc = ops.matmul(xq.astype(ms().float64), ops.transpose(_float(weight, ms().float64), (1, 0)))
        return (acc.astype(cd) * x_scale) * ops.expand_dims(_float(scale, cd), 0)
    return ops.matmul(_fp8_activations(x, act_scale_fmt, cd), ops.transpose(_fp8_weight(weight, scale, cd), (1, 0)))


def _fp8_activations(x, scale_fmt, cd):
    """DeepSeek's act_quant round trip: 1x128 blocks, scale = max(amax, 1e-4) / 448 (rounded up to
    a power of two for ue8m0), e4m3 values."""
    ops = mops()
    rows, k = x.shape
    pad = -k % ACT_BLOCK[1]
    blocks = ops.reshape(ops.pad(x, (0, pad)), (rows, -1, ACT_BLOCK[1]))
    scale = ops.clamp(ops.amax(ops.abs(blocks), -1, keepdims=True), min=1e-4) / FP8_MAX
    if scale_fmt == "ue8m0":
        scale = pow2(ceil_log2(scale))
    q = round_e4m3(ops.clamp(blocks / scale, -FP8_MAX, FP8_MAX))
    return ops.reshape(q * scale, (rows, -1))[:, :k]


def _fp8_weight(weight, scale, cd):
    # e4m3 values decode exactly in float32 from their bytes; the block scales multiply in cd.
    n, k = weight.shape
    return decode_e4m3(bytes_in(weight)).astype(cd) * expand_blocks(_float(scale, cd), *WEIGHT_BLOCK, n, k)


def grouped_matmul(x, weight, group_offsets, scale, fmt, act_scale_fmt):
    ops = mops()
    cd = _cd(x)
    xm = _float(x, cd)
    bounds = group_offsets.tolist()
    parts = []
    for e in range(weight.shape[0]):
        start, end = bounds[e], bounds[e + 1]
        if end > start:
            parts.append(_expert_gemm(xm[start:end], weight[e], None if scale is None else scale[e], fmt,
                                      act_scale_fmt, cd))
    if not parts:
        return x.new_zeros(0, weight.shape[1])
    return to_torch(ops.cat(parts, 0), x.dtype)


def swiglu(gate_up, limit):
    ops = mops()
    cd = _cd(gate_up)
    if gate_up.numel() == 0:
        return gate_up[..., : gate_up.shape[-1] // 2]
    gate, up = ops.chunk(_float(gate_up, cd), 2, -1)
    if limit is not None:
        gate = keep_nan(ops.clamp(gate, max=limit), gate)
        up = keep_nan(ops.clamp(up, min=-limit, max=limit), up)
    return to_torch(gate / (1 + ops.exp(-gate)) * up, gate_up.dtype)


def moe_combine(expert_out, topk_weights, state):
    ops = mops()
    cd = _cd(expert_out)
    t, k = state.row_of_slot.shape
    rows = _int(state.row_of_slot.reshape(-1))
    kept = ops.reshape(rows >= 0, (t, k))
    weights = ops.where(kept, _float(topk_weights, cd), ms().Tensor(0.0, cd))
    if expert_out.shape[0] == 0:
        return expert_out.new_zeros(t, expert_out.shape[1])
    gathered = ops.reshape(ops.gather(_float(expert_out, cd), ops.clamp(rows, min=0), 0), (t, k, -1))
    out = ops.sum(gathered * ops.expand_dims(weights, -1), 1)
    return to_torch(out, expert_out.dtype)
