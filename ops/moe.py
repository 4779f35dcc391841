"""Mixture-of-experts family: routing, token permutation, grouped expert GEMMs, SwiGLU, combine.

The pipeline one MoE layer runs (DeepSeek V3 / V3.2 / V4, as transformers'
`DeepseekV3MoE` and `DeepseekV4SparseMoeBlock` compute it):

    weights, ids = moe_route(x, gate_weight, topk, ...)          # [T, k] each
    d = moe_dispatch(x, ids, num_experts)                        # rows grouped by expert
    h = grouped_matmul(d.permuted, gate_up_proj, d.offsets)      # [R, 2I]
    a = swiglu(h, limit)                                         # [R, I]
    y = grouped_matmul(a, down_proj, d.offsets)                  # [R, H]
    out = moe_combine(y, weights, d) + shared_experts(x)         # [T, H]

`moe_forward` is that whole layer in one call (what the model uses): a composite of the other
five, written once here (`composed_moe_forward`) with a replaceable step that carries the routed
rows to their experts and back (`ExpertExchange`: in place on one process, all-to-all for expert
parallelism in `model.expert_parallel`, gathers of the chosen experts where a trace or a compiled
graph cannot hold routing-dependent sizes). Every public op validates its inputs once; composites
call the primitives' backends directly (`dispatch`), so no check runs twice and value-reading
checks read the host once per call (`_check.Values`). Expert weights use
transformers' fused layout: `gate_up_proj [E, 2I, H]` (gate rows first, then up rows) and
`down_proj [E, H, I]`; each may be BF16/float, FP8 (e4m3 + 128x128 block scales), MXFP4 (packed
uint8 + 1x32 ue8m0 scales) or int8 W8A8 (+ one scale per output row), see `v4hal.ops.quant`.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch

from torch.compiler import is_compiling

from v4hal.backends.registry import dispatch, register_op
from v4hal.ops import _check
from v4hal.ops.basic import check_linear_weight, weight_format
from v4hal.ops.quant import FLOAT_IN, FP4_BLOCK, SCALE_FMTS, WEIGHT_BLOCK

__all__ = ["SCORING_FUNCS", "MoeDispatch", "ExpertWeights", "SharedExpertWeights", "ExpertExchange", "expert_format",
           "moe_route", "moe_dispatch", "grouped_matmul", "swiglu", "moe_combine", "moe_forward"]

FAMILY = "moe"
for _op in ("moe_route", "moe_dispatch", "grouped_matmul", "swiglu", "moe_combine", "moe_forward"):
    register_op(_op, FAMILY)

SCORING_FUNCS = ("softmax", "sigmoid", "sqrtsoftplus")
INDEX_DTYPES = (torch.int64, torch.int32)
QUANT_WEIGHT_DTYPES = {torch.float8_e4m3fn: "fp8", torch.uint8: "fp4", torch.int8: "int8"}


class MoeDispatch(NamedTuple):
    """What `moe_dispatch` returns and `moe_combine` consumes.

    permuted: `[R, H]` token rows, expert 0's rows first, then expert 1's, ...; inside one expert,
      rows in increasing (token, slot) order. R = T * k without a capacity.
    counts: int64 `[E]` rows per expert (after any capacity drop).
    offsets: int64 `[E + 1]`, `offsets[e]:offsets[e+1]` are expert e's rows (`offsets[0] = 0`).
    token_index: int64 `[R]`, the token each row came from.
    row_of_slot: int64 `[T, k]`, the row holding token t's j-th choice, -1 if it was dropped.
    """

    permuted: torch.Tensor
    counts: torch.Tensor
    offsets: torch.Tensor
    token_index: torch.Tensor
    row_of_slot: torch.Tensor

    @property
    def dropped(self) -> torch.Tensor:
        """bool `[T, k]`: which (token, choice) pairs a capacity limit dropped."""
        return self.row_of_slot < 0


class ExpertWeights(NamedTuple):
    """Routed experts in transformers' fused layout; scales only for quantized weights;
    act_scale_fmt: FP8 activation scales, "fp32" or "ue8m0" (see `v4hal.ops.linear`)."""

    gate_up: torch.Tensor
    down: torch.Tensor
    gate_up_scale: torch.Tensor | None = None
    down_scale: torch.Tensor | None = None
    act_scale_fmt: str = "fp32"


class SharedExpertWeights(NamedTuple):
    """Shared expert(s) as nn.Linear weights `[I_s, H]`, `[I_s, H]`, `[H, I_s]`, any
    `v4hal.ops.linear` format (scales only for quantized weights; act_scale_fmt as in
    `ExpertWeights`)."""

    gate: torch.Tensor
    up: torch.Tensor
    down: torch.Tensor
    gate_scale: torch.Tensor | None = None
    up_scale: torch.Tensor | None = None
    down_scale: torch.Tensor | None = None
    act_scale_fmt: str = "fp32"


def expert_format(weight: torch.Tensor) -> str:
    """'dense', 'fp8', 'fp4' or 'int8' for a stacked expert weight `[E, N, K]`, by dtype."""
    if weight.dtype in FLOAT_IN:
        return "dense"
    return QUANT_WEIGHT_DTYPES.get(weight.dtype, "?")


def _route_inputs(op: str, values: _check.Values, hidden: torch.Tensor, gate_weight: torch.Tensor, topk: int,
                  scoring: str, bias: torch.Tensor | None, n_group: int, topk_group: int,
                  routed_scaling_factor: float, input_ids: torch.Tensor | None,
                  tid2eid: torch.Tensor | None) -> None:
    """The routing arguments' checks shared by `moe_route` and `moe_forward`; the hash ids' ranges
    go to `values`, decided by the caller."""
    _check.tensor(op, "hidden", hidden, dtypes=FLOAT_IN, ndim=range(1, 9))
    _check.tensor(op, "gate_weight", gate_weight, dtypes=FLOAT_IN, ndim=2)
    n_experts, h = gate_weight.shape
    _check.equal(op, "gate_weight", h, hidden.shape[-1], "columns = last dim of hidden")
    _check.positive_int(op, "topk", topk)
    if topk > n_experts:
        raise _check.OpInputError(op, "topk", f"at most the number of experts ({n_experts})", topk)
    _check.choice(op, "scoring", scoring, SCORING_FUNCS)
    if bias is not None:
        _check.tensor(op, "bias", bias, dtypes=FLOAT_IN, ndim=1)
        _check.equal(op, "bias", bias.shape[0], n_experts, "length = number of experts")
    _check.positive_int(op, "n_group", n_group)
    _check.positive_int(op, "topk_group", topk_group)
    if n_experts % n_group:
        raise _check.OpInputError(op, "n_group", f"a divisor of the number of experts ({n_experts})", n_group)
    if topk_group > n_group:
        raise _check.OpInputError(op, "topk_group", f"at most n_group ({n_group})", topk_group)
    if topk > topk_group * (n_experts // n_group):
        raise _check.OpInputError(op, "topk", f"at most topk_group * experts per group "
                                  f"({topk_group * (n_experts // n_group)})", topk)
    if not isinstance(routed_scaling_factor, (int, float)) or isinstance(routed_scaling_factor, bool):
        raise _check.OpInputError(op, "routed_scaling_factor", "a float", repr(routed_scaling_factor))
    if (input_ids is None) != (tid2eid is None):
        missing = "tid2eid" if tid2eid is None else "input_ids"
        raise _check.OpInputError(op, missing, "given together with " + ("input_ids" if tid2eid is None else "tid2eid")
                                  + " (hash routing needs both)", "None")
    if tid2eid is not None:
        _check.tensor(op, "tid2eid", tid2eid, dtypes=INDEX_DTYPES, ndim=2)
        _check.shape(op, "tid2eid", tid2eid, (tid2eid.shape[0], topk), "[vocab, topk]")
        _check.tensor(op, "input_ids", input_ids, dtypes=INDEX_DTYPES)
        _check.shape(op, "input_ids", input_ids, tuple(hidden.shape[:-1]), "one id per token of hidden")
        values.in_range("input_ids", input_ids, 0, tid2eid.shape[0], "rows of tid2eid")
        values.in_range("tid2eid", tid2eid, 0, n_experts, "expert ids")
    _check.same_device(op, hidden=hidden, gate_weight=gate_weight, bias=bias, input_ids=input_ids, tid2eid=tid2eid)


def moe_route(hidden: torch.Tensor, gate_weight: torch.Tensor, topk: int, scoring: str = "softmax",
              bias: torch.Tensor | None = None, n_group: int = 1, topk_group: int = 1,
              renormalize: bool = True, routed_scaling_factor: float = 1.0,
              input_ids: torch.Tensor | None = None, tid2eid: torch.Tensor | None = None):
    """Choose `topk` experts per token and their combine weights.

    logits = hidden @ gate_weight.T, computed in float32 (float64 for float64 input);
    scores = softmax(logits) | sigmoid(logits) | sqrt(softplus(logits)) (`scoring`).
    Selection (noaux_tc): `choice = scores + bias` (bias only steers the choice, never the weight).
    With `n_group > 1` the E experts form n_group equal groups scored by the sum of their top-2
    choice scores when a bias is given, else by their maximum; only the best `topk_group` groups
    stay eligible. ids = top-k of the choice scores, in descending order.
    Hash routing (DeepSeek-V4's first layers): with `input_ids` and `tid2eid` the ids are
    `tid2eid[input_ids]` instead; the weights still come from the scores.
    weights = scores gathered at ids; if `renormalize`, divided by (their sum + 1e-20);
    then times `routed_scaling_factor`.

    hidden: float `[..., H]` (flattened to T tokens); gate_weight: float `[E, H]`; bias: float
    `[E]`; input_ids: int `hidden.shape[:-1]`; tid2eid: int `[vocab, topk]` with values in [0, E).
    Returns (weights float32 `[T, topk]` (float64 for float64 input), ids int64 `[T, topk]`).
    This is transformers' DeepseekV3TopkRouter (scoring "sigmoid", groups),
    DeepseekV4TopKRouter (renormalize=True) and DeepseekV4HashRouter.
    """
    op = "moe_route"
    values = _check.Values(op)
    _route_inputs(op, values, hidden, gate_weight, topk, scoring, bias, n_group, topk_group, routed_scaling_factor,
                  input_ids, tid2eid)
    values.decide()
    return dispatch(op)(hidden.reshape(-1, gate_weight.shape[1]), gate_weight, topk, scoring, bias, n_group,
                        topk_group, bool(renormalize), float(routed_scaling_factor),
                        None if input_ids is None else input_ids.reshape(-1), tid2eid)


def moe_dispatch(hidden: torch.Tensor, topk_ids: torch.Tensor, num_experts: int,
                 capacity: int | None = None) -> MoeDispatch:
    """Permute token rows so each expert's rows are contiguous (see `MoeDispatch`).

    hidden: `[T, H]` any dtype; topk_ids: int `[T, k]` in [0, num_experts). Dropless by default;
    with `capacity`, expert e keeps only its first `capacity` rows in (token, slot) order and the
    rest are reported in `row_of_slot` as -1 (`MoeDispatch.dropped`).
    """
    op = "moe_dispatch"
    _check.tensor(op, "hidden", hidden, ndim=2)
    _check.tensor(op, "topk_ids", topk_ids, dtypes=INDEX_DTYPES, ndim=2)
    _check.equal(op, "topk_ids", topk_ids.shape[0], hidden.shape[0], "rows = tokens of hidden")
    _check.positive_int(op, "num_experts", num_experts)
    if capacity is not None:
        _check.positive_int(op, "capacity", capacity)
    _check.same_device(op, hidden=hidden, topk_ids=topk_ids)
    _check.Values(op).in_range("topk_ids", topk_ids, 0, num_experts, "expert ids").decide()
    return dispatch(op)(hidden, topk_ids, num_experts, capacity)


def _expert_scale_shape(fmt: str, n_experts: int, n: int, k: int) -> tuple[int, ...] | None:
    return {"dense": None,
            "fp8": (n_experts, math.ceil(n / WEIGHT_BLOCK[0]), math.ceil(k / WEIGHT_BLOCK[1])),
            "fp4": (n_experts, n, math.ceil(k / FP4_BLOCK)),
            "int8": (n_experts, n)}[fmt]


def _check_expert_weight(op: str, arg: str, weight: torch.Tensor, scale: torch.Tensor | None,
                         k: int | None) -> tuple[str, int, int]:
    """(format, N, K) of a stacked expert weight, after checking it and its scale's shape."""
    _check.tensor(op, arg, weight, ndim=3)
    fmt = expert_format(weight)
    if fmt == "?":
        raise _check.OpInputError(op, arg, "dtype float, float8_e4m3fn, uint8 (fp4) or int8", _check.describe(weight))
    n_experts, n = weight.shape[0], weight.shape[1]
    wk = weight.shape[2] * (2 if fmt == "fp4" else 1)
    if k is not None:
        _check.equal(op, arg, wk, k, "K (input features) = last dim of the activations")
    expected = _expert_scale_shape(fmt, n_experts, n, wk)
    scale_arg = f"{arg}_scale" if arg != "weight" else "scale"
    if expected is None and scale is not None:
        raise _check.OpInputError(op, scale_arg, "None for a float weight", _check.describe(scale))
    if expected is not None:
        if scale is None:
            raise _check.OpInputError(op, scale_arg, f"a scale of shape {expected} for a {fmt} weight", "None")
        _check.tensor(op, scale_arg, scale, ndim=len(expected))
        _check.shape(op, scale_arg, scale, expected, f"{fmt} experts [{n_experts}, {n}, {wk}]")
    return fmt, n, wk


def _chosen(stack: torch.Tensor | None, ids: torch.Tensor, all_here: bool = True) -> torch.Tensor | None:
    """The slices of an expert stack `[E, ...]` that `ids` (expert ids of this stack, any shape;
    unless `all_here`, ids outside [0, E) are experts held elsewhere) name, without a host read:
    gathered when there are fewer ids than experts (decode checks a few experts' scales, not all of
    them), else the stack with the experts not named zeroed. For value checks only."""
    if stack is None or not _check.reads(stack):
        return None
    if stack.dtype == torch.float8_e8m0fnu:
        stack = stack.view(torch.uint8)  # the same exponent bytes; gathers and where need a plain dtype
    ids = ids.reshape(-1)
    n = stack.shape[0]
    if all_here and ids.numel() < n:
        return stack[ids.clamp(0, n - 1)]
    named = torch.zeros(n + 1, dtype=torch.bool, device=stack.device)
    named[torch.where((ids >= 0) & (ids < n), ids, n)] = True
    return torch.where(named[:n].view(-1, *(1,) * (stack.dim() - 1)), stack, 0)


def _offsets_stats(offsets: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """(first, last, smallest step) of group offsets, for `Values.require`."""
    steps = offsets[1:] - offsets[:-1]
    smallest = steps.amin() if steps.numel() else offsets.new_zeros(())
    return offsets[0], offsets[-1], smallest


def grouped_matmul(x: torch.Tensor, weight: torch.Tensor, group_offsets: torch.Tensor,
                   scale: torch.Tensor | None = None, act_scale_fmt: str = "fp32") -> torch.Tensor:
    """One GEMM per expert over its contiguous rows: `y[o_e:o_(e+1)] = x[o_e:o_(e+1)] @ W_e.T`.

    x: float `[R, K]`; weight: `[E, N, K]` stacked experts (fp4: `[E, N, K/2]` packed) in any
    `v4hal.ops.linear` format, with `scale` `[E, ...]` = that format's per-expert scale stacked
    (fp8 `[E, ceil(N/128), ceil(K/128)]`, fp4 `[E, N, K/32]`, int8 `[E, N]`). Each expert's
    product is exactly `v4hal.ops.linear(x_e, W_e, scale_e, act_scale_fmt=act_scale_fmt)` (FP8:
    activations quantized per 1x128 block, scales in act_scale_fmt; int8: per token; FP4:
    weight-only). group_offsets: int `[E + 1]`, non-decreasing from 0 to R. Returns `[R, N]` in
    x's dtype. NaN/Inf rows are refused where the format quantizes them (fp8, int8), and so are
    bad scales of the experts that get rows.
    """
    op = "grouped_matmul"
    _check.tensor(op, "x", x, dtypes=FLOAT_IN, ndim=2, nonempty=False)
    _check.choice(op, "act_scale_fmt", act_scale_fmt, SCALE_FMTS)
    fmt, _, _ = _check_expert_weight(op, "weight", weight, scale, x.shape[1])
    rows, n_experts = x.shape[0], weight.shape[0]
    _check.tensor(op, "group_offsets", group_offsets, dtypes=INDEX_DTYPES, ndim=1)
    _check.shape(op, "group_offsets", group_offsets, (n_experts + 1,), "one more than the number of experts")
    _check.same_device(op, x=x, weight=weight, group_offsets=group_offsets, scale=scale)
    values = _check.Values(op)
    if _check.reads(group_offsets):
        values.require("group_offsets", _offsets_stats(group_offsets), lambda v: v[0] == 0 and v[1] == rows and v[2] >= 0,
                       f"non-decreasing, from 0 to the {rows} rows of x",
                       lambda v: f"from {int(v[0])} to {int(v[1])}" + (", decreasing somewhere" if v[2] < 0 else ""))
        if scale is not None:
            # The expert of each row (a few at decode); out-of-range offsets are refused above.
            row_expert = torch.searchsorted(group_offsets[1:], torch.arange(rows, device=x.device), right=True)
            values.scales(scale=_chosen(scale, row_expert))
    values.finite("x", x if fmt in ACT_QUANTIZING else None).decide()
    return dispatch(op)(x, weight, group_offsets, scale, fmt, act_scale_fmt)


def swiglu(gate_up: torch.Tensor, limit: float | None = None) -> torch.Tensor:
    """`silu(gate) * up` with gate = first half of the last dim, up = second half.

    With `limit` (DeepSeek-V4's swiglu_limit): gate clamped to <= limit, up to [-limit, limit]
    before the product (transformers' DeepseekV4Experts / DeepseekV4MLP). The reference computes
    in float32 (float64 for float64 input); fast backends may keep BF16 intermediates, as
    transformers does. Returned in gate_up's dtype: `[..., 2I] -> [..., I]`.
    """
    op = "swiglu"
    _check.tensor(op, "gate_up", gate_up, dtypes=FLOAT_IN, ndim=range(1, 9), nonempty=False)
    if gate_up.shape[-1] % 2:
        raise _check.OpInputError(op, "gate_up", "an even last dim (gate and up halves)", _check.describe(gate_up))
    return dispatch(op)(gate_up, _limit(op, "limit", limit))


def _limit(op: str, arg: str, limit: object) -> float | None:
    if limit is not None and not (isinstance(limit, (int, float)) and not isinstance(limit, bool) and limit > 0):
        raise _check.OpInputError(op, arg, "None or a positive float", repr(limit))
    return None if limit is None else float(limit)


def moe_combine(expert_out: torch.Tensor, topk_weights: torch.Tensor, state: MoeDispatch) -> torch.Tensor:
    """Undo `moe_dispatch`: `out[t] = sum_j topk_weights[t, j] * expert_out[row_of_slot[t, j]]`
    over the choices that were not dropped, accumulated in float32 (float64 if expert_out is),
    returned in expert_out's dtype. expert_out: `[R, H]`; topk_weights: float `[T, k]`."""
    op = "moe_combine"
    _check.tensor(op, "expert_out", expert_out, dtypes=FLOAT_IN, ndim=2, nonempty=False)
    _check.tensor(op, "topk_weights", topk_weights, dtypes=FLOAT_IN, ndim=2)
    if not isinstance(state, MoeDispatch):
        raise _check.OpInputError(op, "state", "the MoeDispatch moe_dispatch returned", _check.describe(state))
    _check.shape(op, "topk_weights", topk_weights, tuple(state.row_of_slot.shape), "[tokens, topk] of the dispatch")
    _check.equal(op, "expert_out", expert_out.shape[0], state.token_index.shape[0], "rows = rows of the dispatch")
    _check.same_device(op, expert_out=expert_out, topk_weights=topk_weights, row_of_slot=state.row_of_slot)
    return dispatch(op)(expert_out, topk_weights, state)


# -- composites: unchecked, built from the primitives' backends; for backends and the model ------

ACT_QUANTIZING = ("fp8", "int8")  # formats whose products quantize their activations (which refuse NaN/Inf)


def composed_grouped_matmul(x, weight, group_offsets, scale, fmt, act_scale_fmt):
    """`grouped_matmul` as one `linear` per expert with rows (each on the backend `linear` picks):
    the reference, and every backend's path for a format it has no grouped kernel for."""
    out = x.new_empty(x.shape[0], weight.shape[1])
    bounds = group_offsets.tolist()
    linear = dispatch("linear")
    for e in range(weight.shape[0]):
        start, end = bounds[e], bounds[e + 1]
        if end > start:
            out[start:end] = linear(x[start:end], weight[e], None if scale is None else scale[e], None, fmt,
                                    act_scale_fmt)
    return out


def shared_expert(x: torch.Tensor, shared: SharedExpertWeights, swiglu_limit: float | None) -> torch.Tensor:
    """`down(swiglu(cat(gate x, up x), swiglu_limit))` through `linear` and `swiglu`'s backends."""
    linear, fmt = dispatch("linear"), shared.act_scale_fmt
    gate = linear(x, shared.gate, shared.gate_scale, None, weight_format(shared.gate, shared.gate_scale), fmt)
    up = linear(x, shared.up, shared.up_scale, None, weight_format(shared.up, shared.up_scale), fmt)
    act = dispatch("swiglu")(torch.cat([gate, up], dim=-1), swiglu_limit)
    return linear(act, shared.down, shared.down_scale, None, weight_format(shared.down, shared.down_scale), fmt)


def _expert_ffn(rows: torch.Tensor, offsets: torch.Tensor, experts: ExpertWeights, swiglu_limit: float | None):
    """Rows grouped by expert through `down(swiglu(gate_up(row)))` of their experts."""
    fmt, gmm = experts.act_scale_fmt, dispatch("grouped_matmul")
    h = gmm(rows, experts.gate_up, offsets, experts.gate_up_scale, expert_format(experts.gate_up), fmt)
    act = dispatch("swiglu")(h, swiglu_limit)
    return gmm(act, experts.down, offsets, experts.down_scale, expert_format(experts.down), fmt)


class ExpertExchange:
    """The step of the MoE composite that takes each token's routed rows to their experts and the
    results back: `moe_dispatch` groups the rows by expert, `send` delivers them to the experts'
    owner (here: nobody else, so as they are), the owner runs its experts, `receive` returns the
    results, `moe_combine` weights them back into tokens. `shards`: processes the routed experts
    are spread over (the weights a call gets are 1/shards of them). Subclass `send` / `receive` for another transport
    (`model.expert_parallel.AllToAll`), or `__call__` for another way through the experts."""

    shards = 1

    def first_expert(self, held: int) -> int:
        """The global id of the first of the `held` experts this process holds."""
        return 0

    def send(self, state: MoeDispatch) -> tuple[torch.Tensor, torch.Tensor, object]:
        """(rows grouped by this process's experts, their `[E_local + 1]` offsets, what `receive`
        needs to undo the trip)."""
        return state.permuted, state.offsets, None

    def receive(self, results: torch.Tensor, sent: object) -> torch.Tensor:
        """The results of `send`'s rows, back in `state.permuted`'s order."""
        return results

    def __call__(self, x, weights, ids, experts: ExpertWeights, swiglu_limit):
        state = dispatch("moe_dispatch")(x, ids, experts.gate_up.shape[0] * self.shards, None)
        rows, offsets, sent = self.send(state)
        results = _expert_ffn(rows, offsets, experts, swiglu_limit)
        return dispatch("moe_combine")(self.receive(results, sent), weights, state)


class GatheredExperts(ExpertExchange):
    """Float experts without the dispatch: `sum_j weights[t, j] * down_e @ swiglu(gate_up_e @ x[t])`,
    e = ids[t, j], as gathers of the chosen experts' weights feeding reductions, in float32 (float64
    for float64 input), cast to x's dtype once. No size depends on the routing, so a trace (the
    ONNX exporter) or a compiled graph holds it; it reads one expert per (token, choice) where the
    dispatch reads each chosen expert once."""

    def __call__(self, x, weights, ids, experts: ExpertWeights, swiglu_limit):
        cd = torch.float64 if x.dtype == torch.float64 else torch.float32
        gate_up = (experts.gate_up[ids].to(cd) * x.to(cd)[:, None, None, :]).sum(-1)  # [T, k, 2I]
        act = dispatch("swiglu")(gate_up, swiglu_limit)
        down = (experts.down[ids].to(cd) * act.unsqueeze(-2)).sum(-1)  # [T, k, H]
        return (weights.to(cd).unsqueeze(-1) * down).sum(1).to(x.dtype)


IN_PLACE, GATHERED = ExpertExchange(), GatheredExperts()


def _exchange_here(ids: torch.Tensor, experts: ExpertWeights) -> ExpertExchange:
    """Gathers where the dispatch's routing-dependent sizes cannot be held: always under a trace,
    and in a compiled graph while the (token, choice) pairs are at most the experts (where the
    gathers read no more than the dispatch); quantized experts keep the dispatch."""
    if experts.gate_up_scale is None and experts.gate_up.is_floating_point() and (
            torch.jit.is_tracing() or is_compiling() and ids.numel() <= experts.gate_up.shape[0]):
        return GATHERED
    return IN_PLACE


def composed_moe_forward(x, weights, ids, experts, swiglu_limit, shared, exchange: ExpertExchange | None = None):
    """The MoE layer after routing: routed experts through `exchange` (default: in place, or
    gathered under a trace or compilation), plus the shared expert. x `[T, H]`. Unchecked."""
    out = (exchange or _exchange_here(ids, experts))(x, weights, ids, experts, swiglu_limit)
    return out if shared is None else out + shared_expert(x, shared, swiglu_limit)


def moe_forward(hidden: torch.Tensor, gate_weight: torch.Tensor, experts: ExpertWeights, topk: int,
                scoring: str = "softmax", bias: torch.Tensor | None = None, n_group: int = 1,
                topk_group: int = 1, renormalize: bool = True, routed_scaling_factor: float = 1.0,
                input_ids: torch.Tensor | None = None, tid2eid: torch.Tensor | None = None,
                swiglu_limit: float | None = None, shared: SharedExpertWeights | None = None,
                exchange: ExpertExchange | None = None) -> torch.Tensor:
    """The MoE layer: `moe_route` (same routing arguments) -> `moe_dispatch` -> up
    `grouped_matmul` -> `swiglu(limit=swiglu_limit)` -> down `grouped_matmul` -> `moe_combine`,
    plus the shared expert `down(swiglu(cat(gate x, up x), swiglu_limit))` when `shared` is given
    (V4 clamps its shared expert too; V3 has no limit).

    hidden: float `[..., H]`; experts: `ExpertWeights` (`gate_up [E, 2I, H]`, `down [E, H, I]`);
    returns hidden's shape and dtype. Matches transformers' DeepseekV4SparseMoeBlock (hash or
    top-k router) and DeepseekV3MoE on the same weights. exchange: None (one process holds every
    expert; the backend picked for `moe_forward` runs the layer after routing), or an
    `ExpertExchange` whose `shards` processes each hold `E / shards` of the experts (`experts`
    is this process's share, `gate_weight` still routes over all E).
    """
    op = "moe_forward"
    if exchange is not None and not isinstance(exchange, ExpertExchange):
        raise _check.OpInputError(op, "exchange", "None or an ExpertExchange", _check.describe(exchange))
    _check.tensor(op, "hidden", hidden, dtypes=FLOAT_IN, ndim=range(1, 9))
    if not isinstance(experts, ExpertWeights):
        raise _check.OpInputError(op, "experts", "an ExpertWeights", _check.describe(experts))
    h = hidden.shape[-1]
    fmt_up, two_i, _ = _check_expert_weight(op, "gate_up", experts.gate_up, experts.gate_up_scale, h)
    if two_i % 2:
        raise _check.OpInputError(op, "gate_up", "an even row count (gate rows then up rows)", _check.describe(experts.gate_up))
    fmt_down, n_down, _ = _check_expert_weight(op, "down", experts.down, experts.down_scale, two_i // 2)
    _check.equal(op, "down", n_down, h, "rows (output features) = hidden size")
    n_local = experts.gate_up.shape[0]
    _check.equal(op, "down", experts.down.shape[0], n_local, "expert count = that of gate_up")
    shards = 1 if exchange is None else exchange.shards
    _check.tensor(op, "gate_weight", gate_weight, dtypes=FLOAT_IN, ndim=2)
    _check.equal(op, "gate_weight", gate_weight.shape[0], n_local * shards,
                 "rows = number of experts" + (f" ({shards} x the {n_local} held here)" if shards > 1 else ""))
    values = _check.Values(op)
    _route_inputs(op, values, hidden, gate_weight, topk, scoring, bias, n_group, topk_group, routed_scaling_factor,
                  input_ids, tid2eid)
    _check.choice(op, "experts.act_scale_fmt", experts.act_scale_fmt, SCALE_FMTS)
    if shared is not None and not isinstance(shared, SharedExpertWeights):
        raise _check.OpInputError(op, "shared", "a SharedExpertWeights or None", _check.describe(shared))
    formats = {fmt_up, fmt_down}
    if shared is not None:
        _check.choice(op, "shared.act_scale_fmt", shared.act_scale_fmt, SCALE_FMTS)
        for arg, w, s, k in (("shared.gate", shared.gate, shared.gate_scale, h), ("shared.up", shared.up, shared.up_scale, h),
                             ("shared.down", shared.down, shared.down_scale, shared.gate.shape[0])):
            formats.add(check_linear_weight(op, arg, w, s, k)[0])
        _check.equal(op, "shared.up", shared.up.shape[0], shared.gate.shape[0], "rows = rows of shared.gate")
        _check.equal(op, "shared.down", shared.down.shape[0], h, "rows (output features) = hidden size")
        values.scales(**{"shared.gate_scale": shared.gate_scale, "shared.up_scale": shared.up_scale,
                         "shared.down_scale": shared.down_scale})
    swiglu_limit = _limit(op, "swiglu_limit", swiglu_limit)
    values.finite("hidden", hidden if formats & set(ACT_QUANTIZING) else None)
    x = hidden.reshape(-1, h)
    flat_ids = None if input_ids is None else input_ids.reshape(-1)

    def route():
        return dispatch("moe_route")(x, gate_weight, topk, scoring, bias, n_group, topk_group, bool(renormalize),
                                     float(routed_scaling_factor), flat_ids, tid2eid)

    # One host read decides every value check. Hash routing knows its experts before routing (and
    # must not route out-of-range ids), so it decides first; top-k routing routes first.
    if tid2eid is not None:
        _chosen_scales(values, experts, exchange, tid2eid[flat_ids.clamp(0, tid2eid.shape[0] - 1)])
        values.decide()
        weights, ids = route()
    else:
        weights, ids = route()
        _chosen_scales(values, experts, exchange, ids)
        values.decide()
    if exchange is None:
        return dispatch(op)(x, weights, ids, experts, swiglu_limit, shared).reshape(hidden.shape)
    return composed_moe_forward(x, weights, ids, experts, swiglu_limit, shared, exchange).reshape(hidden.shape)


def _chosen_scales(values: _check.Values, experts: ExpertWeights, exchange: ExpertExchange | None,
                   ids: torch.Tensor) -> None:
    """Adds the scales of the routed experts `ids` (global ids) chose that this process holds."""
    if experts.gate_up_scale is None and experts.down_scale is None or not _check.reads(ids):
        return
    here = ids if exchange is None else ids - exchange.first_expert(experts.gate_up.shape[0])
    values.scales(gate_up_scale=_chosen(experts.gate_up_scale, here, exchange is None),
                  down_scale=_chosen(experts.down_scale, here, exchange is None))
