"""RMSNorm and linear on Ascend. rms_norm is `npu_rms_norm` (float32 math inside the kernel, gamma
in x's dtype, as its docs require: a float32 weight is rounded to x's dtype first); float64 and
unweighted norms take cpu_fast's torch path. Linear is inherited from cpu_fast: dense -> torch
matmul on the NPU; quantized formats go through the quant contracts, i.e. this backend's per-chip
choices (see quant.chip_path)."""

import torch

from v4hal.backends import registry
from v4hal.backends.ascend import npu

torch_path = registry.parent_family(__name__)

NPU_NORM_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def rms_norm(x, weight, eps):
    if x.dtype not in NPU_NORM_DTYPES or x.dim() < 2 or weight is None:
        return torch_path.rms_norm(x, weight, eps)
    return npu().npu_rms_norm(x, weight.to(x.dtype), epsilon=eps)[0]
