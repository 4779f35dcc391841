"""Manifold-constrained hyper-connections (mHC), as DeepSeek-V4 runs them.

The residual of every layer is `n` parallel streams `x: [..., n, D]` (n = 4 in V4-Flash/Pro).
Around each attention and each MoE sub-layer:

    mixes  = (flat(x) @ fn.T) * rsqrt(mean(flat(x)**2) + norm_eps)     flat(x): [..., n*D]
    pre_w, post_w, comb_w = split(mixes, [n, n, n*n])                   (base split the same way)
    pre    = sigmoid(pre_w * scale[0] + base_pre) + hc_eps              [..., n]
    post   = 2 * sigmoid(post_w * scale[1] + base_post)                 [..., n]
    comb   = sinkhorn(comb_w * scale[2] + base_comb, iters, hc_eps)     [..., n, n]
    layer_input = sum_i pre_i * x_i                                     [..., D]    (hc_pre)
    ... the sub-layer F runs on layer_input ...
    new_x_j = post_j * F(layer_input) + sum_i comb[i, j] * x_i          [..., n, D] (hc_post)

`sinkhorn`: row softmax + eps, one column normalisation, then `iters - 1` (row, column)
normalisations, each dividing by (sum + eps), so the result is (nearly) doubly stochastic and the
product of many of them stays non-expansive. `hc_head` is the final collapse before the model's
last norm: pre only, with its own `fn: [n, n*D]`, `scale: [1]`, `base: [n]`, no Sinkhorn.

This is transformers' `DeepseekV4HyperConnection` / `DeepseekV4HyperHead` math (the RMS factor is
applied to the n-wide projection rather than to the n*D-wide input, which is the same number and
saves a pass over the streams). Precision: the mixes, pre, post and comb are float32 (float64
when x is float64) whatever x's dtype; the weighted sums accumulate in that precision and are cast
to x's dtype once.
"""

from __future__ import annotations

import torch

from v4hal.backends.registry import dispatch, register_op
from v4hal.ops import _check

__all__ = ["hc_pre", "hc_post", "hc_head", "sinkhorn", "hc_mix_width", "MAX_SINKHORN_ITERS"]

# Ascend's npu_mhc_sinkhorn takes at most 100 iterations; DeepSeek's configs use 20. One bound on
# every backend, so a config asking for 1e9 fails at once instead of running for hours.
MAX_SINKHORN_ITERS = 100

FAMILY = "mhc"
for _op in ("hc_pre", "hc_post", "hc_head", "sinkhorn"):
    register_op(_op, FAMILY)

FLOAT_IN = (torch.float32, torch.bfloat16, torch.float16, torch.float64)
PARAM_DTYPES = (torch.float32, torch.float64, torch.bfloat16)
MIX_DTYPES = (torch.float32, torch.float64)


def hc_mix_width(n: int) -> int:
    """Rows of an mHC projection for n streams: n (pre) + n (post) + n*n (comb)."""
    return (2 + n) * n


def _eps(op: str, arg: str, value: object) -> float:
    if isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if not (isinstance(value, float) and value > 0):
        raise _check.OpInputError(op, arg, "a positive float", repr(value))
    return value


def _iters(op: str, value: object) -> int:
    _check.positive_int(op, "iters", value)
    if value > MAX_SINKHORN_ITERS:
        raise _check.OpInputError(op, "iters", f"at most {MAX_SINKHORN_ITERS}", repr(value))
    return value


def _streams(op: str, x: torch.Tensor) -> tuple[int, int]:
    _check.tensor(op, "x", x, dtypes=FLOAT_IN, ndim=(3, 4))
    return x.shape[-2], x.shape[-1]


def _projection(op: str, x: torch.Tensor, fn, scale, base, rows: int, scales: int) -> None:
    n, d = x.shape[-2], x.shape[-1]
    _check.tensor(op, "fn", fn, dtypes=PARAM_DTYPES, ndim=2)
    if fn.shape[1] != n * d:
        raise _check.OpInputError(op, "fn", f"{n * d} columns (n*D for x's {n} streams of width {d}); "
                                  "stream count or hidden size mismatch", _check.describe(fn))
    if fn.shape[0] != rows:
        raise _check.OpInputError(op, "fn", f"{rows} rows for {n} streams (x has {n} streams); stream "
                                  "count mismatch", _check.describe(fn))
    _check.tensor(op, "scale", scale, dtypes=PARAM_DTYPES, ndim=1)
    _check.shape(op, "scale", scale, (scales,))
    _check.tensor(op, "base", base, dtypes=PARAM_DTYPES, ndim=1)
    _check.shape(op, "base", base, (rows,), f"one bias per projection row for {n} streams")
    _check.same_device(op, x=x, fn=fn, scale=scale, base=base)


def _finite_mixes(op: str, params: dict[str, torch.Tensor], **mixes: torch.Tensor) -> None:
    """Non-finite mixes mean NaN/Inf in x or in the projection: say which, instead of spreading
    NaN through every later layer. Only the small outputs are checked on the normal path (not a
    pass over x or fn per call); the culprit is looked for once something is wrong."""
    values = _check.Values(op)
    for name, t in mixes.items():
        values.finite(name, t)
    try:
        values.decide()
    except _check.OpInputError as bad_mix:
        for arg, p in params.items():
            _check.finite(op, arg, p)
        raise _check.OpInputError(op, "x", "finite values (the mHC mixes computed from x came out "
                                  f"non-finite: {bad_mix.arg})", _check.describe(mixes[bad_mix.arg])) from None


