"""Input validation shared by every contract: one error type whose message names the op, the
argument, what was expected and what came."""

from __future__ import annotations

import math
import weakref
from typing import Callable, Collection, Iterable

import torch
from torch.compiler import is_compiling

from v4hal.backends import registry


class OpInputError(ValueError):
    """Bad input to a v4hal op. Attributes: op, arg, expected, got."""

    def __init__(self, op: str, arg: str, expected: str, got: object):
        self.op, self.arg, self.expected, self.got = op, arg, expected, got
        super().__init__(f"{op}: argument '{arg}' expected {expected}, got {got}")

    def __reduce__(self):  # pickled by its fields, so it crosses a process boundary (conversion workers)
        return type(self), (self.op, self.arg, self.expected, self.got)


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


EXPONENT_BYTES = (torch.uint8, torch.float8_e8m0fnu)  # ue8m0 scales as biased exponents; 0xFF is NaN


def _bounds(t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(min, max) of `t` as 0-d tensors on its device, NaN where it holds one (for exponent bytes: 0
    and the top byte, NaN if that is 0xFF). One pass, no overflow, no host read."""
    if t.dtype in EXPONENT_BYTES:
        top = t.view(torch.uint8).amax().double()
        return top.new_zeros(()), torch.where(top == 0xFF, math.nan, top)
    values = t.detach()
    if values.is_floating_point() and values.element_size() == 1:  # float8 kinds have no min/max kernel
        values = values.float()
    return torch.aminmax(values)


def _read(stats: list[torch.Tensor]) -> list[float]:
    """The values of 0-d statistics tensors in one host read: stacked as they are when they share a
    dtype and device (the common case; a decode step runs a few hundred checks, so each extra
    kernel launch per check shows), else each as float64 on the first one's device."""
    first = stats[0]
    if any(s.dtype != first.dtype or s.device != first.device for s in stats):
        stats = [s.double().to(first.device) for s in stats]
    return torch.stack(stats).tolist()


class _PassedScales:
    """Scale tensors that passed `Values.scales`, while unchanged: a weight's scales are read once,
    not at every call (on a decode step they are most of the value checks). A verdict stands while
    the tensor lives and its version counter and storage stay; inference tensors (no version
    counter) are always read."""

    def __init__(self):
        self._passed: dict[int, tuple[weakref.ref, tuple[int, int]]] = {}

    @staticmethod
    def _stamp(t: torch.Tensor) -> tuple[int, int] | None:
        try:
            return t._version, t.data_ptr()
        except RuntimeError:
            return None

    def holds(self, t: torch.Tensor) -> bool:
        entry = self._passed.get(id(t))
        return entry is not None and entry[0]() is t and entry[1] == self._stamp(t)

    def add(self, t: torch.Tensor) -> None:
        stamp = self._stamp(t)
        if stamp is not None:
            key = id(t)
            self._passed[key] = (weakref.ref(t, lambda _, key=key: self._passed.pop(key, None)), stamp)


_PASSED_SCALES = _PassedScales()


class Values:
    """The value-reading checks of one public call, decided together by a single host read (each
    read is a synchronisation on an NPU or GPU): every check adds a few statistics of a tensor
    (mostly its [min, max]), and `decide()` reads them all at once and raises for the first check
    that fails. Tensors `reads` excludes, empty tensors and None are skipped; an error message
    (the failing path only) may read more.

        _check.Values(op).finite("x", x).scales(scale=scale).decide()
    """

    def __init__(self, op: str):
        self.op = op
        self._pending: list[tuple[str, tuple[torch.Tensor, ...], Callable[[list[float]], bool], str,
                                  Callable[[list[float]], str]]] = []
        self._scales_to_remember: list[torch.Tensor] = []

    def require(self, arg: str, stats: tuple[torch.Tensor, ...], ok: Callable[[list[float]], bool],
                expected: str, got: Callable[[list[float]], str]) -> "Values":
        """`ok(the stats' values)` must hold (each stat a 0-d tensor); `got(...)`
        describes what came when it does not."""
        self._pending.append((arg, stats, ok, expected, got))
        return self

    def _bounds(self, arg, t, ok, expected, got) -> "Values":
        if t is not None and t.numel() and reads(t):
            self.require(arg, _bounds(t), ok, expected, got)
        return self

    def finite(self, arg: str, t: torch.Tensor | None) -> "Values":
        """Reject NaN/Inf: a quantizer or scale fed one would silently poison a whole block."""
        if t is None or not t.is_floating_point():
            return self
        return self._bounds(arg, t, lambda v: math.isfinite(v[0]) and math.isfinite(v[1]), "finite values",
                            lambda v: f"{int((~torch.isfinite(t)).sum())} NaN/Inf element(s) in {describe(t)}")

    def scales(self, **named: torch.Tensor | None) -> "Values":
        """Reject quantization scales holding NaN, Inf or negative values (an e8m0/uint8 exponent
        byte 0xFF is e8m0's NaN): every one would silently poison its whole block. Zero is allowed
        (an all-zero block or channel from another quantizer)."""
        for arg, t in named.items():
            if t is None or _PASSED_SCALES.holds(t):
                continue
            pending = len(self._pending)
            self._bounds(arg, t, lambda v: v[0] >= 0 and math.isfinite(v[1]), "finite, non-negative scales",
                         lambda v, t=t: _scale_faults(t))
            if len(self._pending) > pending:
                self._scales_to_remember.append(t)
        return self

    def in_range(self, arg: str, t: torch.Tensor | None, low: int, high: int, what: str) -> "Values":
        """Integer values in [low, high) (`what` says what they index, in the message's parentheses)."""
        return self._bounds(arg, t, lambda v: v[0] >= low and v[1] < high, f"values in [{low}, {high - 1}] ({what})",
                            lambda v: f"values in [{int(v[0])}, {int(v[1])}]")

    def decide(self) -> None:
        if not self._pending:
            return
        values = _read([s for p in self._pending for s in p[1]])
        at = 0
        for arg, stats, ok, expected, got in self._pending:
            v, at = values[at:at + len(stats)], at + len(stats)
            if not ok(v):
                raise OpInputError(self.op, arg, expected, got(v))
        for t in self._scales_to_remember:
            _PASSED_SCALES.add(t)


def finite(op: str, arg: str, t: torch.Tensor) -> None:
    """`Values(op).finite(arg, t)`, decided now."""
    Values(op).finite(arg, t).decide()


def scales(op: str, **named: torch.Tensor | None) -> None:
    """`Values(op).scales(**named)`, decided now (one host read for all of them)."""
    Values(op).scales(**named).decide()


def _scale_faults(t: torch.Tensor) -> str:
    if t.dtype in EXPONENT_BYTES:
        return f"{int((t.view(torch.uint8) == 0xFF).sum())} exponent byte(s) 0xFF (NaN) in {describe(t)}"
    v = t.detach().double()
    counts = {"NaN": int(v.isnan().sum()), "Inf": int(v.isinf().sum()), "negative": int((v < 0).sum())}
    return ", ".join(f"{n} {what}" for what, n in counts.items() if n) + f" value(s) in {describe(t)}"


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


def positive_float(op: str, arg: str, value: object) -> float:
    """A finite number above zero (NaN, Inf, 0, negatives and non-numbers refused)."""
    if not (isinstance(value, (int, float)) and math.isfinite(value) and value > 0):
        raise OpInputError(op, arg, "a positive finite float", repr(value))
    return value


def same_device(op: str, **tensors: torch.Tensor) -> None:
    devices = {name: t.device for name, t in tensors.items() if isinstance(t, torch.Tensor)}
    if len(set(devices.values())) > 1:
        got = ", ".join(f"{n} on {d}" for n, d in devices.items())
        raise OpInputError(op, "/".join(devices), "all tensors on one device", got)
