"""Triton kernel for DeepSeek's FP8 GEMM: e4m3 operands, 1x128 activation scales, 128x128 weight
scales, fp32 accumulation. Imports triton, so only `backends/cuda/quant.py` loads it, lazily, and
only for arguments `ops.quant.fp8_matmul` has already validated.

Per 128-wide K block each output tile takes one FP8 tensor-core product (`tl.dot` of the raw e4m3
tiles, fp32 result), scales it by its rows' activation scales and its columns' weight scale, and
adds it to the fp32 accumulator: the contract's math, block for block. Ragged M, N and K are
masked loads (zeros), so any shape the contract accepts runs. The same source runs in Triton's
interpreter (`TRITON_INTERPRET=1`) on CPU tensors, which is how the tests check it.
"""

import torch
import triton
import triton.language as tl

from v4hal.ops.quant import ACT_BLOCK, WEIGHT_BLOCK

BLOCK_K = ACT_BLOCK[1]  # one scale block of K per step
assert BLOCK_K == WEIGHT_BLOCK[1] == WEIGHT_BLOCK[0], "the kernel steps one scale block at a time"
OUT = {torch.bfloat16: tl.bfloat16, torch.float16: tl.float16, torch.float32: tl.float32}


@triton.jit(do_not_specialize=["m", "n", "k"])  # sizes: one compile serves all
def _fp8_block_scaled_mm(a, a_scale, b, b_scale, out, m, n, k,
                         stride_am, stride_ak, stride_sam, stride_sak, stride_bn, stride_bk,
                         stride_sbn, stride_sbk, stride_om, stride_on,
                         BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                         SCALE_ROWS: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok, col_ok = rows < m, cols < n
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for kb in range(0, tl.cdiv(k, BLOCK_K)):
        ks = kb * BLOCK_K + tl.arange(0, BLOCK_K)
        k_ok = ks < k
        a_tile = tl.load(a + rows[:, None] * stride_am + ks[None, :] * stride_ak,
                         mask=row_ok[:, None] & k_ok[None, :], other=0.0)
        b_tile = tl.load(b + cols[:, None] * stride_bn + ks[None, :] * stride_bk,
                         mask=col_ok[:, None] & k_ok[None, :], other=0.0)
        partial = tl.dot(a_tile, tl.trans(b_tile), out_dtype=tl.float32)
        sa = tl.load(a_scale + rows * stride_sam + kb * stride_sak, mask=row_ok, other=0.0)
        sb = tl.load(b_scale + (cols // SCALE_ROWS) * stride_sbn + kb * stride_sbk, mask=col_ok, other=0.0)
        acc += partial * sa[:, None] * sb[None, :]
    tl.store(out + rows[:, None] * stride_om + cols[None, :] * stride_on,
             acc.to(out.dtype.element_ty), mask=row_ok[:, None] & col_ok[None, :])


def in_domain(a_scale, b_scale, out_dtype) -> bool:
    """fp32 scales and an output Triton stores; float64 scales or output take the torch path."""
    return a_scale.dtype == b_scale.dtype == torch.float32 and out_dtype in OUT


def tile_m(m: int) -> int:
    """Rows per tile: decode's few rows get the smallest tile tl.dot takes (16), prefill 64."""
    return 16 if m <= 16 else (32 if m <= 32 else 64)


def tile_n(m_tiles: int, n: int, device: torch.device) -> int:
    """Columns per tile: 128, narrowed (down to 32) while the tiles would not give every SM two
    programs; decode's one row of tiles over N = 4096 would otherwise be 32 programs on 132 SMs.
    Each column finds its own weight scale, so any width works."""
    if device.type != "cuda":
        return 128
    target = 2 * torch.cuda.get_device_properties(device).multi_processor_count
    block_n = 128
    while block_n > 32 and m_tiles * triton.cdiv(n, block_n) < target:
        block_n //= 2
    return block_n


def fp8_matmul(a2, a_scale, b, b_scale, out_dtype, block_n=None):
    """`[M, K] x [N, K]^T` with the contract's scaling; a2/a_scale are 2-D (rows flattened).
    block_n: columns per tile (None: `tile_n`)."""
    m, k = a2.shape
    n = b.shape[0]
    out = torch.empty(m, n, dtype=out_dtype, device=a2.device)
    if m == 0 or n == 0:
        return out
    block_m = tile_m(m)
    block_n = block_n or tile_n(triton.cdiv(m, block_m), n, a2.device)
    grid = (triton.cdiv(m, block_m), triton.cdiv(n, block_n))
    _fp8_block_scaled_mm[grid](a2, a_scale, b, b_scale, out, m, n, k,
                               *a2.stride(), *a_scale.stride(), *b.stride(), *b_scale.stride(), *out.stride(),
                               BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=BLOCK_K, SCALE_ROWS=WEIGHT_BLOCK[0])
    return out
