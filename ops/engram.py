"""Engram: DeepSeek's hashed n-gram memory (the V4.1-style conditional memory).

For every token, the ids of the token and the tokens before it (over a compressed vocabulary)
are hashed into several embedding tables, one per (n-gram order, head); the looked-up rows form a
memory vector that a context-aware gate mixes into each mHC stream. Semantics follow the public
`deepseek-ai/Engram` demo (engram_demo_v1.py):

- compression: `c = compress[token_id]` folds tokens that normalise to the same text into one id.
- n-gram mix at position t for order n (2..max_ngram): `mix_n = XOR_{k<n} (c[t-k] * mult[k])`
  (int64; positions before the sequence start use the compressed pad id, or the given prefix).
- hash for (order n, head h): `mix_n mod primes[n-2, h]`; every (order, head) has its own prime
  table size, distinct across heads and layers.
- lookup: the heads share one table `[sum(sizes), d]`; head h's rows start at `offsets[h]`;
  the memory vector is the concatenation over heads, `[..., heads_total * d]`.
- gate, per stream s: `g = <rms(key_s) * wk_s, rms(h_s) * wq_s> / sqrt(D)`,
  `g = sigmoid(sign(g) * sqrt(max(|g|, 1e-6)))`, output stream s = `g * value`.
  (key_s / value are linear projections of the memory vector, done by the model.)

The hashes depend only on token ids, so the lookups of every Engram layer can be issued as soon
as a batch's ids are known: `EngramPrefetcher` runs them in a background thread, gathering from a
table in host memory and copying the rows to the accelerator while earlier layers compute.
"""

from __future__ import annotations

import concurrent.futures
import math

import torch

from v4hal.backends.registry import dispatch, register_op
from v4hal.ops import _check

__all__ = ["engram_hash", "engram_lookup", "engram_gate", "engram_offsets", "EngramPrefetcher"]

FAMILY = "engram"
for _op in ("engram_hash", "engram_lookup", "engram_gate"):
    register_op(_op, FAMILY)

INT_IDS = (torch.int64, torch.int32)
FLOAT_IN = (torch.float32, torch.bfloat16, torch.float16, torch.float64)
INT64_MAX = 2**63 - 1


def _ids_in_vocab(op: str, arg: str, ids: torch.Tensor, vocab: int) -> None:
    if not _check.reads(ids):
        return
    bad = (ids < 0) | (ids >= vocab)
    if bool(bad.any()):
        raise _check.OpInputError(op, arg, f"token ids in [0, {vocab}) (the vocabulary `compress` maps)",
                                  f"{int(bad.sum())} id(s) outside it (min {int(ids.min())}, max {int(ids.max())})")


def engram_hash(token_ids: torch.Tensor, compress: torch.Tensor, multipliers: torch.Tensor,
                primes: torch.Tensor, pad_id: int, prefix: torch.Tensor | None = None) -> torch.Tensor:
    """Per-token n-gram hashes for one Engram layer.

    token_ids: `[B, T]` int64/int32 in the tokenizer's vocabulary `[0, V)`. compress: `[V]` int64,
    the compressed id of every token. multipliers: `[max_ngram]` int64, one odd multiplier per
    n-gram position (the layer's). primes: `[max_ngram - 1, heads]` int64, the table size of
    every (order, head). pad_id: the tokenizer's pad token id (compressed like any token), used for
    positions before the start. prefix: optional `[B, P]` ids of the tokens before `token_ids`
    (decode: the last max_ngram - 1 tokens), used instead of padding.

    Returns int64 `[B, T, (max_ngram - 1) * heads]`, order-major (order 2's heads first), each
    value in `[0, primes[order, head])`. Pure integer math: identical on every backend and run.
    """
    op = "engram_hash"
    _check.tensor(op, "token_ids", token_ids, dtypes=INT_IDS, ndim=2)
    _check.tensor(op, "compress", compress, dtypes=(torch.int64,), ndim=1)
    vocab = compress.shape[0]
    _check.tensor(op, "multipliers", multipliers, dtypes=(torch.int64,), ndim=1)
    if multipliers.shape[0] < 2:
        raise _check.OpInputError(op, "multipliers", "at least 2 (max_ngram >= 2)", _check.describe(multipliers))
    _check.tensor(op, "primes", primes, dtypes=(torch.int64,), ndim=2)
    _check.shape(op, "primes", primes, (multipliers.shape[0] - 1, primes.shape[1]), "one row per n-gram order 2..max_ngram")
    if not bool((primes > 1).all()):
        raise _check.OpInputError(op, "primes", "table sizes > 1", f"min {int(primes.min())}")
    if not (isinstance(pad_id, int) and 0 <= pad_id < vocab):
        raise _check.OpInputError(op, "pad_id", f"an int token id in [0, {vocab})", repr(pad_id))
    if bool((compress < 0).any()) or bool((multipliers <= 0).any()):
        raise _check.OpInputError(op, "compress/multipliers", "non-negative ids and positive multipliers",
                                  f"min id {int(compress.min())}, min multiplier {int(multipliers.min())}")
    if int(multipliers.max()) > INT64_MAX // max(1, int(compress.max())):
        raise _check.OpInputError(op, "multipliers", "id * multiplier within int64 for every compressed id",
                                  f"max multiplier {int(multipliers.max())} with max compressed id {int(compress.max())}")
    _ids_in_vocab(op, "token_ids", token_ids, vocab)
    if prefix is not None:
        _check.tensor(op, "prefix", prefix, dtypes=INT_IDS, ndim=2, nonempty=False)
        _check.equal(op, "prefix", prefix.shape[0], token_ids.shape[0], "batch size = token_ids' batch size")
        _ids_in_vocab(op, "prefix", prefix, vocab)
    _check.same_device(op, token_ids=token_ids, compress=compress, multipliers=multipliers, primes=primes)
    return dispatch(op)(token_ids, compress, multipliers, primes, pad_id, prefix)


