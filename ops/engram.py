"""Engram: DeepSeek-V4.1's hashed n-gram memory, as the released model runs it (docs/engram.md).

For every token, the compressed ids of the token and the `max_ngram - 1` tokens before it are
hashed into one table per layer, split into a prime-sized row range per (n-gram order, head); the
rows looked up form a memory that a gate mixes into every mHC stream.

- token map: `token_map[id]` is the compressed id (tokens whose text normalises alike share one),
  or DEAD (-1) for tokens that take no part in n-grams (V4.1's image placeholder).
- hash at position t, shift k = 0 .. max_ngram - 1: the source is the token at t - k (from the
  chunk, else from `lookback`); once a shift reaches before the sequence start or a dead token,
  it and every further shift are blocked and contribute the compressed `pad_id` instead;
  `mix_k = mix_{k-1} XOR value_k * multipliers[k]` (int64). For order n = k + 1 >= 2 and head h:
  `row = mix_k mod primes[n-2, h] + offset[n-2, h]`, offsets the exclusive cumulative sum of the
  flattened primes, so every (order, head) owns its own row range of the layer's table.
- lookup: the rows of every (order, head), concatenated: `[..., heads_total * d]`; a float8
  table is dequantized with its ue8m0 scale per 32 columns.
- gate, per stream s: `g = <rms(key_s) * key_norm_s, rms(h_s) * query_norm_s> / sqrt(D)`,
  `g = sigmoid(sign(g) * sqrt(max(|g|, 1e-6)))` (0 where `keep` is False), output `g * value`.

The hashes depend only on token ids, so every Engram layer's lookup can start as soon as the ids
are known: `EngramPrefetcher` runs them in a background thread, gathering from a table in host
memory and copying the rows to the accelerator while the earlier layers compute.
"""

from __future__ import annotations

import concurrent.futures
import math

import torch

from v4hal.backends.registry import dispatch, register_op
from v4hal.ops import _check

__all__ = ["engram_hash", "engram_lookup", "engram_gate", "engram_offsets", "EngramPrefetcher", "DEAD",
           "SCALE_BLOCK", "lookback_window", "dequantized_rows"]

FAMILY = "engram"
for _op in ("engram_hash", "engram_lookup", "engram_gate"):
    register_op(_op, FAMILY)

INT_IDS = (torch.int64, torch.int32)
FLOAT_IN = (torch.float32, torch.bfloat16, torch.float16, torch.float64)
TABLE_DTYPES = FLOAT_IN + (torch.float8_e4m3fn,)
SCALE_DTYPES = (torch.uint8, torch.float8_e8m0fnu, torch.float32)
INT64_MAX = 2**63 - 1
DEAD = -1          # token_map value of a token that blocks n-grams (and whose gate is shut)
NO_TOKEN = -1      # lookback value: no token there (the sequence starts after it)
SCALE_BLOCK = 32   # columns per ue8m0 scale of a float8 table (DeepSeek's `engram.embed.scale`)


def engram_offsets(primes: torch.Tensor) -> torch.Tensor:
    """First table row of every (order, head), flattened order-major: the exclusive cumulative
    sum of `primes.flatten()`."""
    sizes = primes.flatten().to(torch.int64)
    return torch.cumsum(sizes, 0) - sizes


def engram_hash(token_ids: torch.Tensor, token_map: torch.Tensor, multipliers: torch.Tensor,
                primes: torch.Tensor, pad_id: int, lookback: torch.Tensor | None = None) -> torch.Tensor:
    """Table rows of every token's n-grams for one Engram layer.

    token_ids: `[B, T]` int64/int32 in `[0, V)`, each row a chunk of its sequence. token_map: `[V]`
    int64, compressed id per token (>= 0) or DEAD (-1). multipliers: `[max_ngram]` positive int64
    (the layer's). primes: `[max_ngram - 1, heads]` int64 > 1, the row count of every (order,
    head). pad_id: the compressed pad id (a non-negative int). lookback: optional `[B, L]` ids of
    the tokens before each chunk (last column right before it; the last `max_ngram - 1` matter),
    NO_TOKEN (-1) where the sequence has not started; without it every chunk starts its sequence.

    Returns int64 `[B, T, (max_ngram - 1) * heads]`, order-major (order 2's heads first): absolute
    rows of the layer's table (offsets included). Pure integer math: identical on every backend.
    """
    op = "engram_hash"
    _check.tensor(op, "token_ids", token_ids, dtypes=INT_IDS, ndim=2)
    _check.tensor(op, "token_map", token_map, dtypes=(torch.int64,), ndim=1)
    vocab = token_map.shape[0]
    _check.tensor(op, "multipliers", multipliers, dtypes=(torch.int64,), ndim=1)
    if multipliers.shape[0] < 2:
        raise _check.OpInputError(op, "multipliers", "at least 2 (max_ngram >= 2)", _check.describe(multipliers))
    _check.tensor(op, "primes", primes, dtypes=(torch.int64,), ndim=2)
    _check.shape(op, "primes", primes, (multipliers.shape[0] - 1, primes.shape[1]), "one row per n-gram order 2..max_ngram")
    pad_id = _check.traced_int(pad_id)
    if not isinstance(pad_id, int) or isinstance(pad_id, bool) or pad_id < 0:
        raise _check.OpInputError(op, "pad_id", "a non-negative int (the compressed pad id)", repr(pad_id))
    if lookback is not None:
        _check.tensor(op, "lookback", lookback, dtypes=INT_IDS, ndim=2, nonempty=False)
        _check.equal(op, "lookback", lookback.shape[0], token_ids.shape[0], "batch size = token_ids' batch size")
    _check.same_device(op, token_ids=token_ids, token_map=token_map, multipliers=multipliers, primes=primes,
                       lookback=lookback)
    _hash_values(op, token_ids, token_map, multipliers, primes, pad_id, lookback, vocab).decide()
    return dispatch(op)(token_ids, token_map, multipliers, primes, pad_id, lookback)


