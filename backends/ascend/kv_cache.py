"""The quantized KV cache on Ascend: attention over the `int8` layout through CANN's
`npu_kv_quant_sparse_flash_attention` (torch-npu 2.13.0 schema and docs).

What the pinned docs define (`_op_plugin_docs.py`), and how the contract maps onto it:
- query `[B, S, N, 576]` bfloat16 ("q_nope和q_rope按D维度拼接"); key int8 "int8的k_nope、query相同
  dtype的k_rope和float32的量化参数按D维度拼接得到": the `int8` layout's record, 512 + 128 + 16 = 656
  bytes; with layout_kv "PA_BSND" the key is `[block_num, block_size, KV_N=1, 656]` plus a
  block_table. key/value_quant_mode 2 (per tile), tile_size 128, quant_scale_repo_mode 1 (scales
  stored with the data), attention_mode 2 (MLA-absorb: value is the key's latent, the output
  drops the `rope_head_dim` = 64 RoPE values: `[B, S, N, 512]`). sparse_indices `[B, S, 1, K]`
  int32, every row's valid indices first (we sort the -1 to the end), sparse_mode 0 (our indices
  already encode causality). Dequantization is `code * scale` (vllm-ascend's test of this op).
- The contract's slots are already resolved through its block table, so the whole cache is passed
  as one sequence per batch row: block_table `[B, blocks]` = 0..blocks-1, positions = slots,
  actual_seq_lengths_kv = blocks * block_size.
- One output: no log-sum-exp, and no sink input. The kernel runs only when the call asks for
  neither (V3.2's attention in the model: no sink, no LSE), with bf16 q, v_dim 512, a head count
  of 1..128 in powers of two, and blocks of a multiple of 16 up to 1024 tokens, contiguous (the
  limits vllm-ascend's README of the same kernel states; the torch-npu docs give none); every
  other call, and the e4m3 layouts (int8 keys only), runs cpu_fast's dequantize-then-attend path.
Chips: the torch-npu docs list none; vllm-ascend's README lists A2, A3 (int8 only) and 950.
Not verified on hardware: checked by the schema checker, the Meta dry run and the emulator.
"""

import torch

from v4hal.backends import registry
from v4hal.backends.ascend import npu

parent = registry.parent_family(__name__)

HEADS = (1, 2, 4, 8, 16, 32, 64, 128)  # 48 is documented for the 950 only
BLOCK_GRANULE, MAX_BLOCK = 16, 1024


def kernel_takes(q, cache, lay, sink, v_dim, need_lse) -> bool:
    return (lay.codes == "int8" and q.dtype == torch.bfloat16 and sink is None and not need_lse
            and v_dim == lay.nope and q.shape[2] in HEADS and cache.is_contiguous()
            and cache.shape[1] % BLOCK_GRANULE == 0 and cache.shape[1] <= MAX_BLOCK)


def sparse_attention_fp8kv(q, cache, slots, scale, lay, sink, v_dim, need_lse=True):
    if not kernel_takes(q, cache, lay, sink, v_dim, need_lse):
        return parent.sparse_attention_fp8kv(q, cache, slots, scale, lay, sink, v_dim, need_lse)
    b = q.shape[0]
    blocks, block_size = cache.shape[:2]
    order = torch.argsort((slots < 0).to(torch.int8), dim=-1, stable=True)
    idx = torch.gather(slots, -1, order).to(torch.int32).unsqueeze(2).contiguous()
    table = torch.arange(blocks, dtype=torch.int32, device=q.device).expand(b, blocks).contiguous()
    lengths = torch.full((b,), blocks * block_size, dtype=torch.int32, device=q.device)
    key = cache.unsqueeze(2)
    out = npu().npu_kv_quant_sparse_flash_attention(
        q.contiguous(), key, key, idx, scale, key_quant_mode=2, value_quant_mode=2, block_table=table,
        actual_seq_lengths_kv=lengths, sparse_block_size=1, layout_query="BSND", layout_kv="PA_BSND",
        sparse_mode=0, attention_mode=2, quant_scale_repo_mode=1, tile_size=lay.tile, rope_head_dim=lay.rope)
    return out, None
