"""mHC on Ascend through CANN's fused kernels `npu_mhc_pre`, `npu_mhc_sinkhorn`, `npu_mhc_post`.

Argument meanings (torch-npu 2.13.0 `_op_plugin_docs.py`, CANN ops-transformer aclnnMhc* docs):
- `npu_mhc_pre(x, phi, alpha, bias, *, gamma, norm_eps, hc_eps, out_flag, inner_precise)`:
  x bf16/fp16 `[T, n, D]` or `[B, S, n, D]`; phi = our fn `[(n^2+2n), nD]` fp32; alpha = our
  scale `[3]`; bias = our base. Returns (h_in, h_post, h_res, inv_rms, h_mix, h_pre): h_in is the
  collapsed layer input, h_post = 2*sigmoid(...), h_res = the comb LOGITS (`mix*alpha2 + bias2`,
  before Sinkhorn). gamma (an RMSNorm weight over n*D) is None: V4's mHC norm is unweighted.
  With alpha of shape [2] and phi/bias of 2n rows the op computes pre and post only (used for
  hc_head, with n zero post rows).
- `npu_mhc_sinkhorn(x, *, eps, num_iters, out_flag)`: x = logits fp32 `[T, n, n]`; computes
  softmax(x, -1) + eps, a column normalisation, then num_iters - 1 (row, column) rounds, every
  division over (sum + eps): exactly our `sinkhorn`. Returns (y, norm_out, sum_out).
- `npu_mhc_post(x, h_res, h_out, h_post)`: `x_next = h_res^T @ x + h_out * h_post`, with x the
  streams (bf16/fp16), h_res = comb fp32, h_out the sub-layer output, h_post fp32.
The pinned wheel documents all three for Ascend 950 (A5) only, with n in {4, 6, 8} and fp16/bf16
streams; elsewhere (A2/A3, float32 streams, other n) the batched torch path runs on the NPU.
"""

import torch

from v4hal.backends import ascend, registry
from v4hal.backends.ascend import npu

batched = registry.parent_family(__name__)

FUSED_STREAMS = (4, 6, 8)
FUSED_DTYPES = (torch.bfloat16, torch.float16)
MAX_ITERS = 100


def _fused(x: torch.Tensor) -> bool:
    return (ascend.chip() == "A5" and x.dtype in FUSED_DTYPES and x.shape[-2] in FUSED_STREAMS
            and x.shape[-1] % 16 == 0)


def sinkhorn(logits, iters, eps):
    if (ascend.chip() == "A5" and logits.dtype == torch.float32 and logits.shape[-1] in FUSED_STREAMS
            and logits.dim() in (3, 4) and iters <= MAX_ITERS):
        return npu().npu_mhc_sinkhorn(logits, eps=eps, num_iters=iters, out_flag=0)[0]
    return batched.sinkhorn(logits, iters, eps)


def hc_pre(x, fn, scale, base, norm_eps, hc_eps, iters):
    if _fused(x):
        h_in, post, comb_logits = npu().npu_mhc_pre(x, fn.float(), scale.float(), base.float(), gamma=None,
                                                    norm_eps=norm_eps, hc_eps=hc_eps, out_flag=0)[:3]
    else:
        h_in, post, comb_logits = batched.hc_pre_logits(x, fn, scale, base, norm_eps, hc_eps, block=None)
    return h_in, post, sinkhorn(comb_logits, iters, hc_eps)


def hc_post(out, x, post, comb):
    if not _fused(x) or out.dtype != x.dtype:
        return batched.hc_post(out, x, post, comb, block=None)
    return npu().npu_mhc_post(x, comb.float(), out, post.float())


def hc_head(x, fn, scale, base, norm_eps, hc_eps):
    if not _fused(x):
        return batched.hc_head(x, fn, scale, base, norm_eps, hc_eps, block=None)
    # pre+post mode of npu_mhc_pre with all-zero post rows: h_in is exactly the head's collapse.
    phi = torch.cat([fn.float(), fn.new_zeros(fn.shape, dtype=torch.float32)])
    alpha = torch.cat([scale.float(), scale.new_ones(1, dtype=torch.float32)])
    bias = torch.cat([base.float(), base.new_zeros(base.shape, dtype=torch.float32)])
    return npu().npu_mhc_pre(x, phi, alpha, bias, gamma=None, norm_eps=norm_eps, hc_eps=hc_eps,
                             out_flag=0)[0]
