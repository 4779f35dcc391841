"""Sparse attention on NVIDIA GPUs.

Everything but these overrides is inherited from cpu_fast: the device-agnostic gather path (gather
the selected KV rows on the device, batched matmuls in float32, query chunks sized for device
memory) and the reference's elementwise ops. On a GPU, sparse attention runs FlashMLA's sparse
kernel (`flash_mla.flash_mla_sparse_fwd`, SM90+) when it is importable and the call is in its
domain (bfloat16, no sink, v_dim 512, head dim 512 or 576, heads a multiple of 64), else this
backend's Triton kernel (`triton_attention.py`: sink, LSE, any head dim), else the gather path.
The indexer scores with the Triton kernel, in query chunks when selecting, and keeps `torch.topk`
(DeepGEMM's FP8 indexer kernels would change the numbers: they quantize q and k). float64 inputs
stay on the torch paths.
"""

import importlib
import importlib.util

import torch

from v4hal.backends import cuda as backend
from v4hal.backends import registry

parent = registry.parent_family(__name__)


def flash_mla():
    """The flash_mla module if installed, else None."""
    if importlib.util.find_spec("flash_mla") is None:
        return None
    return importlib.import_module("flash_mla")


def _flash_mla_domain(q, kv, sink, v_dim) -> bool:
    return (q.is_cuda and q.dtype == torch.bfloat16 and kv.dtype == torch.bfloat16 and sink is None
            and v_dim == 512 and q.shape[-1] in (512, 576) and q.shape[2] % 64 == 0)


def _flash_mla_sparse(fm, q, kv, indices, scale, v_dim):
    """FlashMLA's sparse prefill kernel has no batch axis: flatten batch rows into one KV table
    and offset each row's indices into it (-1 stays -1)."""
    b, s, h, d = q.shape
    n = kv.shape[1]
    offset = (torch.arange(b, device=q.device) * n).view(b, 1, 1)
    flat_idx = torch.where(indices >= 0, indices.int() + offset.int(), -1).reshape(b * s, 1, -1).contiguous()
    out, _max_logits, lse = fm.flash_mla_sparse_fwd(q.reshape(b * s, h, d).contiguous(),
                                                    kv.reshape(b * n, 1, d).contiguous(), flat_idx, scale, v_dim)
    return out.view(b, s, h, v_dim), lse.view(b, s, h).float()


def sparse_attention(q, kv, indices, scale, sink, v_dim):
    fm = flash_mla() if _flash_mla_domain(q, kv, sink, v_dim) else None
    if fm is not None:
        return _flash_mla_sparse(fm, q, kv, indices, scale, v_dim)
    kernels = backend.triton_kernels("attention", q)
    if kernels is not None and kernels.sparse_attention_in_domain(q, kv, sink):
        return kernels.sparse_attention(q, kv, indices, scale, sink, v_dim)
    return parent.sparse_attention(q, kv, indices, scale, sink, v_dim)


def _triton_indexer(q, k, weights):
    kernels = backend.triton_kernels("attention", q)
    return kernels if kernels is not None and kernels.indexer_scores_in_domain(q, k, weights) else None


def indexer_scores(q, k, weights, scale):
    kernels = _triton_indexer(q, k, weights)
    if kernels is None:
        return parent.indexer_scores(q, k, weights, scale)
    return kernels.indexer_scores(q, k, weights, scale)


def indexer_select(q, k, weights, scale, topk, positions, ratio):
    kernels = _triton_indexer(q, k, weights)
    if kernels is None:
        return parent.indexer_select(q, k, weights, scale, topk, positions, ratio)
    # Scores for a chunk of queries at a time, so the whole [S, T] matrix is never held.
    b, s = q.shape[:2]
    step = max(1, parent.DEVICE_CHUNK // (b * k.shape[1]))
    return torch.cat([parent.indexer_topk(kernels.indexer_scores(q[:, lo:lo + step], k, weights[:, lo:lo + step], scale),
                                          topk, None if positions is None else positions[:, lo:lo + step], ratio)
                      for lo in range(0, s, step)], dim=1)


def window_attention(q, kv, window, scale, sink):
    # The window's rows as an index list, so the sparse kernels above run it too.
    idx = parent.window_indices_for(q.shape[0], q.shape[1], kv.shape[1], window, q.device)
    return sparse_attention(q, kv, idx, scale, sink, kv.shape[-1])
