"""Fast sparse attention in plain torch: work in query chunks, gather only the selected KV rows.

Over a long cache attention never forms a [queries x all keys] matrix: per query it touches its K
gathered rows (O(top-k + window) time and memory). Only when the cache has at most
`DENSE_ROWS_PER_PICK` rows per pick (a short prompt's prefill) and holds no NaN/Inf does it score
every row, because two large GEMMs then cost less than one tiny GEMM per query. The indexer forms
scores for one chunk of queries at a time (O(compressed length) per query) and keeps only the
top-k. Chunks are sized so a chunk's temporaries stay around `CPU_CHUNK` floats whatever the
context length. The code is device-agnostic: on a GPU or NPU (the cuda and ascend backends inherit
it) a chunk holds `DEVICE_CHUNK` floats.
"""

import torch
from torch.compiler import is_compiling

from v4hal.backends import registry
from v4hal.backends.cpu_fast import cast, eager_on_cpu

reference = registry.parent_family(__name__)

CPU_CHUNK = 1 << 23  # ~32 MiB of float32 temporaries per chunk
DEVICE_CHUNK = 1 << 27  # ~512 MiB: device memory is larger, and each chunk costs kernel launches


def _chunk_elems(x, chunk_elems):
    if chunk_elems is not None:
        return chunk_elems
    return CPU_CHUNK if x.device.type == "cpu" else DEVICE_CHUNK


