"""The FP8 KV cache on NVIDIA GPUs: attention and the indexer read the cache's bytes.

Writing and reading are inherited (cpu_fast's, the reference's torch on the GPU). On a GPU,
`sparse_attention_fp8kv` runs FlashMLA's sparse FP8 decode (`flash_mla.flash_mla_with_kvcache`
with `is_fp8_kvcache=True` and `indices`, SM90 / SM100) when it is importable and the call is in
its domain (bfloat16 q, the v4 or v3.2 layout, v_dim 512, 64 or 128 heads, FlashMLA's block
stride), else this backend's Triton kernel (`triton_kv_cache.py`: any e4m3 layout, heads, sink, v_dim,
16/32-bit q), else cpu_fast's dequantize-then-attend path (float64, CPU tensors, inside
torch.compile; the int8 layout, whose codes the kernels do not decode). `indexer_scores_fp8kv`
takes the Triton kernel likewise.
"""

import functools
import inspect

import torch

from v4hal.backends import cuda as backend
from v4hal.backends import registry
from v4hal.backends.cuda.attention import flash_mla

parent = registry.parent_family(__name__)

FLASH_MLA_TOPK_BLOCK = 64  # its decode kernels step the index list 64 at a time (topk % 64 == 0)
FLASH_MLA_BLOCK_GRANULE = {"v4": 576, "v3.2": 656}  # its required multiple of the block stride


def flash_mla_takes(dtype, heads, lay, v_dim, block_stride, capability) -> bool:
    """Whether FlashMLA's sparse FP8 decode documents (and its C++ entry accepts) this call."""
    return (dtype == torch.bfloat16 and lay.name in FLASH_MLA_BLOCK_GRANULE and v_dim == 512
            and heads in (64, 128) and capability[0] in (9, 10)
            and block_stride % FLASH_MLA_BLOCK_GRANULE[lay.name] == 0)


def _flash_mla_domain(q, cache, lay, v_dim) -> bool:
    return q.is_cuda and flash_mla_takes(q.dtype, q.shape[2], lay, v_dim, cache.stride(0), backend.capability())


@functools.cache
def has_sparse_fp8_decode(fm) -> bool:
    """Whether this flash_mla has the interface used here (January 2026 on: MODEL1's layout, the
    sink, metadata built on the first call); older releases take other arguments."""
    fn = getattr(fm, "flash_mla_with_kvcache", None)
    return fn is not None and {"is_fp8_kvcache", "indices", "attn_sink"} <= set(inspect.signature(fn).parameters)


def flash_mla_decode(fm, q, cache, slots, scale, sink):
    """FlashMLA's sparse FP8 decode in the contract's terms. Its `indices` are our slots (int32,
    padded with -1 to a multiple of 64); its LSE, `[B, H, S]`, leaves out the sink and is +inf for
    a query with no entry (whose output is 0), while the contract's counts the sink and is -inf
    there: the sink is added back with a logaddexp. The scheduling metadata is built afresh per call
    (FlashMLA's first-call path: one small extra kernel), since the op keeps no state between calls."""
    b, s, k = slots.shape
    pad = -k % FLASH_MLA_TOPK_BLOCK
    indices = torch.nn.functional.pad(slots.int(), (0, pad), value=-1).contiguous()
    meta, _ = fm.get_mla_metadata()
    out, lse = fm.flash_mla_with_kvcache(q.contiguous(), cache.unsqueeze(2), None, None, 512, meta, None,
                                         softmax_scale=scale, causal=False, is_fp8_kvcache=True, indices=indices,
                                         attn_sink=None if sink is None else sink.float().contiguous())
    lse = lse.transpose(1, 2).float()
    lse = torch.where(torch.isposinf(lse), float("-inf"), lse)
    if sink is not None:
        lse = torch.logaddexp(lse, sink.float().view(1, 1, -1))
    return out, lse


def sparse_attention_fp8kv(q, cache, slots, scale, lay, sink, v_dim, need_lse=True):
    fm = flash_mla() if _flash_mla_domain(q, cache, lay, v_dim) else None
    if fm is not None and has_sparse_fp8_decode(fm):
        return flash_mla_decode(fm, q, cache, slots, scale, sink)
    kernels = backend.triton_kernels("kv_cache", q)
    if kernels is not None and lay.codes == "e4m3" and kernels.in_domain(q, sink):
        return kernels.sparse_attention_fp8kv(q, cache, slots, scale, lay, sink, v_dim)
    return parent.sparse_attention_fp8kv(q, cache, slots, scale, lay, sink, v_dim, need_lse)


def indexer_scores_fp8kv(q, cache, slots, weights, scale, lay):
    kernels = backend.triton_kernels("kv_cache", q)
    if kernels is not None and lay.codes == "e4m3" and kernels.indexer_in_domain(q, weights):
        return kernels.indexer_scores_fp8kv(q, cache, slots, weights, scale, lay)
    return parent.indexer_scores_fp8kv(q, cache, slots, weights, scale, lay)
