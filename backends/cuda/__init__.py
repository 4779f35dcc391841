"""NVIDIA GPUs: PyTorch CUDA, `torch._scaled_mm` block scaling on SM90+, Triton where importable."""

import functools
import importlib
import importlib.util

import torch
from torch.compiler import is_compiling

PARENT = "cpu_fast"  # its device-agnostic torch paths run on the GPU


def probe() -> tuple[bool, str]:
    if torch.version.cuda is None:
        return False, f"torch {torch.__version__} is a build without CUDA"
    if not torch.cuda.is_available():
        return False, "no CUDA device visible (torch.cuda.is_available() is False)"
    return True, ""


def triton_kernels(family: str, x: torch.Tensor):
    """This backend's Triton kernels for `family` (the module `triton_<family>.py`) when `x` is
    on a GPU and triton imports, else None (the torch path runs). Imported here, at first use, so
    probing or importing v4hal never loads triton. The family modules call it only from the
    functions the contracts dispatch to, so a kernel never sees unvalidated arguments. Inside
    torch.compile the torch path runs too (Inductor writes its own Triton from it, and an import
    there would break the graph)."""
    if not x.is_cuda or is_compiling():
        return None
    return _kernel_module(family)


@functools.cache
def _kernel_module(family: str):
    """Looked up once: the decode loop asks for every op call."""
    if importlib.util.find_spec("triton") is None:
        return None
    return importlib.import_module(f"{__name__}.triton_{family}")


def device() -> torch.device:
    return torch.device("cuda")


def capability() -> tuple[int, int]:
    return torch.cuda.get_device_capability()


def versions() -> dict[str, str]:
    out = {"torch": torch.__version__, "cuda": str(torch.version.cuda)}
    if torch.cuda.is_available():
        out["device"] = torch.cuda.get_device_name()
        out["capability"] = "sm%d%d" % capability()
    return out
