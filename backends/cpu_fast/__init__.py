"""The fast CPU backend: same contracts as `cpu`, written for speed (fused, batched, no Python
loops over tokens) and checked against the `cpu` reference by the parity harness."""

import torch
from torch.compiler import is_compiling

PARENT = "cpu"  # the reference, made fast where it pays


def cast(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """`t.to(dtype)` without the call when it would do nothing: decode runs a few hundred of
    these a step, each ~1 us of dispatch for no work."""
    return t if t.dtype == dtype else t.to(dtype)


def eager_on_cpu(t: torch.Tensor) -> bool:
    """Whether a decode shortcut may leave tensor ops (Python floats, per-expert loops, complex
    views): only on CPU tensors, and never under `torch.jit.trace` (the ONNX exporter), which
    would freeze Python values into the graph or meet ops ONNX lacks, nor under `torch.compile`
    (values read in Python break the graph; the tensor paths are what inductor fuses)."""
    return t.device.type == "cpu" and not torch.jit.is_tracing() and not is_compiling()


def probe() -> tuple[bool, str]:
    return True, ""


def device() -> torch.device:
    return torch.device("cpu")


def versions() -> dict[str, str]:
    from v4hal.backends.cpu_fast.basic import kernel

    return {"torch": torch.__version__, "threads": str(torch.get_num_threads()), "float32 linear": kernel()}
