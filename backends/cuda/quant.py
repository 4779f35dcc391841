"""CUDA quantized matmuls.

fp8_matmul: on SM90+ with K and N multiples of 128, one cuBLAS block-scaled GEMM through
`torch.nn.functional.scaled_mm` (recipes BlockWise1x128 for the activation, BlockWise128x128 for
the weight: exactly DeepSeek's scaling, fp32 accumulation, no fast accumulation). The scale
layouts it wants (from torch 2.13's `_check_scaled_mm_sizes_v2`): the activation scale
`[M, K/128]` with strides `(1, M)` (outer-dim-major), the weight scale transposed to
`[round_up(K/128, 4), N/128]` with strides `(1, L4)`. Anything else (older GPUs, ragged shapes,
float64 output) runs this backend's Triton kernel (`triton_quant.py`, FP8 tensor cores on sm89+,
the same per-block scaling, any shape), and where that cannot run either (no triton, older GPUs,
float64 scales or output) the correct fallback: dequantize both operands in float32, one GEMM.
int8_matmul: cuBLAS's int8 GEMM (`torch._int_mm`) where it applies. Quantizing and dequantizing
are inherited from cpu_fast (device-agnostic off the CPU).

The functions are device-agnostic torch, so the fallback is exercised on CPU tensors by the tests.
"""

import functools

import torch
import torch.nn.functional as F

from v4hal.backends import cuda as backend
from v4hal.backends import registry
from v4hal.ops.quant import ACT_BLOCK, INT32_EXACT_K, WEIGHT_BLOCK

parent = registry.parent_family(__name__)

SCALED_MM_OUT = (torch.bfloat16, torch.float32, torch.float16)
FP8_DOT_CAPABILITY = (8, 9)  # Ada and later multiply e4m3 tiles on tensor cores


@functools.cache
def blockwise_scaled_mm(device_index: int) -> tuple[bool, str]:
    """(usable, why not) for cuBLAS 1x128 x 128x128 block scaling on this GPU."""
    if not hasattr(F, "scaled_mm"):
        return False, f"torch {torch.__version__} has no torch.nn.functional.scaled_mm"
    major, minor = torch.cuda.get_device_capability(device_index)
    if major < 9:
        return False, f"sm{major}{minor} has no FP8 tensor cores with block scaling (needs sm90+)"
    return True, ""


def _use_scaled_mm(a2, b, out_dtype) -> bool:
    n, k = b.shape
    return (a2.is_cuda and out_dtype in SCALED_MM_OUT and k % 128 == 0 and n % 128 == 0
            and blockwise_scaled_mm(a2.device.index or 0)[0])


def blockwise_scales(a_scale, b_scale, m: int, k: int):
    """The scale layouts cuBLAS wants: `[M, K/128]` with strides `(1, M)`, and the weight scale
    transposed and padded to `[round_up(K/128, 4), N/128]` with strides `(1, L4)`. Built with
    explicit strides: `.t().contiguous().t()` keeps row-major strides when a dim has size 1
    (M = 1 at decode), which the layout check rejects."""
    kb = k // 128
    l4 = -(-kb // 4) * 4
    sa = torch.empty_strided((m, kb), (1, m), dtype=torch.float32, device=a_scale.device)
    sa.copy_(a_scale)
    sb = torch.zeros((b_scale.shape[0], l4), dtype=torch.float32, device=b_scale.device).t()
    sb[:kb].copy_(b_scale.t())
    return sa, sb


def _scaled_mm_blockwise(a2, a_scale, b, b_scale, out_dtype):
    sa, sb = blockwise_scales(a_scale, b_scale, a2.shape[0], a2.shape[1])
    return F.scaled_mm(a2.contiguous(), b.t(), sa, F.ScalingType.BlockWise1x128,
                       sb, F.ScalingType.BlockWise128x128, output_dtype=out_dtype)


def _fp8_tensor_cores(x) -> bool:
    """Whether the Triton GEMM's e4m3 products can run where x is (off a GPU only Triton's
    interpreter gets kernels, and it multiplies e4m3 anywhere)."""
    return not x.is_cuda or torch.cuda.get_device_capability(x.device) >= FP8_DOT_CAPABILITY


def _dequant_act(a, a_scale):
    return a.float() * a_scale.float().repeat_interleave(ACT_BLOCK[1], dim=-1)[..., : a.shape[-1]]


def fp8_matmul(a, a_scale, b, b_scale, out_dtype):
    k = a.shape[-1]
    a2, s2 = a.reshape(-1, k), a_scale.reshape(-1, a_scale.shape[-1])
    kernels = backend.triton_kernels("quant", a2)
    if _use_scaled_mm(a2, b, out_dtype):
        y = _scaled_mm_blockwise(a2, s2, b, b_scale, out_dtype)
    elif kernels is not None and kernels.in_domain(s2, b_scale, out_dtype) and _fp8_tensor_cores(a2):
        y = kernels.fp8_matmul(a2, s2, b, b_scale, out_dtype)
    else:
        # Fallback: per-K-block scaling equals scaling the operands, so one float32 GEMM
        # (TF32 stays off unless the user enabled it) computes every block at once.
        w = parent.dequantize_fp8(b, b_scale.float(), WEIGHT_BLOCK, torch.float32)
        y = (_dequant_act(a2, s2) @ w.T).to(out_dtype)
    return y.reshape(*a.shape[:-1], b.shape[0])


def fp4_matmul(a, b, b_scale, a_scale, out_dtype):
    # sm100's MXFP4 scaled_mm (BlockWise1x32, float4_e2m1fn_x2) needs a Blackwell GPU to verify;
    # until then: dequantize (e2m1 x power of two is exact in float32) and one GEMM.
    act = a.float() if a_scale is None else _dequant_act(a, a_scale)
    return (act @ parent.dequantize_fp4(b, b_scale, torch.float32).T).to(out_dtype)


def int8_matmul(a, a_scale, b, b_scale, out_dtype):
    k = a.shape[-1]
    a2 = a.reshape(-1, k)
    if not (a2.is_cuda and a2.shape[0] > 16 and k % 8 == 0 and b.shape[0] % 8 == 0 and k <= INT32_EXACT_K):
        return parent.int8_matmul(a, a_scale, b, b_scale, out_dtype)
    # cuBLAS int8 GEMM, int32 accumulation (dense operands: an expanded activation has stride 0)
    acc = torch._int_mm(a2.contiguous(), b.contiguous().t()).float()
    y = acc * a_scale.reshape(-1, 1).float() * b_scale.float()
    return y.reshape(*a.shape[:-1], b.shape[0]).to(out_dtype)
