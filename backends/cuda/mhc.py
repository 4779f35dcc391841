"""mHC on NVIDIA GPUs: `hc_pre` as one GEMM (the mixes) and one Triton kernel (the RMS factor,
the sigmoids, the Sinkhorn and the collapse: `triton_mhc.py`) where the kernel can run; elsewhere,
and for `hc_post` / `hc_head` / `sinkhorn`, cpu_fast's device-agnostic torch."""

from v4hal.backends import cuda as backend
from v4hal.backends import registry

parent = registry.parent_family(__name__)


def hc_pre(x, fn, scale, base, norm_eps, hc_eps, iters):
    kernels = backend.triton_kernels("mhc", x)
    if kernels is None or not kernels.in_domain(x):
        return parent.hc_pre(x, fn, scale, base, norm_eps, hc_eps, iters)
    return kernels.hc_pre(x, fn, scale, base, norm_eps, hc_eps, iters)