def _hash_values(op, token_ids, token_map, multipliers, primes, pad_id, lookback, vocab) -> _check.Values:
    """engram_hash's value checks, decided by one host read."""
    v = _check.Values(op).in_range("token_ids", token_ids, 0, vocab, "the vocabulary token_map covers")
    v.in_range("lookback", lookback, NO_TOKEN, vocab, f"the vocabulary, or {NO_TOKEN} before the sequence start")
    v.in_range("token_map", token_map, DEAD, INT64_MAX, f"compressed ids, or {DEAD} for dead tokens")
    v.in_range("primes", primes, 2, INT64_MAX, "table sizes > 1")
    if _check.reads(multipliers) and _check.reads(token_map):
        stats = torch.stack((multipliers.min(), multipliers.max(), token_map.max().clamp_min(pad_id)))
        v.require("multipliers", stats, lambda s: s[0] > 0 and s[1] * max(s[2], 1) <= INT64_MAX,
                  "positive multipliers with id * multiplier within int64 for every compressed id and the pad id",
                  lambda s: f"multipliers in [{int(s[0])}, {int(s[1])}] with largest compressed id {int(s[2])}")
    return v


def engram_lookup(rows: torch.Tensor, table: torch.Tensor, scale: torch.Tensor | None = None,
                  device: torch.device | str | None = None, dtype: torch.dtype | None = None,
                  primes: torch.Tensor | None = None) -> torch.Tensor:
    """Gather every (order, head)'s row and concatenate: `out[..., h*d:(h+1)*d] = table[rows[..., h]]`.

    rows: `[..., H]` int64 (from engram_hash). table: `[R, d]` float, or float8_e4m3fn with
    scale `[R, d / 32]` (ue8m0 exponent bytes as uint8 / float8_e8m0fnu, or float32 factors):
    a row's column c is `table[r, c] * scale[r, c // 32]`. rows may live on the host while the
    table is on a device or the reverse. device: where the result goes (default: the table's);
    a host table's rows are gathered on the host and copied over. dtype: the result's (default
    the table's, bfloat16 for a float8 table). primes: the layer's `[orders, heads]` row counts,
    to check that the table holds them (DeepSeek pads tables to `engram_num_embeddings` rows).
    Returns `[..., H*d]`.
    """
    op = "engram_lookup"
    _check.tensor(op, "rows", rows, dtypes=(torch.int64,), ndim=range(1, 9), nonempty=False)
    _check.tensor(op, "table", table, dtypes=TABLE_DTYPES, ndim=2)
    quantized = table.dtype == torch.float8_e4m3fn
    if quantized:
        _check.tensor(op, "scale", scale, dtypes=SCALE_DTYPES, ndim=2)
        if table.shape[1] % SCALE_BLOCK:
            raise _check.OpInputError(op, "table", f"a row width divisible by {SCALE_BLOCK} (one scale per block)",
                                      _check.describe(table))
        _check.shape(op, "scale", scale, (table.shape[0], table.shape[1] // SCALE_BLOCK), f"one per {SCALE_BLOCK} columns")
        _check.same_device(op, table=table, scale=scale)
    elif scale is not None:
        raise _check.OpInputError(op, "scale", "None for a table that is not float8", _check.describe(scale))
    if dtype is None:
        dtype = torch.bfloat16 if quantized else table.dtype
    _check.choice(op, "dtype", dtype, FLOAT_IN)
    v = _check.Values(op).in_range("rows", rows, 0, table.shape[0], "rows of the table")
    if primes is not None:
        _check.tensor(op, "primes", primes, dtypes=(torch.int64,), ndim=2)
        if _check.reads(primes):
            v.require("table", primes.sum().reshape(1), lambda s: s[0] <= table.shape[0],
                      "at least the rows of every (order, head) range, sum(primes)",
                      lambda s: f"{table.shape[0]} rows for {int(s[0])}")
        _check.equal(op, "rows", rows.shape[-1], primes.numel(), "one row per (order, head) = primes.numel()")
    v.decide()  # (scales are not scanned: that would read every scale of the table per call)
    device = table.device if device is None else torch.device(device)
    return dispatch(op)(rows, table, scale, device, dtype)


def engram_gate(hidden: torch.Tensor, key: torch.Tensor, value: torch.Tensor, key_norm: torch.Tensor,
                query_norm: torch.Tensor, eps: float = 1e-6, keep: torch.Tensor | None = None) -> torch.Tensor:
    """Context-aware gate of the memory value into every mHC stream.

    hidden: `[..., n, D]` (the streams), key: `[..., n, D]` (one key per stream), value: `[..., D]`
    (shared), key_norm / query_norm: `[n, D]` (V4.1's `k_weight` / `q_weight`), eps: the RMS
    epsilon, keep: optional bool `[...]`, False shuts the gate (dead tokens). Returns
    `g[..., s] * value` as `[..., n, D]` in hidden's dtype, with
    `g = sigmoid(signed_sqrt(<rms(key_s)*key_norm_s, rms(hidden_s)*query_norm_s> / sqrt(D)))` and
    `signed_sqrt(z) = sign(z) * sqrt(max(|z|, 1e-6))`; math in float32 (float64 if hidden is).
    """
    op = "engram_gate"
    _check.tensor(op, "hidden", hidden, dtypes=FLOAT_IN, ndim=range(2, 9))
    n, d = hidden.shape[-2], hidden.shape[-1]
    _check.tensor(op, "key", key, dtypes=FLOAT_IN)
    _check.shape(op, "key", key, tuple(hidden.shape), "one key per stream, like hidden")
    _check.tensor(op, "value", value, dtypes=FLOAT_IN)
    _check.shape(op, "value", value, (*hidden.shape[:-2], d), "hidden without its stream axis")
    for name, w in (("key_norm", key_norm), ("query_norm", query_norm)):
        _check.tensor(op, name, w, dtypes=FLOAT_IN, ndim=2)
        _check.shape(op, name, w, (n, d), f"one RMSNorm weight per stream; hidden has {n} streams")
    if keep is not None:
        _check.tensor(op, "keep", keep, dtypes=(torch.bool,))
        _check.shape(op, "keep", keep, tuple(hidden.shape[:-2]), "one flag per token")
    if not (isinstance(eps, float) and eps > 0):
        raise _check.OpInputError(op, "eps", "a positive float", repr(eps))
    _check.same_device(op, hidden=hidden, key=key, value=value, key_norm=key_norm, query_norm=query_norm, keep=keep)
    return dispatch(op)(hidden, key, value, key_norm, query_norm, eps, 1.0 / math.sqrt(d), keep)


def lookback_window(token_ids: torch.Tensor, lookback: torch.Tensor | None, span: int) -> torch.Tensor:
    """Backend helper: `[B, span + T]` int64, the `span` ids before each chunk (NO_TOKEN where
    there is none), then the chunk."""
    ids = token_ids.long()
    before = torch.full((ids.shape[0], span), NO_TOKEN, dtype=torch.int64, device=ids.device)
    if lookback is not None and lookback.shape[1]:
        kept = lookback.long()[:, -span:]
        before[:, span - kept.shape[1]:] = kept
    return torch.cat([before, ids], 1)


def dequantized_rows(values: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """Backend helper: float8 table rows times their per-32-column scales (exponent bytes or
    float32 factors), float32 (exact: a power of two times an e4m3 value)."""
    factor = scale if scale.dtype == torch.float32 else torch.exp2(scale.view(torch.uint8).float() - 127)
    return values.float() * factor.repeat_interleave(SCALE_BLOCK, -1)


class EngramPrefetcher:
    """Issue the lookups of later Engram layers early, in a background thread.

    Engram lookups depend only on token ids, so when a batch's ids are known every layer's
    `engram_lookup` can start at once: `submit(layer, rows, table, scale)` right after hashing,
    `get(layer)` inside the layer. With the table in host memory and `device` an accelerator, the
    host-side gather and the host-to-device copy overlap with the layers before. The gathers
    release the GIL (torch ops), so one worker suffices.
    """

    def __init__(self, device: torch.device | str, workers: int = 1):
        self.device = torch.device(device)
        self._pool = concurrent.futures.ThreadPoolExecutor(max_workers=workers, thread_name_prefix="engram")
        self._pending: dict[object, concurrent.futures.Future] = {}

    def submit(self, key: object, rows: torch.Tensor, table: torch.Tensor, scale: torch.Tensor | None = None,
               dtype: torch.dtype | None = None) -> None:
        if key in self._pending:
            raise ValueError(f"EngramPrefetcher: lookup {key!r} already submitted and not yet taken")
        self._pending[key] = self._pool.submit(engram_lookup, rows, table, scale, self.device, dtype)

    def get(self, key: object) -> torch.Tensor:
        """The rows for `key`, waiting for them if needed (errors of the lookup are raised here)."""
        if key not in self._pending:
            raise KeyError(f"EngramPrefetcher: no lookup submitted for {key!r}")
        return self._pending.pop(key).result()

    def close(self) -> None:
        for f in self._pending.values():
            f.cancel()
        self._pending.clear()
        self._pool.shutdown(wait=True)

    def __enter__(self) -> "EngramPrefetcher":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
