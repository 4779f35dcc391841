"""MoE on Ascend through torch_npu's fused MoE ops (schemas and docs: the pinned torch-npu wheel).

- routing: `npu_moe_gating_top_k` (softmax or sigmoid scores, optional bias, group selection by
  max (`group_select_mode=0`) or top-2 sum (`=1`), hash routing through `input_ids` / `tid2eid`,
  then `y / (sum y + eps) * routed_scaling_factor`). It always renormalizes and knows no
  sqrt(softplus): V4's sqrtsoftplus goes through its softmax mode on `log(sqrt(softplus(logits)))`,
  whose softmax is the scores over their sum, a per-token constant the renormalization cancels;
  that is exact whenever no bias shifts the choice (hash layers, bias-free routers). With a bias
  (V4's top-k layers) or without renormalization the scores are computed with torch ops on the
  NPU, as the reference does.
- permutation: `npu_moe_init_routing_v2` (dropless; `row_idx_type=0` gives the gather index
  `expanded_row_idx[t * k + j]` = row of token t's j-th choice, our `row_of_slot`;
  `expert_tokens_num_type=1` gives per-expert counts). A capacity limit uses the device-agnostic
  sort, since the fused op supports only `drop_pad_mode=0`.
- expert GEMMs: `npu_grouped_matmul` with one [E, K, N] weight (a transposed view of our
  [E, N, K] stack), `group_type=0` (groups split M), `split_item=2` (one output tensor) and
  `group_list=offsets[1:]` with `group_list_type=0` (cumulative ends; 1 would mean counts).
  int8 W8A8 experts add `npu_dynamic_quant` per-token activations, `scale` / `per_token_scale`
  and an `output_dtype` code (the op returns int8 otherwise). FP8 and MXFP4 experts are decoded to
  BF16 on the NPU (e4m3 / e2m1 table lookups times their block scales; FP8 activations are
  quantized per 1x128 block and decoded the same way, as `linear` does on A2/A3) and go through the
  same BF16 `npu_grouped_matmul`, on every chip: its docs define no FP8 or MX mode (A5's Meta
  kernel accepts e4m3 operands but the op has no `group_sizes`, so no 128x128 block scales), and
  the per-expert `linear` loop this replaces read the group offsets on the host. Only the experts
  that can have rows are decoded: at most min(E, rows), picked on the device by the largest counts
  (every expert with a row is among them) and kept in expert order, so at decode (a few rows) a
  call decodes a few experts, not all E; no value is read on the host.
- SwiGLU: `npu_swiglu`, or `npu_clipped_swiglu(alpha=1, bias=0, interleaved=False)` for V4's
  clamp (its `A * sigmoid(alpha A) * (B + bias)` with clamped halves is exactly V4's).
- combine: `npu_moe_finalize_routing`, whose `expanded_src_to_dst_row` is read choice-major
  (`[i + j * T]`), so our token-major gather index is transposed first. The op takes exactly T*K
  expert rows (`(NUM_ROWS * K, H)`): after a capacity limit the kept rows are padded with zero
  rows, which the dropped choices read. Its scales must have the rows' dtype: with float32 weights
  and bf16/fp16 rows it runs in float32 (the contract's accumulation) and rounds once.
"""

import torch

from v4hal.backends import registry
from v4hal.backends.ascend import npu, quant
from v4hal.ops.moe import MoeDispatch
from v4hal.ops.quant import ACT_BLOCK, WEIGHT_BLOCK

parent = registry.parent_family(__name__)

NORM_SOFTMAX, NORM_SIGMOID = 0, 1
GROUP_BY_MAX, GROUP_BY_TOP2_SUM = 0, 1
GROUP_LIST_CUMSUM = 0
SPLIT_M, SINGLE_OUTPUT = 0, 2
COUNTS = 1
GATHER_INDEX = 0
# c10::ScalarType codes, what npu_grouped_matmul's `int? output_dtype` takes.
SCALAR_TYPE_CODE = {torch.float16: 5, torch.bfloat16: 15}
KERNEL_FLOATS = (torch.float16, torch.bfloat16, torch.float32)  # what npu_moe_finalize_routing takes


