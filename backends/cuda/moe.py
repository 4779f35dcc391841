"""MoE on NVIDIA GPUs: routing, the sort-based permutation and the combine stay on the device
(inherited from `cpu_fast`, whose functions are device-agnostic torch); dense expert GEMMs are one
`torch._grouped_mm` call where this torch has it for the operands (BF16, SM90+, 16-aligned K and
N), else one GEMM per expert. Quantized experts run per expert through `ops.linear`, i.e. the quant
family's CUDA kernels.

Everything here also runs on CPU tensors (torch._grouped_mm has a CPU kernel), which is how the
tests exercise this code path without a GPU."""

import torch

from v4hal.backends import registry

parent = registry.parent_family(__name__)

GROUPED_MM_ALIGN = 16  # bytes-per-row alignment torch._grouped_mm asks of BF16 operands


def grouped_mm_usable(x: torch.Tensor, weight: torch.Tensor) -> bool:
    if not hasattr(torch, "_grouped_mm") or x.dtype != torch.bfloat16 or weight.dtype != torch.bfloat16:
        return False
    if x.shape[1] % GROUPED_MM_ALIGN or weight.shape[1] % GROUPED_MM_ALIGN:
        return False
    if x.device.type == "cuda":
        return torch.cuda.get_device_capability(x.device) >= (9, 0)
    return x.device.type == "cpu"


def grouped_matmul(x, weight, group_offsets, scale, fmt, act_scale_fmt):
    if fmt == "dense" and x.shape[0] and grouped_mm_usable(x, weight):
        # offs are the groups' end rows (int32); transposing the [E, N, K] stack gives [E, K, N].
        return torch._grouped_mm(x, weight.transpose(1, 2), offs=group_offsets[1:].to(torch.int32))
    return parent.grouped_matmul(x, weight, group_offsets, scale, fmt, act_scale_fmt)
