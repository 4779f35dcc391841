"""mHC on NVIDIA GPUs: the batched, device-agnostic torch code of `cpu_fast`, run over all tokens
in one pass (`block=None`: a GPU pays per kernel launch, not per cache miss). The n x n Sinkhorn
is launch-bound there (about 2 * iters small kernels per site); a fused kernel is the next step
(see docs/mhc.md)."""

from v4hal.backends.cpu_fast import mhc as batched

__all__ = ["hc_pre", "hc_post", "hc_head", "sinkhorn"]

sinkhorn = batched.sinkhorn


def hc_pre(x, fn, scale, base, norm_eps, hc_eps, iters):
    return batched.hc_pre(x, fn, scale, base, norm_eps, hc_eps, iters, block=None)


def hc_post(out, x, post, comb):
    return batched.hc_post(out, x, post, comb, block=None)


def hc_head(x, fn, scale, base, norm_eps, hc_eps):
    return batched.hc_head(x, fn, scale, base, norm_eps, hc_eps, block=None)
