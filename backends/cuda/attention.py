"""Sparse attention on NVIDIA GPUs.

Everything but this override is inherited from cpu_fast: the device-agnostic gather path (gather
the selected KV rows on the device, batched matmuls in float32, query chunks sized for device
memory) and the reference's elementwise ops. FlashMLA's sparse kernel
(`flash_mla.flash_mla_sparse_fwd`, SM90+) takes over when it is importable and the call is in its
domain: bfloat16, no sink, v_dim 512, head dim 512 or 576, heads a multiple of 64. The indexer
uses the same chunked scoring + `torch.topk` as cpu_fast (DeepGEMM's FP8 indexer kernels would
change the numbers: they quantize q and k).
"""

import importlib
import importlib.util

import torch

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
    return parent.sparse_attention(q, kv, indices, scale, sink, v_dim)