def _fused_gating_applies(scoring, bias, renormalize, n_experts, n_group):
    if not renormalize or n_experts > 2048 or n_experts // n_group <= 2:
        return False  # outside the op's documented range (it always renormalizes)
    return scoring in ("softmax", "sigmoid") or (scoring == "sqrtsoftplus" and bias is None)


def moe_route(hidden, gate_weight, topk, scoring, bias, n_group, topk_group, renormalize,
              routed_scaling_factor, input_ids, tid2eid):
    n_experts = gate_weight.shape[0]
    if not _fused_gating_applies(scoring, bias, renormalize, n_experts, n_group):
        return parent.moe_route(hidden, gate_weight, topk, scoring, bias, n_group, topk_group, renormalize,
                                   routed_scaling_factor, input_ids, tid2eid)
    logits = torch.nn.functional.linear(hidden.float(), gate_weight.float())
    if scoring == "sqrtsoftplus":
        logits = torch.log(parent.router_scores(logits, scoring))
    weights, ids, _ = npu().npu_moe_gating_top_k(
        logits, topk, bias=None if bias is None else bias.float(),
        input_ids=input_ids, tid2eid=tid2eid,
        k_group=topk_group, group_count=n_group,
        group_select_mode=GROUP_BY_TOP2_SUM if bias is not None else GROUP_BY_MAX,
        renorm=0, norm_type=NORM_SIGMOID if scoring == "sigmoid" else NORM_SOFTMAX, out_flag=False,
        routed_scaling_factor=routed_scaling_factor, eps=parent.RENORM_EPS)
    return weights, ids.long()


