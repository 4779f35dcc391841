"""A CPU emulator of the torch_npu `npu_*` ops the ascend backend calls: our reading of the pinned
torch-npu wheel's docs (`_op_plugin_docs.py`), schemas and Meta kernels, in plain torch.

Switch: `V4HAL_ASCEND_EMULATE=A2|A3|A5` (or `v4hal parity --backend ascend --emulate A3`). The
ascend backend's `npu()` then answers from `Emulator(chip)` on CPU tensors, so the backend's glue
(layouts, transposes, index conventions, modes, LSE reconstruction) runs numerically and parity
judges it against the cpu reference. It is never chosen by `auto` and every report says "emulated".

Each op checks what its docs say it accepts (dtypes, layouts, modes, value ranges, the chips it is
documented for) and raises `DeviceError` where the device or CANN's argument check would refuse
the call; an argument combination we do not emulate raises `NotEmulated` (never a silent guess).
Arithmetic follows the cube/vector units' documented precision: inputs in their own dtype, products
accumulated in float32, outputs rounded to the output dtype.

What it proves: that the backend calls each op the way its docs define it, and that the results it
rebuilds from the outputs are right. What it cannot: how the device really behaves where the docs
are silent; docs/ascend.md ("Numerics on the emulator") lists every such point and what we chose.
The op modules: emulator_basic (rms_norm, mHC), emulator_attention, emulator_moe, emulator_quant,
emulator_kv_quant (the int8-KV sparse attention).
"""

from __future__ import annotations

import importlib
import os
from collections import Counter
from typing import Callable

import torch

ENV = "V4HAL_ASCEND_EMULATE"
CHIPS = ("A2", "A3", "A5")
ALL_CHIPS = CHIPS
HALF = (torch.bfloat16, torch.float16)
FLOATS = (torch.bfloat16, torch.float16, torch.float32)
FP8 = (torch.float8_e4m3fn, torch.float8_e5m2)
MODULES = ("emulator_basic", "emulator_attention", "emulator_moe", "emulator_quant", "emulator_kv_quant")

_OPS: dict[str, tuple[Callable, tuple[str, ...]]] = {}


class DeviceError(RuntimeError):
    """The call breaks a documented constraint: the device (or CANN's argument check) refuses it."""


class NotEmulated(NotImplementedError):
    """The op, or this argument combination of it, is not emulated (no silent guess)."""


def requested_chip(env: dict | None = None) -> str | None:
    """The chip V4HAL_ASCEND_EMULATE asks to emulate, None when unset."""
    value = (os.environ if env is None else env).get(ENV, "").strip().upper()
    if not value:
        return None
    if value not in CHIPS:
        raise ValueError(f"{ENV}: expected one of {', '.join(CHIPS)}, got {value!r}")
    return value


def op(name: str, chips: tuple[str, ...] = ALL_CHIPS):
    """Register an emulated op; `chips` are the chips its docs list it for (see docs/ascend.md)."""

    def register(fn):
        _OPS[name] = (fn, chips)
        return fn

    return register


def emulated_ops() -> dict[str, tuple[str, ...]]:
    """Name -> chips, for every emulated op."""
    _load()
    return {name: chips for name, (_, chips) in sorted(_OPS.items())}


def _load() -> None:
    for module in MODULES:
        importlib.import_module(f"v4hal.tools.ascend.{module}")


class Emulator:
    """Stands in for the `torch_npu` module: `Emulator("A3").npu_rms_norm(x, gamma)`."""

    def __init__(self, chip: str):
        if chip not in CHIPS:
            raise ValueError(f"emulated chip: expected one of {', '.join(CHIPS)}, got {chip!r}")
        _load()
        self.chip = chip
        self.calls: Counter[str] = Counter()
        self.__version__ = f"emulated {chip}"

    def __getattr__(self, name: str):
        if name not in _OPS:
            raise NotEmulated(f"torch_npu.{name} is not emulated (emulated: {', '.join(sorted(_OPS))})")
        fn, chips = _OPS[name]

        def call(*args, **kwargs):
            if self.chip not in chips:
                raise DeviceError(f"{name}: not supported on {self.chip}; its docs list {'/'.join(chips)}")
            self.calls[name] += 1
            return fn(self.chip, *args, **kwargs)

        return call


# ----------------------------------------------------------------------------------- checks

def require(ok: bool, op_name: str, message: str) -> None:
    if not ok:
        raise DeviceError(f"{op_name}: {message}")


def dtype_in(op_name: str, arg: str, t: torch.Tensor, allowed) -> None:
    require(t.dtype in allowed, op_name,
            f"{arg} dtype must be one of {', '.join(str(d).replace('torch.', '') for d in allowed)}, "
            f"got {str(t.dtype).replace('torch.', '')}")


def contiguous(op_name: str, arg: str, t: torch.Tensor) -> None:
    require(t.is_contiguous(), op_name, f"{arg} must be contiguous (the docs: 不支持非连续)")


def dims_in(op_name: str, arg: str, t: torch.Tensor, dims) -> None:
    require(t.dim() in dims, op_name, f"{arg} must have {' or '.join(map(str, dims))} dims, got shape {tuple(t.shape)}")


def shape_is(op_name: str, arg: str, t: torch.Tensor, shape) -> None:
    require(tuple(t.shape) == tuple(shape), op_name, f"{arg} must have shape {tuple(shape)}, got {tuple(t.shape)}")


def unsupported(op_name: str, what: str) -> None:
    raise NotEmulated(f"{op_name}: {what} is not emulated")


def f32(t: torch.Tensor) -> torch.Tensor:
    """A tensor's exact values in float32 (the units' accumulation dtype)."""
    return t.to(torch.float32)
