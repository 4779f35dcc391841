"""`kv_cache_dtype="int8"` (V3.2 / V3 only): each MLA layer's latents in the `int8` layout of
`ops.kv_cache` (512 int8 codes with a float32 `amax / 127` scale per 128, the 64 RoPE values in
BF16: 656 bytes per token), the record Ascend's `npu_kv_quant_sparse_flash_attention` reads, so
A2 / A3, which have no FP8, attend over a quantized cache in one kernel. The store is the FP8
cache's paged `FP8Rows` (the layout is a parameter of it; blocks of 64 tokens, a multiple of the
kernel's 16); the indexer keys stay in the compute dtype (the kernel covers the latents only).
"""

from __future__ import annotations

from v4hal.model.cache_fp8 import FP8Rows, check_dims

LAYOUT = "int8"


def int8_latents(c) -> FP8Rows:
    """An empty int8 latent store for an MLA layer of config `c` (kv_lora 512, rope 64 required)."""
    check_dims("V32Attention", LAYOUT, kv_lora_rank=("nope", c.kv_lora), qk_rope_head_dim=("rope", c.rope_dim))
    return FP8Rows(LAYOUT)
