"""mHC on NVIDIA GPUs: the batched, device-agnostic torch path of `cpu_fast` (one GEMM-shaped
projection, one batched stream product per site, Sinkhorn over all tokens at once). On a GPU the
n x n Sinkhorn is launch-bound (about 2 * iters small kernels per site); a fused kernel is the
next step (see docs/mhc.md)."""

from v4hal.backends.cpu_fast.mhc import hc_head, hc_post, hc_pre, sinkhorn

__all__ = ["hc_pre", "hc_post", "hc_head", "sinkhorn"]
