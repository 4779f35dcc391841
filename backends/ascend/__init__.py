"""Huawei Ascend NPUs through CANN's `torch_npu` (the `npu_*` op family), imported lazily.

Chips: A2 = Atlas 800T A2 / 910B, A3 = 910C (Ascend910_93), A5 = Ascend 950. A2 and A3 have no FP8
units, so FP8 contracts take the int8 W8A8 or BF16-dequant path there (see `chip_path`).
`V4HAL_ASCEND_CHIP=A2|A3|A5` overrides detection.

Without an NPU, `v4hal dryrun --backend ascend` (`v4hal.tools.ascend.dryrun`) runs this backend on Meta tensors
against the pinned torch-npu wheel's schemas and Meta kernels: while it runs, `npu()` is a shim
over those kernels, `probe()` reports usable, `device()` is `meta` and `chip()` the chip chosen.

With `V4HAL_ASCEND_EMULATE=A2|A3|A5`, `npu()` answers from the numerics emulator of the vendor ops
(v4hal.tools.ascend.emulator) on CPU tensors: parity then runs this backend's code numerically. It
is used only when asked for (`auto` never picks it) and reports label it "ascend (emulated A3)".
"""

import functools
import importlib
import importlib.util
import os

import torch

PARENT = "cpu_fast"  # its device-agnostic torch paths run on the NPU

CHIPS = ("A2", "A3", "A5")
_npu = None
# Set by the dry run's install(): an object with `.shim` (stands in for torch_npu), `.chip` and
# `.versions()`. The backend knows nothing else of its tooling.
_dry_run = None


def emulated_chip() -> str | None:
    """The chip V4HAL_ASCEND_EMULATE asks the emulator to stand in for, None when unset."""
    if _dry_run is not None:
        return None
    from v4hal.tools.ascend.emulator import requested_chip

    return requested_chip()


def explicit_only() -> bool:
    """The emulated backend runs only when asked for by name (the registry's auto skips it)."""
    return emulated_chip() is not None


def label() -> str:
    emulated = emulated_chip()
    return f"ascend (emulated {emulated})" if emulated else "ascend"


def probe() -> tuple[bool, str]:
    if _dry_run is not None:
        return True, f"Meta dry run for {_dry_run.chip}: torch-npu schemas and Meta kernels, no NPU"
    if emulated_chip():
        return True, f"emulated {emulated_chip()}: CPU emulator of the documented npu_* ops, not a device"
    if importlib.util.find_spec("torch_npu") is None:
        return False, "torch_npu is not installed (needs an Ascend machine with CANN)"
    try:
        npu()
    except Exception as exc:  # typically CANN libraries missing: libhccl.so / libascendcl.so
        return False, f"import torch_npu failed (is CANN installed and set_env.sh sourced?): {exc}"
    if not torch.npu.is_available():
        return False, "torch_npu imported but no NPU is visible (torch.npu.is_available() is False)"
    return True, ""


def npu():
    """The torch_npu module, imported on first use only."""
    global _npu
    if _dry_run is not None:
        return _dry_run.shim
    emulated = emulated_chip()
    if emulated:
        return _emulator(emulated)
    if _npu is None:
        _npu = importlib.import_module("torch_npu")
    return _npu


@functools.lru_cache(maxsize=None)
def _emulator(emulated: str):
    from v4hal.tools.ascend.emulator import Emulator

    return Emulator(emulated)


def device() -> torch.device:
    if emulated_chip():
        return torch.device("cpu")
    return torch.device("meta" if _dry_run is not None else "npu")


def chip() -> str:
    """A2, A3 or A5, from V4HAL_ASCEND_CHIP or the SoC name CANN reports."""
    if _dry_run is not None:
        return _dry_run.chip
    forced = emulated_chip() or os.environ.get("V4HAL_ASCEND_CHIP", "").strip().upper()
    if forced:
        if forced not in CHIPS:
            raise ValueError(f"V4HAL_ASCEND_CHIP: expected one of {', '.join(CHIPS)}, got {forced!r}")
        return forced
    return chip_from_soc_name(torch.npu.get_device_name())


def chip_from_soc_name(name: str) -> str:
    n = name.replace(" ", "").lower()
    if "950" in n:
        return "A5"
    if "910_93" in n or "910c" in n:
        return "A3"
    if "910b" in n:
        return "A2"
    raise ValueError(f"unrecognised Ascend SoC {name!r}; set V4HAL_ASCEND_CHIP=A2|A3|A5")


def versions() -> dict[str, str]:
    if _dry_run is not None:
        return _dry_run.versions()
    if emulated_chip():
        return {"torch": torch.__version__, "torch_npu": "none (emulated)", "chip": f"{emulated_chip()} (emulated)"}
    out = {"torch": torch.__version__, "torch_npu": getattr(npu(), "__version__", "?")}
    cann = os.environ.get("ASCEND_TOOLKIT_HOME") or os.environ.get("ASCEND_HOME_PATH")
    if cann:
        out["cann_home"] = cann
    if torch.npu.is_available():
        out["device"] = torch.npu.get_device_name()
        out["chip"] = chip()
    return out