def _chunk(per_query: int, elems: int) -> int:
    return max(1, elems // max(1, per_query))


def _pairs_viewable_as_complex(x):
    """view_as_complex needs unit-stride channel pairs at an even offset and even strides
    elsewhere (a slice of a head's channels qualifies; a transposed or stepped view may not)."""
    return x.stride(-1) == 1 and x.storage_offset() % 2 == 0 and all(st % 2 == 0 for st in x.stride()[:-1])


def apply_rope(x, cos, sin, interleaved):
    # Interleaved pairs are complex numbers: one complex multiply instead of ~14 real ops
    # (what decode pays per call; DeepSeek's own inference code rotates the same way).
    if not interleaved or x.dtype not in (torch.float32, torch.float64) or not eager_on_cpu(x) \
            or not _pairs_viewable_as_complex(x):
        return reference.apply_rope(x, cos, sin, interleaved)
    pairs = torch.view_as_complex(x.reshape(*x.shape[:-1], -1, 2))
    turn = torch.complex(cast(cos, x.dtype), cast(sin, x.dtype))
    return torch.view_as_real(pairs * turn).flatten(-2)


def _limits(positions, ratio):
    return None if positions is None else (positions.long() + 1) // ratio


def _scores_chunk(q, k, weights, scale, cd):
    """[Sc, T] indexer scores of one batch row's query chunk: q [Sc, H, D], k [T, D]."""
    sc, h, d = q.shape
    dots = torch.relu(q.reshape(sc * h, d).to(cd) @ k.to(cd).T).view(sc, h, -1)
    return scale * torch.bmm(weights.to(cd).unsqueeze(1), dots).squeeze(1)


def _topk_rows(scores, k, limit):
    """Top-k of each row of scores [Sc, T] over entries t < limit [Sc] (None: all), -1 padded."""
    t = scores.shape[-1]
    if limit is not None:
        hidden = torch.arange(t, device=scores.device).view(1, t) >= limit.view(-1, 1)
        scores = scores.masked_fill(hidden, float("-inf"))
    idx = torch.topk(scores, k, dim=-1, sorted=True).indices
    if limit is not None:
        idx = torch.where(idx < limit.view(-1, 1), idx, -1)
    return idx.to(torch.int32)


def indexer_scores(q, k, weights, scale, chunk_elems=None):
    cd = reference.compute_dtype(q)
    b, s, h, _ = q.shape
    out = torch.empty(b, s, k.shape[1], dtype=cd, device=q.device)
    step = _chunk(h * k.shape[1], _chunk_elems(q, chunk_elems))
    for bi in range(b):
        for lo in range(0, s, step):
            out[bi, lo:lo + step] = _scores_chunk(q[bi, lo:lo + step], k[bi], weights[bi, lo:lo + step], scale, cd)
    return out


def indexer_topk(scores, k, positions, ratio):
    limits = _limits(positions, ratio)
    b, s, _ = scores.shape
    return torch.stack([_topk_rows(scores[bi], k, None if limits is None else limits[bi]) for bi in range(b)])


def indexer_select(q, k, weights, scale, topk, positions, ratio, chunk_elems=None):
    cd = reference.compute_dtype(q)
    b, s, h, _ = q.shape
    limits = _limits(positions, ratio)
    out = torch.empty(b, s, topk, dtype=torch.int32, device=q.device)
    step = _chunk(h * k.shape[1], _chunk_elems(q, chunk_elems))
    for bi in range(b):
        for lo in range(0, s, step):
            sc = _scores_chunk(q[bi, lo:lo + step], k[bi], weights[bi, lo:lo + step], scale, cd)
            out[bi, lo:lo + step] = _topk_rows(sc, topk, None if limits is None else limits[bi, lo:lo + step])
    return out


DENSE_ROWS_PER_PICK = 4  # score every KV row (two GEMMs) when the rows are at most this many per pick


def _gathered(qc, kvb, idx, scale, v_dim, cd):
    """Logits over the picked rows from a gathered copy of them, and the weighted sum of their
    values: O(picks) work, the choice when the cache is long (decode)."""
    rows = kvb.index_select(0, idx.clamp(min=0).flatten()).view(*idx.shape, kvb.shape[-1]).to(cd)  # [Sc, K, D]
    rows = rows.masked_fill(~(idx >= 0).unsqueeze(-1), 0.0)  # empty slots read row 0: keep its NaN/Inf out
    logits = torch.bmm(qc, rows.transpose(1, 2)) * scale  # [Sc, H, K]
    return logits, lambda p: torch.bmm(p, rows[..., :v_dim])


def _all_rows(qc, kvb, idx, scale, v_dim, cd):
    """The same logits read out of one GEMM over every row, and the weighted sum as a second GEMM
    after scattering the weights back (duplicates add up): when the cache is short (a prompt's
    prefill), two large GEMMs beat one tiny GEMM per query. kvb comes widened to the compute
    dtype already (once per batch row, not per query chunk)."""
    every = torch.matmul(qc, kvb.T)  # [Sc, H, N]
    picks = idx.clamp(min=0).unsqueeze(1).expand(-1, qc.shape[1], -1)
    logits = every.gather(-1, picks) * scale
    return logits, lambda p: torch.matmul(torch.zeros_like(every).scatter_add_(-1, picks, p), kvb[:, :v_dim])


def _all_finite_in_eager(kv):
    """Whether the all-rows form may run: its weighted sum multiplies each query's zero weights
    by every row, and 0 * NaN (or Inf) is NaN, so a bad row the query never picked would leak into
    its output. Read only in eager mode on a device with values (a value read ends a compiled or
    traced graph; meta tensors, the Ascend dry run, have none); elsewhere the gathered form, which
    reads no other row, runs."""
    return (kv.device.type != "meta" and not torch.jit.is_tracing() and not is_compiling()
            and bool(torch.isfinite(kv).all()))


def sparse_attention(q, kv, indices, scale, sink, v_dim, chunk_elems=None):
    cd = reference.compute_dtype(q)
    b, s, h, d = q.shape
    n, kk = kv.shape[1], indices.shape[-1]
    out = torch.empty(b, s, h, v_dim, dtype=q.dtype, device=q.device)
    lse = torch.empty(b, s, h, dtype=cd, device=q.device)
    sink_col = None if sink is None else sink.to(cd).view(1, h, 1)
    dense = s > 1 and n <= DENSE_ROWS_PER_PICK * kk and _all_finite_in_eager(kv)
    attend = _all_rows if dense else _gathered
    step = _chunk(2 * h * n + kk * h if dense else kk * (d + h), _chunk_elems(q, chunk_elems))
    for bi in range(b):
        kvb = cast(kv[bi], cd) if dense else kv[bi]  # every row is read per chunk: widen them once
        for lo in range(0, s, step):
            idx = indices[bi, lo:lo + step].long()
            logits, weighted_sum = attend(q[bi, lo:lo + step].to(cd), kvb, idx, scale, v_dim, cd)
            logits = logits.masked_fill(~(idx >= 0).unsqueeze(1), float("-inf"))
            m = logits.amax(-1, keepdim=True)
            if sink_col is not None:
                m = torch.maximum(m, sink_col)
            m = torch.where(torch.isfinite(m), m, 0.0)
            p = torch.exp(logits - m)
            denom = p.sum(-1, keepdim=True)
            if sink_col is not None:
                denom = denom + torch.exp(sink_col - m)
            o = weighted_sum(p) / torch.where(denom > 0, denom, 1.0)
            out[bi, lo:lo + step] = o.to(q.dtype)
            lse[bi, lo:lo + step] = (torch.log(denom) + m).squeeze(-1)
    return out, lse


def window_attention(q, kv, window, scale, sink, chunk_elems=None):
    idx = reference.window_indices_for(q.shape[0], q.shape[1], kv.shape[1], window, q.device)
    return sparse_attention(q, kv, idx, scale, sink, kv.shape[-1], chunk_elems)