def moe_dispatch(hidden, topk_ids, num_experts, capacity):
    if capacity is not None:
        return parent.moe_dispatch(hidden, topk_ids, num_experts, capacity)
    t, k = topk_ids.shape
    permuted, row_of_slot, counts, _ = npu().npu_moe_init_routing_v2(
        hidden, topk_ids.int(), active_num=t * k, expert_num=num_experts, drop_pad_mode=0,
        expert_tokens_num_type=COUNTS, expert_tokens_num_flag=True, quant_mode=-1,
        active_expert_range=[0, num_experts], row_idx_type=GATHER_INDEX)
    row_of_slot = row_of_slot.long()
    flat_position = torch.empty_like(row_of_slot)
    flat_position[row_of_slot] = torch.arange(t * k, device=row_of_slot.device)
    counts = counts.long()
    offsets = torch.cat([counts.new_zeros(1), counts.cumsum(0)])
    return MoeDispatch(permuted, counts, offsets, flat_position // k, row_of_slot.view(t, k))


def _float_grouped_matmul(x, weight, ends):
    return npu().npu_grouped_matmul([x], [weight.transpose(1, 2)], group_list=ends, split_item=SINGLE_OUTPUT,
                                    group_type=SPLIT_M, group_list_type=GROUP_LIST_CUMSUM)[0]


def _experts_that_can_have_rows(group_offsets, rows):
    """(expert ids in ascending order, their cumulative row ends) for the min(E, rows) experts with
    the most rows: every expert with a row is among them (rows split over at most `rows` experts),
    and those left out hold none, so the kept experts' rows stay contiguous and in order. None for
    the ids when that is every expert. Device ops only: the sizes come from shapes."""
    ends = group_offsets[1:].long()
    n_experts = ends.shape[0]
    if rows >= n_experts:
        return None, ends
    counts = ends - group_offsets[:-1].long()
    kept = torch.topk(counts, rows, sorted=False).indices.sort().values
    return kept, ends[kept]


def _decoded_experts(x, weight, group_offsets, scale, fmt, act_scale_fmt):
    """x and the experts that can have rows as BF16, with their row ends (see the module docstring)."""
    kept, ends = _experts_that_can_have_rows(group_offsets, x.shape[0])
    if kept is not None:
        weight, scale = weight.index_select(0, kept), scale.index_select(0, kept)
    if fmt == "fp8":
        a, a_scale = registry.dispatch("quantize_fp8")(x, ACT_BLOCK, act_scale_fmt)
        act = quant.dequantize_fp8(a, a_scale, ACT_BLOCK, torch.bfloat16)
        w = quant.dequantize_fp8(weight, scale, WEIGHT_BLOCK, torch.bfloat16)
    else:
        act, w = x.bfloat16(), quant.dequantize_fp4(weight, scale, torch.bfloat16)
    return act, w, ends


def grouped_matmul(x, weight, group_offsets, scale, fmt, act_scale_fmt):
    if x.shape[0] == 0 or (fmt in ("fp8", "fp4") and x.dtype == torch.float64):
        return parent.grouped_matmul(x, weight, group_offsets, scale, fmt, act_scale_fmt)
    if fmt in ("fp8", "fp4"):
        act, w, ends = _decoded_experts(x, weight, group_offsets, scale, fmt, act_scale_fmt)
        return _float_grouped_matmul(act, w, ends).to(x.dtype)
    ends = group_offsets[1:].long()
    if fmt == "dense":
        return _float_grouped_matmul(x, weight.to(x.dtype), ends)
    out_dtype = x.dtype if x.dtype in SCALAR_TYPE_CODE else torch.bfloat16
    xq, x_scale = npu().npu_dynamic_quant(x)
    y = npu().npu_grouped_matmul([xq], [weight.transpose(1, 2)], scale=[scale.float()],
                                 per_token_scale=[x_scale.float()], group_list=ends,
                                 split_item=SINGLE_OUTPUT, group_type=SPLIT_M,
                                 group_list_type=GROUP_LIST_CUMSUM,
                                 output_dtype=SCALAR_TYPE_CODE[out_dtype])[0]
    return y.to(x.dtype)


def swiglu(gate_up, limit):
    if gate_up.numel() == 0:
        return gate_up[..., : gate_up.shape[-1] // 2]
    x = gate_up if gate_up.dim() > 1 else gate_up.unsqueeze(0)
    if limit is None:
        y = npu().npu_swiglu(x, dim=-1)
    else:
        y = npu().npu_clipped_swiglu(x, dim=-1, alpha=1.0, limit=limit, bias=0.0, interleaved=False)
    return y.view(gate_up.shape[:-1] + (gate_up.shape[-1] // 2,))


def moe_combine(expert_out, topk_weights, state):
    t, k = state.row_of_slot.shape
    if expert_out.shape[0] == 0:
        return expert_out.new_zeros(t, expert_out.shape[1])
    if expert_out.dtype not in KERNEL_FLOATS:
        return parent.moe_combine(expert_out, topk_weights, state)
    # The op takes scales in the rows' dtype; the contract weighs in float32, so bf16/fp16 rows
    # with wider weights go in as float32 (rounding the weights to bf16 broke parity on V4-Flash).
    cd = expert_out.dtype if topk_weights.dtype == expert_out.dtype else torch.float32
    # The op reads exactly T*K expert rows; a capacity limit keeps fewer, so zero rows pad them and
    # every dropped choice reads the first zero row.
    kept_rows = expert_out.shape[0]
    padded = torch.cat([expert_out.to(cd), expert_out.new_zeros(t * k - kept_rows, expert_out.shape[1], dtype=cd)])
    rows = torch.where(state.row_of_slot >= 0, state.row_of_slot, kept_rows)
    out = npu().npu_moe_finalize_routing(padded, None, None, None, topk_weights.to(cd), rows.t().reshape(-1).int(),
                                         export_for_source_row=None, drop_pad_mode=0, k=k)
    return out.to(expert_out.dtype)
