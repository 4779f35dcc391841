"""NVIDIA GPUs: PyTorch CUDA, `torch._scaled_mm` block scaling on SM90+, Triton where importable."""

import torch

PARENT = "cpu_fast"  # its device-agnostic torch paths run on the GPU


def probe() -> tuple[bool, str]:
    if torch.version.cuda is None:
        return False, f"torch {torch.__version__} is a build without CUDA"
    if not torch.cuda.is_available():
        return False, "no CUDA device visible (torch.cuda.is_available() is False)"
    return True, ""


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
