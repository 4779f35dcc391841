"""Input validation shared by every contract: one error type whose message names the op, the
argument, what was expected and what came."""

from __future__ import annotations

import math
from typing import Collection, Iterable

import torch
from torch.compiler import is_compiling

from v4hal.backends import registry


class OpInputError(ValueError):
    """Bad input to a v4hal op. Attributes: op, arg, expected, got."""

    def __init__(self, op: str, arg: str, expected: str, got: object):
        self.op, self.arg, self.expected, self.got = op, arg, expected, got
        super().__init__(f"{op}: argument '{arg}' expected {expected}, got {got}")


def describe(t: object) -> str:
    if isinstance(t, torch.Tensor):
        return f"tensor of shape {tuple(t.shape)} and dtype {str(t.dtype).replace('torch.', '')}"
    return f"{type(t).__name__} {t!r}"


def _dtype_names(dtypes: Iterable[torch.dtype]) -> str:
    return " or ".join(str(d).replace("torch.", "") for d in dtypes)


def tensor(op: str, arg: str, t: object, *, dtypes: Collection[torch.dtype] | None = None,
           ndim: int | Collection[int] | None = None, nonempty: bool = True) -> torch.Tensor:
    """Check that `t` is a tensor with an allowed dtype and rank; return it. (Runs a few hundred
    times per decode step: the passing path only compares.)"""
    if not isinstance(t, torch.Tensor):
        raise OpInputError(op, arg, "a torch.Tensor", describe(t))
    if dtypes is not None and t.dtype not in dtypes:
        raise OpInputError(op, arg, f"dtype {_dtype_names(dtypes)}", describe(t))
    if ndim is not None and (t.dim() != ndim if isinstance(ndim, int) else t.dim() not in ndim):
        ranks = (ndim,) if isinstance(ndim, int) else tuple(ndim)
        raise OpInputError(op, arg, f"a {' or '.join(map(str, ranks))}-d tensor", describe(t))
    if nonempty and not t.numel():
        raise OpInputError(op, arg, "a non-empty tensor", describe(t))
    return t


def shape(op: str, arg: str, t: torch.Tensor, expected: tuple[int, ...], why: str = "") -> None:
    if tuple(t.shape) != tuple(expected):
        note = f" ({why})" if why else ""
        raise OpInputError(op, arg, f"shape {tuple(expected)}{note}", describe(t))


def broadcastable(op: str, arg: str, t: torch.Tensor, target: tuple[int, ...]) -> None:
    """`t` broadcasts against `target` without growing it (pure shape logic: called per decode
    step, where `torch.broadcast_shapes` costs more than the op it guards)."""
    if t.dim() > len(target) or any(a != 1 and a != b for a, b in zip(reversed(t.shape), reversed(target))):
        raise OpInputError(op, arg, f"a shape broadcastable to {tuple(target)}", describe(t))


def equal(op: str, arg: str, got: int, expected: int, what: str) -> None:
    if got != expected:
        raise OpInputError(op, arg, f"{what} = {expected}", got)


def reads(t: torch.Tensor) -> bool:
    """Whether a check may read `t`'s values: never on the meta device (shapes only: the Ascend dry
    run), nor under V4HAL_CHECKS=shapes (each read is a host synchronisation on an NPU or GPU),
    nor under `torch.compile` (a value read in Python ends the graph)."""
    return t.device.type != "meta" and not is_compiling() and registry.settings().checks == "full"


def all_finite(t: torch.Tensor) -> bool:
    # A NaN/Inf element makes the sum non-finite, so one reduction and one read decide the usual
    # case (this runs on every decode step); a finite tensor whose sum overflows gets the exact test.
    return math.isfinite(t.sum().item()) or bool(torch.isfinite(t).all())


def finite(op: str, arg: str, t: torch.Tensor) -> None:
    """Reject NaN/Inf: a quantizer or scale fed one would silently poison a whole block."""
    if t.is_floating_point() and reads(t) and not all_finite(t):
        bad = (~torch.isfinite(t)).sum().item()
        raise OpInputError(op, arg, "finite values", f"{bad} NaN/Inf element(s) in {describe(t)}")


def positive(op: str, arg: str, t: torch.Tensor) -> None:
    finite(op, arg, t)
    if reads(t) and not bool((t > 0).all()):
        raise OpInputError(op, arg, "strictly positive values", f"{int((t <= 0).sum())} value(s) <= 0")


def choice(op: str, arg: str, value: object, allowed: Iterable[object]) -> None:
    allowed = tuple(allowed)
    if value not in allowed:
        raise OpInputError(op, arg, f"one of {allowed}", repr(value))


def traced_int(value: object) -> object:
    """A size read under `torch.jit.trace` (the ONNX exporter) arrives as a 0-d integer tensor;
    give it back as the int it holds so contracts check it like any int. Anything else unchanged."""
    if isinstance(value, torch.Tensor) and value.dim() == 0 and not value.dtype.is_floating_point \
            and value.dtype != torch.bool:
        return int(value)
    return value


def positive_int(op: str, arg: str, value: object) -> int:
    value = traced_int(value)
    if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
        raise OpInputError(op, arg, "a positive int", repr(value))
    return value


def same_device(op: str, **tensors: torch.Tensor) -> None:
    devices = {name: t.device for name, t in tensors.items() if isinstance(t, torch.Tensor)}
    if len(set(devices.values())) > 1:
        got = ", ".join(f"{n} on {d}" for n, d in devices.items())
        raise OpInputError(op, "/".join(devices), "all tensors on one device", got)
