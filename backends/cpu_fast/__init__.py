"""The fast CPU backend: same contracts as `cpu`, written for speed (fused, batched, no Python
loops over tokens) and checked against the `cpu` reference by the parity harness."""

import torch


def probe() -> tuple[bool, str]:
    return True, ""


def device() -> torch.device:
    return torch.device("cpu")


def versions() -> dict[str, str]:
    return {"torch": torch.__version__, "threads": str(torch.get_num_threads())}
