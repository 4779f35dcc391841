"""Emulated MoE ops: `npu_moe_gating_top_k`, `npu_moe_init_routing_v2`, `npu_grouped_matmul`,
`npu_moe_finalize_routing`, `npu_swiglu`, `npu_clipped_swiglu`."""

from __future__ import annotations

import torch

from v4hal.tools.ascend.emulator import (FLOATS, HALF, contiguous, dims_in, dtype_in, f32, op, require, shape_is,
                                         unsupported)

MAX_EXPERTS = 2048
MAX_GROUPS = 1024
INNER_LIMIT = 65536
# c10::ScalarType codes an `int? output_dtype` carries (torch.dtype objects are accepted too).
SCALAR_TYPES = {1: torch.int8, 3: torch.int32, 5: torch.float16, 6: torch.float32, 15: torch.bfloat16}


def out_dtype(name: str, code, default: torch.dtype) -> torch.dtype:
    if code is None:
        return default
    if isinstance(code, torch.dtype):
        return code
    require(code in SCALAR_TYPES, name, f"output_dtype code {code} is not one of {sorted(SCALAR_TYPES)}")
    return SCALAR_TYPES[code]


@op("npu_moe_gating_top_k")
def npu_moe_gating_top_k(chip, x, k, *, bias=None, input_ids=None, tid2eid=None, k_group=1, group_count=1,
                         group_select_mode=0, renorm=0, norm_type=0, out_flag=False, routed_scaling_factor=1.0,
                         eps=1e-20):
    """norm = softmax(x) (norm_type 0) or sigmoid(x) (1), in float32; the choice ranks norm + bias
    among the k_group best groups (group score: the max, mode 0, or the sum of the top two, mode
    1); with input_ids / tid2eid the experts are tid2eid[input_ids] (hash routing). Weights:
    y = norm[chosen] / (sum + eps) * routed_scaling_factor (the eps and factor the docs say y uses),
    in x's dtype; ids int32, best first; norm_out float32."""
    name = "npu_moe_gating_top_k"
    dtype_in(name, "x", x, FLOATS)
    dims_in(name, "x", x, (2,))
    t, e = x.shape
    require(e <= MAX_EXPERTS, name, f"the expert count (x.shape[-1]) must be <= {MAX_EXPERTS}, got {e}")
    require(group_count > 0 and e % group_count == 0 and e // group_count > 2, name,
            f"group_count must divide the {e} experts into groups of more than 2, got {group_count}")
    per_group = e // group_count
    require(-(-per_group // 32) * 32 * group_count <= MAX_EXPERTS, name,
            "the 32-aligned group size times group_count must be <= 2048")
    require(1 <= k_group <= group_count, name, f"k_group must be in [1, group_count={group_count}], got {k_group}")
    require(1 <= k <= per_group * k_group, name, f"k must be in [1, {per_group * k_group}], got {k}")
    require(renorm == 0, name, f"renorm: only 0 is supported, got {renorm}")
    require(norm_type in (0, 1), name, f"norm_type must be 0 (softmax) or 1 (sigmoid), got {norm_type}")
    require(group_select_mode in (0, 1), name, f"group_select_mode must be 0 or 1, got {group_select_mode}")
    if out_flag:
        unsupported(name, "out_flag=True")
    norm = torch.softmax(f32(x), -1) if norm_type == 0 else torch.sigmoid(f32(x))
    if (input_ids is None) != (tid2eid is None):
        require(False, name, "input_ids and tid2eid go together (hash routing)")
    if input_ids is not None:
        dtype_in(name, "input_ids", input_ids, (torch.int32, torch.int64))
        dtype_in(name, "tid2eid", tid2eid, (torch.int32, torch.int64))
        shape_is(name, "input_ids", input_ids, (t,))
        require(tid2eid.dim() == 2 and tid2eid.shape[1] == k, name, f"tid2eid must be [V, k={k}], got {tuple(tid2eid.shape)}")
        ids = tid2eid[input_ids.long()].long()
        require(bool(((ids >= 0) & (ids < e)).all()), name, f"tid2eid entries must be expert ids in [0, {e})")
    else:
        ranked = norm
        if bias is not None:
            require(bias.dtype == x.dtype, name, f"bias dtype must equal x's ({x.dtype}), got {bias.dtype}")
            shape_is(name, "bias", bias, (e,))
            ranked = norm + f32(bias)
        grouped = ranked.view(t, group_count, per_group)
        score = grouped.amax(-1) if group_select_mode == 0 else grouped.topk(2, -1).values.sum(-1)
        kept = torch.zeros(t, group_count, dtype=torch.bool)
        kept.scatter_(1, score.topk(k_group, -1).indices, True)
        ranked = ranked.masked_fill(~kept.repeat_interleave(per_group, 1), float("-inf"))
        ids = ranked.topk(k, -1).indices
    y = norm.gather(1, ids)
    y = y / (y.sum(-1, keepdim=True) + eps) * routed_scaling_factor
    return y.to(x.dtype), ids.int(), norm


@op("npu_moe_init_routing_v2")
def npu_moe_init_routing_v2(chip, x, expert_idx, *, scale=None, offset=None, active_num=-1, expert_capacity=-1,
                            expert_num=-1, drop_pad_mode=0, expert_tokens_num_type=0, expert_tokens_num_flag=False,
                            quant_mode=-1, active_expert_range=(), row_idx_type=0, x_dtype=None):
    """Dropless permutation: the (token, choice) slots whose expert lies in active_expert_range,
    ordered by expert (slot order within an expert), fill the first rows of expanded_x (the rest
    is undefined: NaN here). row_idx_type 0 (gather index): expanded_row_idx[t * K + j] = the row of
    token t's j-th choice, -1 for an inactive expert. Counts per active expert (int64)."""
    name = "npu_moe_init_routing_v2"
    dtype_in(name, "x", x, FLOATS + (torch.int8,))
    dims_in(name, "x", x, (2,))
    dtype_in(name, "expert_idx", expert_idx, (torch.int32,))
    dims_in(name, "expert_idx", expert_idx, (2,))
    t, kk = expert_idx.shape
    require(x.shape[0] == t, name, f"x rows ({x.shape[0]}) must equal expert_idx rows ({t})")
    require(drop_pad_mode == 0, name, f"drop_pad_mode: only 0 (dropless) is supported, got {drop_pad_mode}")
    require(expert_tokens_num_type in (1, 2), name, f"expert_tokens_num_type: only 1 and 2 are supported, got {expert_tokens_num_type}")
    require(expert_tokens_num_flag, name, "expert_tokens_num_flag: only True is supported")
    require(quant_mode in (-1, 1), name, f"quant_mode: only -1 and 1 are supported, got {quant_mode}")
    limit = 5120 if expert_tokens_num_type == 2 else 10240
    require(0 < expert_num <= limit, name, f"expert_num must be in (0, {limit}], got {expert_num}")
    require(active_num >= -1, name, f"active_num must be >= -1, got {active_num}")
    start, end = active_expert_range if len(active_expert_range) == 2 else (0, expert_num)
    require(0 <= start < end <= expert_num, name, f"active_expert_range must satisfy 0 <= start < end <= expert_num, got {list(active_expert_range)}")
    require(bool(((expert_idx >= 0) & (expert_idx < expert_num)).all()), name, f"expert ids must be in [0, {expert_num})")
    for what, bad in (("expert_tokens_num_type=2 (key_value)", expert_tokens_num_type == 2), ("quant_mode=1", quant_mode == 1),
                      ("row_idx_type=1 (scatter index)", row_idx_type == 1), ("scale", scale is not None),
                      ("offset", offset is not None), ("active_num < T*K", 0 < active_num < t * kk)):
        if bad:
            unsupported(name, what)
    require(row_idx_type == 0, name, f"row_idx_type must be 0 or 1, got {row_idx_type}")
    flat = expert_idx.reshape(-1).long()
    active = (flat >= start) & (flat < end)
    order = torch.argsort(torch.where(active, flat, expert_num), stable=True)
    n_active = int(active.sum())
    fill = float("nan") if x.dtype.is_floating_point else 0
    expanded_x = torch.full((t * kk, x.shape[1]), fill, dtype=x.dtype)
    expanded_x[:n_active] = x[order[:n_active] // kk]
    row_idx = torch.full((t * kk,), -1, dtype=torch.int32)
    row_idx[order[:n_active]] = torch.arange(n_active, dtype=torch.int32)
    counts = torch.bincount(flat[active] - start, minlength=end - start).to(torch.int64)
    return expanded_x, row_idx, counts, torch.full((t * kk,), float("nan"))


@op("npu_grouped_matmul")
def npu_grouped_matmul(chip, x, weight, *, bias=None, scale=None, offset=None, antiquant_scale=None,
                       antiquant_offset=None, per_token_scale=None, group_list=None, activation_input=None,
                       activation_quant_scale=None, activation_quant_offset=None, split_item=0, group_type=None,
                       group_list_type=0, act_type=0, tuning_config=None, output_dtype=None, x_dtype=None,
                       weight_dtype=None, scale_dtype=None, per_token_scale_dtype=None):
    """The single-tensor form (x [M, K], weight [E, K, N], one output, groups split M): rows
    group_list-delimited go through their expert's weight. Dense: half/float32 operands, float32
    accumulation. int8 per-token (formula 3): (x_i w_i) * scale_i [N] * per_token_scale [M]."""
    name = "npu_grouped_matmul"
    for arg, v in (("bias", bias), ("offset", offset), ("antiquant_scale", antiquant_scale),
                   ("antiquant_offset", antiquant_offset), ("activation_input", activation_input)):
        if v is not None:
            unsupported(name, arg)
    if len(x) != 1 or len(weight) != 1 or split_item not in (2, 3) or group_type != 0:
        unsupported(name, f"{len(x)} x / {len(weight)} weight tensors, split_item={split_item}, group_type={group_type} "
                          "(only single x, single [E, K, N] weight, one output, group_type=0)")
    if act_type:
        unsupported(name, f"act_type={act_type}")
    a, w = x[0], weight[0]
    dims_in(name, "x[0]", a, (2,))
    dims_in(name, "weight[0]", w, (3,))
    contiguous(name, "x[0] (x may not be transposed)", a)
    m, kdim = a.shape
    e, wk, n = w.shape
    require(wk == kdim, name, f"weight[0] must be [E, K={kdim}, N], got {tuple(w.shape)}")
    require(kdim < INNER_LIMIT and n < INNER_LIMIT, name, f"K and N must be < {INNER_LIMIT}")
    require(group_list is not None and group_list.dim() == 1 and group_list.dtype == torch.int64, name,
            "group_list must be a 1-D int64 tensor")
    require(group_list.numel() == e and e <= MAX_GROUPS, name, f"group_list must have E={e} (<= {MAX_GROUPS}) entries, got {group_list.numel()}")
    require(group_list_type in (0, 1), name, f"group_list_type must be 0 (cumsum) or 1 (counts), got {group_list_type}")
    g = group_list.long()
    require(bool((g >= 0).all()), name, "group_list must be non-negative")
    if group_list_type == 0:
        require(bool((g[1:] >= g[:-1]).all()), name, "group_list (cumsum) must be non-decreasing")
        ends = g
    else:
        ends = g.cumsum(0)
    require(int(ends[-1]) == m, name, f"group_list must cover x's {m} rows, covers {int(ends[-1])}")
    if a.dtype == torch.int8:
        dtype_in(name, "weight[0]", w, (torch.int8,))
        require(scale is not None and per_token_scale is not None, name, "int8 x needs scale and per_token_scale (per-token mode)")
        s, pts = scale[0], per_token_scale[0]
        dtype_in(name, "scale[0]", s, (torch.float32, torch.bfloat16))
        shape_is(name, "scale[0]", s, (e, n))
        dtype_in(name, "per_token_scale[0]", pts, (torch.float32,))
        shape_is(name, "per_token_scale[0]", pts, (m,))
        dt = out_dtype(name, output_dtype, torch.int8)
        require(dt in HALF, name, f"per-token int8 output_dtype must be bfloat16 or float16, got {dt}")
    else:
        dtype_in(name, "x[0]", a, FLOATS)
        require(w.dtype == a.dtype, name, f"weight[0] dtype must equal x's ({a.dtype}), got {w.dtype}")
        require(scale is None and per_token_scale is None, name, "scale / per_token_scale are for int8 weights")
        dt = out_dtype(name, output_dtype, a.dtype)
        require(dt == a.dtype, name, f"output_dtype must be x's dtype ({a.dtype}) for float inputs, got {dt}")
    out = torch.zeros(m, n, dtype=torch.float64 if a.dtype == torch.int8 else torch.float32)
    lo = 0
    for i, hi in enumerate(ends.tolist()):
        if hi > lo:
            if a.dtype == torch.int8:  # exact int32 accumulation, carried in float64
                acc = a[lo:hi].double() @ w[i].double()
                out[lo:hi] = acc * scale[0][i].double() * per_token_scale[0][lo:hi].double().unsqueeze(-1)
            else:
                out[lo:hi] = f32(a[lo:hi]) @ f32(w[i])
        lo = hi
    return [out.to(dt)]


@op("npu_moe_finalize_routing")
def npu_moe_finalize_routing(chip, expanded_permuted_rows, skip1, skip2, bias, scales, expanded_src_to_dst_row,
                             export_for_source_row, drop_pad_mode=0, k=1):
    """out[i] = skip1[i] + skip2[i] + sum_j scales[i, j] * rows[expanded_src_to_dst_row[i + j * NUM_ROWS]]
    (choice-major index), with rows of shape (NUM_ROWS * K, H)."""
    name = "npu_moe_finalize_routing"
    rows = expanded_permuted_rows
    dtype_in(name, "expanded_permuted_rows", rows, FLOATS)
    dims_in(name, "expanded_permuted_rows", rows, (2,))
    if bias is not None or export_for_source_row is not None:
        unsupported(name, "bias / export_for_source_row")
    require(drop_pad_mode == 0, name, f"drop_pad_mode: only 0 is supported, got {drop_pad_mode}")
    dtype_in(name, "expanded_src_to_dst_row", expanded_src_to_dst_row, (torch.int32,))
    dims_in(name, "expanded_src_to_dst_row", expanded_src_to_dst_row, (1,))
    kk = scales.shape[1] if scales is not None else k
    total = expanded_src_to_dst_row.numel()
    require(kk >= 1 and total % kk == 0, name, f"expanded_src_to_dst_row length {total} must be NUM_ROWS * K (K={kk})")
    num_rows, h = total // kk, rows.shape[1]
    shape_is(name, "expanded_permuted_rows", rows, (num_rows * kk, h))
    if scales is not None:
        require(scales.dtype == rows.dtype, name, f"scales dtype must equal expanded_permuted_rows' ({rows.dtype}), got {scales.dtype}")
        shape_is(name, "scales", scales, (num_rows, kk))
    if skip2 is not None:
        require(skip1 is not None, name, "skip1 must be given when skip2 is")  # the docs: skip2 None => skip1 None
    idx = expanded_src_to_dst_row.long()
    require(bool(((idx >= 0) & (idx < num_rows * kk)).all()), name, f"expanded_src_to_dst_row values must be in [0, {num_rows * kk - 1}]")
    gathered = f32(rows)[idx].view(kk, num_rows, h)  # [j, i, H]
    weights = f32(scales).t().unsqueeze(-1) if scales is not None else torch.ones(kk, num_rows, 1)
    out = (gathered * weights).sum(0)
    for arg, skip in (("skip1", skip1), ("skip2", skip2)):
        if skip is not None:
            require(skip.dtype == rows.dtype and tuple(skip.shape) == (num_rows, h), name, f"{arg} must be {rows.dtype} [{num_rows}, {h}]")
            out = out + f32(skip)
    return out.to(rows.dtype)


def _halves(name, x, dim):
    require(x.shape[dim] % 2 == 0, name, f"x's dim {dim} must be even, got {x.shape[dim]}")
    a, b = x.chunk(2, dim)
    return f32(a), f32(b)


@op("npu_swiglu")
def npu_swiglu(chip, x, dim=-1):
    """swish(A) * B = A * sigmoid(A) * B with A, B the halves of x along dim."""
    name = "npu_swiglu"
    dtype_in(name, "self", x, FLOATS)
    require(1 <= x.dim() <= 8, name, f"self must have 1-8 dims, got {x.dim()}")
    a, b = _halves(name, x, dim)
    return (a * torch.sigmoid(a) * b).to(x.dtype)


@op("npu_clipped_swiglu")
def npu_clipped_swiglu(chip, x, *, group_index=None, dim=-1, alpha=1.702, limit=7.0, bias=1.0, interleaved=True):
    """The docs' formula: A = A.clamp(max=limit), B = B.clamp(-limit, limit),
    y = A * sigmoid(alpha * A) * (B + bias); halves split front/back (interleaved=False) or
    even/odd (True)."""
    name = "npu_clipped_swiglu"
    dtype_in(name, "x", x, FLOATS)
    contiguous(name, "x", x)
    require(x.dim() > 1, name, f"x must have more than 1 dim, got {x.dim()}")
    if group_index is not None:
        unsupported(name, "group_index")
    if interleaved:
        require(x.shape[dim] % 2 == 0, name, f"x's dim {dim} must be even")
        moved = x.movedim(dim, -1)
        a, b = f32(moved[..., 0::2]).movedim(-1, dim), f32(moved[..., 1::2]).movedim(-1, dim)
    else:
        a, b = _halves(name, x, dim)
    a, b = a.clamp(max=limit), b.clamp(-limit, limit)
    return (a * torch.sigmoid(alpha * a) * (b + bias)).to(x.dtype)