def hc_pre(x: torch.Tensor, fn: torch.Tensor, scale: torch.Tensor, base: torch.Tensor, *,
           norm_eps: float = 1e-6, hc_eps: float = 1e-6, iters: int = 20
           ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Collapse the mHC streams into one sub-layer input and compute the post/comb weights.

    x: `[B, S, n, D]` or `[T, n, D]`, float (bf16 in a real model). fn: `[(2+n)*n, n*D]`, scale:
    `[3]` (pre, post, comb), base: `[(2+n)*n]`, all float32 in checkpoints. norm_eps: the RMS
    epsilon (config.rms_norm_eps), hc_eps: config.hc_eps, iters: config.hc_sinkhorn_iters.

    Returns `(layer_input [..., D] in x.dtype, post [..., n], comb [..., n, n])`, post/comb in
    float32 (float64 if x is); see the module docstring for the math. Raises OpInputError if the
    mixes are non-finite (NaN/Inf in x).
    """
    op = "hc_pre"
    n, _ = _streams(op, x)
    _projection(op, x, fn, scale, base, hc_mix_width(n), 3)
    norm_eps, hc_eps = _eps(op, "norm_eps", norm_eps), _eps(op, "hc_eps", hc_eps)
    out = dispatch(op)(x, fn, scale, base, norm_eps, hc_eps, _iters(op, iters))
    _finite_mixes(op, dict(fn=fn, scale=scale, base=base), post=out[1], comb=out[2])
    return out


def hc_post(out: torch.Tensor, x: torch.Tensor, post: torch.Tensor, comb: torch.Tensor) -> torch.Tensor:
    """Expand a sub-layer output back into n streams and add the comb-mixed residual streams.

    out: `[..., D]` (the sub-layer output), x: `[..., n, D]` (the streams hc_pre consumed),
    post: `[..., n]`, comb: `[..., n, n]` (from hc_pre). Returns
    `new[..., j, :] = post[..., j] * out + sum_i comb[..., i, j] * x[..., i, :]` in x.dtype,
    accumulated in float32 (float64 if x is). Note comb is applied transposed: row i says where
    input stream i goes.
    """
    op = "hc_post"
    n, d = _streams(op, x)
    lead = tuple(x.shape[:-2])
    _check.tensor(op, "out", out, dtypes=FLOAT_IN)
    _check.shape(op, "out", out, (*lead, d), "x without its stream axis")
    _check.tensor(op, "post", post, dtypes=MIX_DTYPES)
    _check.shape(op, "post", post, (*lead, n), f"one weight per stream; x has {n} streams")
    _check.tensor(op, "comb", comb, dtypes=MIX_DTYPES)
    _check.shape(op, "comb", comb, (*lead, n, n), f"an n x n mix per token; x has {n} streams")
    _check.same_device(op, out=out, x=x, post=post, comb=comb)
    _check.Values(op).finite("post", post).finite("comb", comb).decide()
    return dispatch(op)(out, x, post, comb)


def hc_head(x: torch.Tensor, fn: torch.Tensor, scale: torch.Tensor, base: torch.Tensor, *,
            norm_eps: float = 1e-6, hc_eps: float = 1e-6) -> torch.Tensor:
    """The final collapse of the streams before the model's last RMSNorm (pre only, no Sinkhorn).

    x: `[..., n, D]`, fn: `[n, n*D]`, scale: `[1]`, base: `[n]`. Returns
    `sum_i (sigmoid(mix_i * scale + base_i) + hc_eps) * x_i` in x.dtype, `[..., D]`, where
    `mix = (flat(x) @ fn.T) * rsqrt(mean(flat(x)**2) + norm_eps)`. Raises OpInputError if the
    result is non-finite (NaN/Inf in x or in the weights).
    """
    op = "hc_head"
    n, _ = _streams(op, x)
    _projection(op, x, fn, scale, base, n, 1)
    norm_eps, hc_eps = _eps(op, "norm_eps", norm_eps), _eps(op, "hc_eps", hc_eps)
    out = dispatch(op)(x, fn, scale, base, norm_eps, hc_eps)
    _finite_mixes(op, dict(fn=fn, scale=scale, base=base), out=out)
    return out


def sinkhorn(logits: torch.Tensor, iters: int = 20, eps: float = 1e-6) -> torch.Tensor:
    """Sinkhorn-Knopp projection of `[..., n, n]` logits onto (nearly) doubly stochastic matrices.

    `m = softmax(logits, -1) + eps; m /= m.sum(-2) + eps;` then `iters - 1` times
    `m /= m.sum(-1) + eps; m /= m.sum(-2) + eps`. float32 or float64 in, same dtype out.
    After 20 iterations rows and columns sum to 1 within ~1e-3 for logits of moderate range.
    """
    op = "sinkhorn"
    _check.tensor(op, "logits", logits, dtypes=MIX_DTYPES, ndim=range(2, 9))
    if logits.shape[-1] != logits.shape[-2]:
        raise _check.OpInputError(op, "logits", "square matrices [..., n, n]", _check.describe(logits))
    _check.finite(op, "logits", logits)
    return dispatch(op)(logits, _iters(op, iters), _eps(op, "eps", eps))
