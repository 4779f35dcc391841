"""Shared by the quant tests: run one quant op on a named CPU-capable implementation."""

from v4hal import ops
from v4hal.backends import registry

cuda_quant = registry.family_view("cuda", "quant")

# "cuda-on-cpu" calls the cuda module's functions on CPU tensors: its device-agnostic fallback
# code, exercised without a GPU (the sm90 scaled_mm path has its own cuda-marked tests).
CPU_IMPLS = ("cpu_fast", "mindspore", "cuda-on-cpu")


def run_impl(name: str, op: str, *args):
    if name == "cuda-on-cpu":
        return getattr(cuda_quant, op)(*args)
    with registry.forced(name):
        return getattr(ops, op)(*args)
