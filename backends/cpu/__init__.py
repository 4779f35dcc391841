"""The reference backend: plain PyTorch written for clarity, accumulating in float32/float64.

It is the specification every other backend is judged against; it runs in whatever dtype it is
given, so the parity harness can run it in float64.
"""

import torch


def probe() -> tuple[bool, str]:
    return True, ""


def device() -> torch.device:
    return torch.device("cpu")


def versions() -> dict[str, str]:
    return {"torch": torch.__version__}
