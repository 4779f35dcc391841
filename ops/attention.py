"""Sparse attention family: DeepSeek-V4's compressed KV (CSA / HCA), the lightning indexer, and
attention over gathered entries with a sliding window and a per-head sink (V4), or MLA in its
absorbed form (V3.2's DSA).

How the pieces compose (see model/attention_v4.py, model/attention_v32.py):
- `kv_compress` pools windows of `ratio` projected tokens into one KV entry (softmax gate with a
  learned per-slot bias, then RMSNorm). The caller applies RoPE to the entries at their window's
  first position (`apply_rope`), because V4 and V3.2 lay RoPE out differently.
- `indexer_scores` / `indexer_topk` (or the fused `indexer_select`) choose, per query, the `k`
  compressed entries with the highest `sum_h w_h * relu(q_h . k_t)`; slots a query may not see
  yet come back as -1.
- `sparse_attention` attends each query over the KV rows its index list names (-1 = no entry).
  The sliding window is a second index list (`window_indices`) into the raw-token rows of the
  same KV tensor; the two lists are concatenated. This is the layout FlashMLA's sparse kernel and
  `npu_sparse_flash_attention` consume, so a paged cache only changes how rows are addressed.
- `window_attention` is the sliding-window part alone (V4's sliding-only layers), so dense
  banded kernels (`npu_fused_infer_attention_score_v2` with its band mode) can run it.

Index dtype: indices come back as int32 (what FlashMLA and `npu_sparse_flash_attention` take);
int32 and int64 are accepted everywhere.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from v4hal.backends.registry import dispatch, register_op
from v4hal.ops import _check

__all__ = ["CompressState", "apply_rope", "layer_norm", "kv_compress", "indexer_scores",
           "indexer_topk", "indexer_select", "sparse_attention", "window_indices", "window_attention"]

FAMILY = "attention"
for _op in ("apply_rope", "layer_norm", "kv_compress", "indexer_scores", "indexer_topk",
            "indexer_select", "sparse_attention", "window_attention"):
    register_op(_op, FAMILY)

FLOATS = (torch.float32, torch.float64, torch.bfloat16, torch.float16)
INDEX = (torch.int32, torch.int64)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, interleaved: bool = True) -> torch.Tensor:
    """Rotate the whole last dim of `x` ([..., R], R even) by angles whose cos/sin are given
    per pair ([..., R/2], broadcastable against x[..., :R/2]).

    interleaved=True pairs channels (2i, 2i+1) (DeepSeek's layout, V4 and V3.2's MLA);
    False pairs (i, i + R/2) (V3.2's indexer). Pair (a, b) -> (a cos - b sin, b cos + a sin), in
    float32 (float64 if x is), cast back to x's dtype. Pass -sin to undo a rotation.
    """
    op = "apply_rope"
    _check.tensor(op, "x", x, dtypes=FLOATS, ndim=range(1, 9))
    if x.shape[-1] % 2:
        raise _check.OpInputError(op, "x", "an even last dim (channel pairs)", _check.describe(x))
    half = x.shape[-1] // 2
    for name, t in (("cos", cos), ("sin", sin)):
        _check.tensor(op, name, t, dtypes=FLOATS)
        _check.equal(op, name, t.shape[-1], half, "last dim = half the last dim of x")
        _check.broadcastable(op, name, t, (*x.shape[:-1], half))
    return dispatch(op)(x, cos, sin, bool(interleaved))


def layer_norm(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, eps: float = 1e-6) -> torch.Tensor:
    """`(x - mean) * rsqrt(var + eps) * weight + bias` over the last dim (biased variance), in
    float32 (float64 if x is), cast back to x's dtype. V3.2's indexer key norm."""
    op = "layer_norm"
    _check.tensor(op, "x", x, dtypes=FLOATS, ndim=range(1, 9))
    _check.tensor(op, "weight", weight, dtypes=FLOATS, ndim=1)
    _check.equal(op, "weight", weight.shape[0], x.shape[-1], "length = last dim of x")
    if bias is not None:
        _check.tensor(op, "bias", bias, dtypes=FLOATS, ndim=1)
        _check.equal(op, "bias", bias.shape[0], x.shape[-1], "length = last dim of x")
    if not (isinstance(eps, float) and eps > 0):
        raise _check.OpInputError(op, "eps", "a positive float", repr(eps))
    return dispatch(op)(x, weight, bias, eps)


@dataclass(frozen=True)
class CompressState:
    """What `kv_compress` carries between calls for one sequence batch.

    kv / gate: projected tokens of the window still open, `[B, n, C]` with n < ratio (n may be 0).
    prev_kv / prev_gate: the overlapping (CSA) variant's first series of the last closed window,
      `[B, ratio, D]`, its gate with the position bias already added; None before the first
      window closes (and always for the plain variant).
    emitted: entries produced so far; the next entry pools tokens from `emitted * ratio` on.
    """

    kv: torch.Tensor
    gate: torch.Tensor
    prev_kv: torch.Tensor | None = None
    prev_gate: torch.Tensor | None = None
    emitted: int = 0


def kv_compress(kv: torch.Tensor, gate: torch.Tensor, position_bias: torch.Tensor, norm_weight: torch.Tensor,
                ratio: int, *, overlap: bool = False, eps: float = 1e-6,
                state: CompressState | None = None) -> tuple[torch.Tensor, CompressState]:
    """V4's KV compressor: one entry per closed window of `ratio` tokens.

    kv, gate: `[B, S, C]` projected tokens (kv_proj(x), gate_proj(x)), any S >= 0 (S may not fill
    a window: the rest waits in the returned state). position_bias: `[ratio, C]`. norm_weight: `[D]`.

    Plain (HCA, overlap=False, C = D): entry w = RMSNorm(sum_{j<ratio} softmax_j(gate_wj + bias_j)
    * kv_wj), softmax per channel over the window's slots.
    Overlapping (CSA, overlap=True, C = 2D): channels [:D] are series a, [D:] series b; entry w
    pools series a of window w-1 and series b of window w (2*ratio slots, stride ratio) with one
    softmax over all 2*ratio slots; window w-1 of the very first window is empty (weight 0).

    Returns (entries `[B, W, D]` in kv's dtype, new state); entry i of this call is the window
    starting at token `(state.emitted + i) * ratio`. RoPE is the caller's (see module doc).
    """
    op = "kv_compress"
    _check.tensor(op, "kv", kv, dtypes=FLOATS, ndim=3, nonempty=False)
    _check.tensor(op, "gate", gate, dtypes=FLOATS, ndim=3, nonempty=False)
    _check.shape(op, "gate", gate, tuple(kv.shape), "same as kv")
    ratio = _check.positive_int(op, "ratio", ratio)
    b, _, c = kv.shape
    if overlap and c % 2:
        raise _check.OpInputError(op, "kv", "an even channel count (two series) when overlap=True", _check.describe(kv))
    d = c // 2 if overlap else c
    _check.tensor(op, "position_bias", position_bias, dtypes=FLOATS, ndim=2)
    _check.shape(op, "position_bias", position_bias, (ratio, c), "[ratio, channels of kv]")
    _check.tensor(op, "norm_weight", norm_weight, dtypes=FLOATS, ndim=1)
    _check.shape(op, "norm_weight", norm_weight, (d,), "[entry dim]")
    if state is None:
        state = CompressState(kv.new_zeros(b, 0, c), gate.new_zeros(b, 0, c))
    elif not isinstance(state, CompressState):
        raise _check.OpInputError(op, "state", "a CompressState or None", _check.describe(state))
    elif state.kv.dim() != 3 or state.kv.shape[0] != b or state.kv.shape[2] != c:
        raise _check.OpInputError(op, "state", f"open-window tokens of shape [{b}, n, {c}] (batch and channels of kv)",
                                  f"state.kv {_check.describe(state.kv)}")
    if state.kv.shape[1] + kv.shape[1] == 0:
        return kv.new_zeros(b, 0, d), state
    kv_all = torch.cat([state.kv, kv.to(state.kv.dtype)], 1) if state.kv.shape[1] else kv
    gate_all = torch.cat([state.gate, gate.to(state.gate.dtype)], 1) if state.gate.shape[1] else gate
    usable = kv_all.shape[1] // ratio * ratio
    rest = CompressState(kv_all[:, usable:], gate_all[:, usable:], state.prev_kv, state.prev_gate,
                         state.emitted + usable // ratio)
    if usable == 0:
        return kv.new_zeros(b, 0, d), rest
    ckv, cgate = kv_all[:, :usable], gate_all[:, :usable]
    entries = dispatch(op)(ckv, cgate, position_bias, norm_weight, ratio, bool(overlap), eps,
                           state.prev_kv if overlap else None, state.prev_gate if overlap else None)
    if overlap:
        last_kv = ckv[:, -ratio:, :d]
        last_gate = cgate[:, -ratio:, :d] + position_bias[:, :d].to(cgate.dtype)
        rest = CompressState(rest.kv, rest.gate, last_kv, last_gate, rest.emitted)
    return entries, rest


def _query_kv(op: str, q: torch.Tensor, kv: torch.Tensor) -> tuple[int, int, int, int]:
    """Checks q `[B, S, H, D]` against a shared KV `[B, N, D]`; returns q's shape."""
    _check.tensor(op, "q", q, dtypes=FLOATS, ndim=4)
    _check.tensor(op, "kv", kv, dtypes=FLOATS, ndim=3)
    b, s, h, d = q.shape
    if kv.shape[0] != b:
        raise _check.OpInputError(op, "kv", f"batch {b} (as q), layout [B, N, D]", _check.describe(kv))
    _check.equal(op, "kv", kv.shape[2], d, "head dim (last dim) = last dim of q")
    return b, s, h, d


def _sink(op: str, sink: torch.Tensor | None, heads: int) -> None:
    if sink is not None:
        _check.tensor(op, "sink", sink, dtypes=FLOATS, ndim=1)
        _check.shape(op, "sink", sink, (heads,), "one logit per query head")


def _indexer_inputs(op: str, q: torch.Tensor, k: torch.Tensor, weights: torch.Tensor, scale: float) -> None:
    _check.tensor(op, "q", q, dtypes=FLOATS, ndim=4)
    _check.tensor(op, "k", k, dtypes=FLOATS, ndim=3)
    _check.tensor(op, "weights", weights, dtypes=FLOATS, ndim=3)
    b, s, h, d = q.shape
    if k.shape[0] != b or k.shape[2] != d:
        raise _check.OpInputError(op, "k", f"shape [{b}, T, {d}] (batch and head dim of q)", _check.describe(k))
    _check.shape(op, "weights", weights, (b, s, h), "[B, S, index heads] of q")
    _check.positive_float(op, "scale", scale)
    _check.same_device(op, q=q, k=k, weights=weights)


def indexer_scores(q: torch.Tensor, k: torch.Tensor, weights: torch.Tensor, scale: float) -> torch.Tensor:
    """Lightning-indexer scores `I[b, s, t] = scale * sum_h weights[b, s, h] * relu(q[b, s, h] . k[b, t])`.

    q `[B, S, H, D]`, k `[B, T, D]` (one key head shared by all index heads), weights `[B, S, H]`.
    DeepSeek's scale is `D**-0.5 * H**-0.5` (fold any other factor into weights). Returns
    `[B, S, T]` float32 (float64 if q is). DeepSeek's own kernel also quantizes q and k to FP8
    after a Hadamard rotation; this contract is the exact (unquantized) score, as transformers'.
    """
    op = "indexer_scores"
    _indexer_inputs(op, q, k, weights, scale)
    return dispatch(op)(q, k, weights, float(scale))


def _positions(op: str, positions: torch.Tensor | None, b: int, s: int) -> None:
    if positions is not None:
        _check.tensor(op, "positions", positions, dtypes=INDEX, ndim=2)
        _check.shape(op, "positions", positions, (b, s), "[B, S] absolute query positions")


def indexer_topk(scores: torch.Tensor, k: int, positions: torch.Tensor | None = None, ratio: int = 1) -> torch.Tensor:
    """Per query, the `k` entries with the highest score among those it may see, best first.

    scores `[B, S, T]`; positions `[B, S]` absolute token positions of the queries, or None (every
    entry visible). Entry t pools tokens [t*ratio, (t+1)*ratio): a query at position p may see it
    only once the window is closed, t < (p + 1) // ratio (ratio=1: plain causality, V3.2).
    Returns `[B, S, k]` int32: entry indices in descending score order (ties in any order), then -1
    for each slot beyond the entries the query may see. k must be in [1, T]. A NaN score has no
    rank, so NaN anywhere in scores is refused (with V4HAL_CHECKS=shapes, which reads no values,
    the indices chosen around a NaN are unspecified).
    """
    op = "indexer_topk"
    _check.tensor(op, "scores", scores, dtypes=FLOATS, ndim=3)
    if _check.reads(scores) and bool(scores.isnan().any()):
        raise _check.OpInputError(op, "scores", "no NaN (a NaN score has no rank; look for NaN/Inf in the "
                                  "indexer's q, k or weights)", f"{int(scores.isnan().sum())} NaN score(s) in "
                                  f"{_check.describe(scores)}")
    _check.positive_int(op, "k", k)
    if k > scores.shape[-1]:
        raise _check.OpInputError(op, "k", f"at most the {scores.shape[-1]} entries scored (last dim of scores)", k)
    _check.positive_int(op, "ratio", ratio)
    _positions(op, positions, scores.shape[0], scores.shape[1])
    return dispatch(op)(scores, k, positions, ratio)


def indexer_select(q: torch.Tensor, k: torch.Tensor, weights: torch.Tensor, scale: float, topk: int,
                   positions: torch.Tensor | None = None, ratio: int = 1) -> torch.Tensor:
    """`indexer_topk(indexer_scores(q, k, weights, scale), min(topk, T), positions, ratio)` fused:
    fast backends never hold the whole `[S, T]` score matrix (cpu_fast works in query chunks;
    Ascend maps plain causal selection onto `npu_lightning_indexer`). Returns `[B, S, min(topk, T)]`
    int32 with -1 for slots not visible yet (see indexer_topk). NaN/Inf in q, k or weights is
    refused, as the NaN scores it makes are by indexer_topk."""
    op = "indexer_select"
    _indexer_inputs(op, q, k, weights, scale)
    _check.positive_int(op, "topk", topk)
    _check.positive_int(op, "ratio", ratio)
    _positions(op, positions, q.shape[0], q.shape[1])
    _check.Values(op).finite("q", q).finite("k", k).finite("weights", weights).decide()
    return dispatch(op)(q, k, weights, float(scale), min(topk, k.shape[1]), positions, ratio)


def window_indices(positions: torch.Tensor, window: int, start: int) -> torch.Tensor:
    """Rows of the sliding window of each query in a buffer of raw tokens whose row 0 holds
    position `start`: query at position p sees positions max(p - window + 1, start) .. p.
    positions `[B, S]` int; returns `[B, S, window]` int32 (oldest first, -1 where the window
    reaches before `start`). Index arithmetic only, nothing to dispatch."""
    op = "window_indices"
    _check.tensor(op, "positions", positions, dtypes=INDEX, ndim=2)
    window = _check.positive_int(op, "window", window)
    start = _check.traced_int(start)
    if not isinstance(start, int) or start < 0:
        raise _check.OpInputError(op, "start", "a non-negative int", repr(start))
    if positions.numel() and _check.reads(positions) and int(positions.min()) < start:
        raise _check.OpInputError(op, "positions", f"positions >= start = {start}", int(positions.min()))
    rows = positions.unsqueeze(-1) - start - (window - 1) + torch.arange(window, device=positions.device)
    return torch.where(rows >= 0, rows, -1).to(torch.int32)


def sparse_attention(q: torch.Tensor, kv: torch.Tensor, indices: torch.Tensor, scale: float, *,
                     sink: torch.Tensor | None = None, v_dim: int | None = None,
                     return_lse: bool = False) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Attention of each query over the KV rows its index list names.

    q `[B, S, H, D]`; kv `[B, N, D]`: one KV head shared by all query heads, used as key (all D
    channels) and as value (its first `v_dim` channels, default D). V4: shared-KV MQA, D = v_dim =
    head_dim. V3.2 (MLA absorbed): q = [W_uk^T q_nope | q_rope] and kv = [latent | k_rope], D =
    kv_lora + rope, v_dim = kv_lora (the caller applies W_uv afterwards).
    indices `[B, S, K]` int: rows of kv, -1 = no entry (ignored; duplicates count twice).
    sink `[H]`: per-head logit added to each softmax denominator only (V4's attention sink).

    o[b,s,h] = sum_i exp(l_i) v_i / (sum_i exp(l_i) + exp(sink_h)), l_i = scale * q . kv[idx_i],
    over valid i. A row with no valid entry gives 0. Computed in float32 (float64 if q is), output
    in q's dtype, `[B, S, H, v_dim]`. With return_lse also the log of the denominator `[B, S, H]`
    float32/64 (-inf for an empty row without sink).
    """
    op = "sparse_attention"
    b, s, h, d = _query_kv(op, q, kv)
    _check.tensor(op, "indices", indices, dtypes=INDEX, ndim=3)
    if tuple(indices.shape[:2]) != (b, s):
        raise _check.OpInputError(op, "indices", f"shape [{b}, {s}, K] ([B, S] of q)", _check.describe(indices))
    n = kv.shape[1]
    _check.positive_float(op, "scale", scale)
    _sink(op, sink, h)
    v_dim = d if v_dim is None else v_dim
    _check.positive_int(op, "v_dim", v_dim)
    if v_dim > d:
        raise _check.OpInputError(op, "v_dim", f"at most the head dim {d}", v_dim)
    _check.same_device(op, q=q, kv=kv, indices=indices)
    _check.Values(op).in_range("indices", indices, -1, n, f"-1 = none; kv has {n} rows").decide()
    out, lse = dispatch(op)(q, kv, indices, float(scale), sink, v_dim)
    return (out, lse) if return_lse else out


def window_attention(q: torch.Tensor, kv: torch.Tensor, window: int, scale: float, *,
                     sink: torch.Tensor | None = None,
                     return_lse: bool = False) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Sliding-window attention with shared KV and a per-head sink (V4's sliding-only layers).

    q `[B, S, H, D]` are the last S tokens of kv `[B, N, D]` (N >= S: earlier rows are cached
    tokens): query i sits at row r = N - S + i and attends rows max(0, r - window + 1) .. r.
    Same math, dtypes and outputs as `sparse_attention(q, kv, window_indices(...), scale,
    sink=sink)` with value = key; the sink and LSE as there.
    """
    op = "window_attention"
    b, s, h, d = _query_kv(op, q, kv)
    if kv.shape[1] < s:
        raise _check.OpInputError(op, "kv", f"at least the {s} rows of the queries themselves", _check.describe(kv))
    _check.positive_int(op, "window", window)
    _check.positive_float(op, "scale", scale)
    _sink(op, sink, h)
    _check.same_device(op, q=q, kv=kv)
    out, lse = dispatch(op)(q, kv, window, float(scale), sink)
    return (out, lse) if return_lse else out