def engram_offsets(sizes: torch.Tensor) -> torch.Tensor:
    """Row offset of every head in the shared table: exclusive cumulative sum of the flattened
    table sizes (`primes.flatten()`)."""
    sizes = sizes.flatten().to(torch.int64)
    return torch.cumsum(sizes, 0) - sizes


def engram_lookup(hashes: torch.Tensor, table: torch.Tensor, offsets: torch.Tensor,
                  device: torch.device | str | None = None) -> torch.Tensor:
    """Gather every head's row and concatenate: `out[..., h*d:(h+1)*d] = table[offsets[h] + hashes[..., h]]`.

    hashes: `[..., H]` int64 (from engram_hash), table: `[R, d]` float, offsets: `[H]` int64
    (engram_offsets of the table sizes; head h owns rows offsets[h] .. offsets[h+1]-1, the last
    head up to R-1). hashes and offsets may live on the host while the table is on a device or
    the reverse; they are moved to the table. device: where the result goes (default: the
    table's device): with the table in host memory and device an accelerator, the rows are
    gathered on the host and copied over (pinned, non-blocking where the backend can).
    Returns `[..., H*d]` in the table's dtype.
    """
    op = "engram_lookup"
    _check.tensor(op, "hashes", hashes, dtypes=(torch.int64,), ndim=range(1, 9))
    _check.tensor(op, "table", table, dtypes=FLOAT_IN, ndim=2)
    _check.tensor(op, "offsets", offsets, dtypes=(torch.int64,), ndim=1)
    heads = hashes.shape[-1]
    _check.equal(op, "offsets", offsets.shape[0], heads, "one offset per head (last dim of hashes)")
    off = offsets.cpu()
    ends = torch.cat([off[1:], torch.tensor([table.shape[0]])])
    sizes = ends - off
    if bool((off < 0).any()) or bool((sizes <= 0).any()):
        raise _check.OpInputError(op, "offsets", f"increasing row offsets inside the table's {table.shape[0]} rows",
                                  off.tolist())
    h = hashes.reshape(-1, heads)
    bad = (h < 0) | (h >= sizes.to(h.device)) if _check.reads(h) else None
    if bad is not None and bool(bad.any()):
        raise _check.OpInputError(op, "hashes", "every head's hash in [0, its table size)",
                                  f"{int(bad.sum())} out of range")
    device = table.device if device is None else torch.device(device)
    return dispatch(op)(hashes, table, offsets, device)


def engram_gate(hidden: torch.Tensor, key: torch.Tensor, value: torch.Tensor, key_norm: torch.Tensor,
                query_norm: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """Context-aware gate of the memory value into every mHC stream.

    hidden: `[..., n, D]` (the streams), key: `[..., n, D]` (one key projection of the memory per
    stream), value: `[..., D]` (the value projection), key_norm / query_norm: `[n, D]` RMSNorm
    weights per stream, eps: their epsilon. Returns `g[..., s] * value` as `[..., n, D]` in
    hidden's dtype, with `g = sigmoid(signed_sqrt(<rms(key_s)*key_norm_s, rms(hidden_s)*query_norm_s> / sqrt(D)))`
    and `signed_sqrt(z) = sign(z) * sqrt(max(|z|, 1e-6))`; math in float32 (float64 if hidden is).
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
    if not (isinstance(eps, float) and eps > 0):
        raise _check.OpInputError(op, "eps", "a positive float", repr(eps))
    _check.same_device(op, hidden=hidden, key=key, value=value, key_norm=key_norm, query_norm=query_norm)
    return dispatch(op)(hidden, key, value, key_norm, query_norm, eps, 1.0 / math.sqrt(d))


class EngramPrefetcher:
    """Issue the lookups of later Engram layers early, in a background thread.

    Engram lookups depend only on token ids, so when a batch's ids are known every layer's
    `engram_lookup` can start at once: `submit(layer, hashes, table, offsets)` right after hashing,
    `get(layer)` inside the layer. With the table in host memory and `device` an accelerator, the
    host-side gather and the host-to-device copy overlap with the layers before. The gathers
    release the GIL (torch ops), so one worker suffices.
    """

    def __init__(self, device: torch.device | str, workers: int = 1):
        self.device = torch.device(device)
        self._pool = concurrent.futures.ThreadPoolExecutor(max_workers=workers, thread_name_prefix="engram")
        self._pending: dict[object, concurrent.futures.Future] = {}

    def submit(self, key: object, hashes: torch.Tensor, table: torch.Tensor, offsets: torch.Tensor) -> None:
        if key in self._pending:
            raise ValueError(f"EngramPrefetcher: lookup {key!r} already submitted and not yet taken")
        self._pending[key] = self._pool.submit(engram_lookup, hashes, table, offsets, self.device)

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
