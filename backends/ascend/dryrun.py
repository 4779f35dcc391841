"""Meta dry run of the ascend backend against the pinned torch-npu wheel, on a machine without an NPU.

How it works:
1. Every schema of the wheel's `npu` namespace is defined on this process's torch with
   `torch.library` (`vendor()`), and the wheel's own Meta implementations
   (`op_plugin/meta/_meta_registrations.py`) are executed against them. The only stubs are what
   that file imports from torch_npu's runtime: the SoC version (`get_soc_version`, set from the
   chip under test: A2 = Ascend910B3, A3 = Ascend910_9391, A5 = Ascend950), the CANN version (the
   pinned one), torch_npu's dtype constants and its error-message helpers. Its overrides of
   `aten` Meta kernels are not installed (they would change this process's torch).
2. `install(chip)` points `v4hal.backends.ascend` at a shim: `npu().npu_<name>(...)` calls
   `torch.ops.npu.<name>`, which runs the vendor's Meta kernel (shape and dtype inference plus
   its argument checks); `probe()` says usable, `device()` is `meta`, `chip()` is the chip.
   Every vendor call is recorded with its argument dtypes and shapes.
3. `run_case` builds a parity case's inputs as Meta tensors at the real V4-Flash / V4-Pro / V3.2
   shapes, runs the op under the ascend backend and under the cpu reference, and fails when a
   vendor Meta kernel rejects a call, our code breaks, an FP8 tensor reaches a vendor op on A2/A3
   (no FP8 units), a tensor that is not on the device reaches a vendor op, or the outputs differ
   from the reference's in names, shapes or dtypes.
4. `run_model` does the same for a whole model forward built on the meta device.
"""

from __future__ import annotations

import builtins
import contextlib
import re
import time
import types
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any

import torch

from v4hal.backends import ascend, registry
from v4hal.backends.ascend import schema, wheel

# c10_npu::SocVersion values (torch_npu/csrc/core/npu/NpuVariables.h in the wheel).
SOC_VERSION = {"A2": 223, "A3": 250, "A5": 260}
SOC_NAME = {"A2": "Ascend910B3", "A3": "Ascend910_9391", "A5": "Ascend950"}
FP8_DTYPES = (torch.float8_e4m3fn, torch.float8_e5m2, torch.float8_e4m3fnuz, torch.float8_e5m2fnuz)


class VendorRejected(RuntimeError):
    """A vendor Meta kernel (or the schema binding) refused a call our backend made."""

    def __init__(self, op: str, call: str, cause: BaseException):
        self.op, self.call, self.cause = op, call, cause
        super().__init__(f"{op} rejected {call}: {type(cause).__name__}: {_oneline(cause)[:600]}")


def _oneline(exc: BaseException) -> str:
    return re.sub(r"\s+", " ", str(exc)).strip()


# ------------------------------------------------------------------------------- vendor namespace

@dataclass
class Vendor:
    """The `npu` namespace as the pinned wheel defines it, with its Meta kernels, in this process."""

    chip: str = "A2"
    defined: set[str] = field(default_factory=set)
    define_failed: dict[str, str] = field(default_factory=dict)
    meta: set[str] = field(default_factory=set)
    meta_failed: dict[str, str] = field(default_factory=dict)
    skipped_aten: list[str] = field(default_factory=list)
    libraries: list = field(default_factory=list)  # keeps the registrations alive


class _Skipped:
    """Stands in for `Library("aten", "IMPL", "Meta")`: the vendor's aten overrides are not installed."""

    def __init__(self, ns: str):
        self.ns = ns


def _version_key(v: str) -> tuple:
    return tuple(int(p) if p.isdigit() else -1 for p in re.findall(r"\d+|[a-z]+", v.lower()))


def _runtime_stubs(v: Vendor) -> dict[str, types.ModuleType]:
    """The torch_npu modules the Meta file imports, reduced to what it uses."""
    root = types.ModuleType("torch_npu")
    for name, code in schema.npu_dtype_codes().items():
        if name.startswith("torch_npu."):
            setattr(root, name.split(".", 1)[1], code)
    npu_pkg = types.ModuleType("torch_npu.npu")
    utils = types.ModuleType("torch_npu.npu.utils")
    utils.get_cann_version = lambda module="CANN": wheel.CANN_VERSION
    utils._is_gte_cann_version = lambda version, module="CANN": \
        _version_key(wheel.CANN_VERSION) >= _version_key(version)
    backends = types.ModuleType("torch_npu.npu._backends")
    backends.get_soc_version = lambda: SOC_VERSION[v.chip]
    npu_pkg.utils, npu_pkg._backends = utils, backends
    root.npu = npu_pkg
    err = types.ModuleType("torch_npu.utils._error_code")

    class ErrCode:  # the real one is an Enum whose members only feed error-message text
        def __init_subclass__(cls):
            pass

    for member in ("SUCCESS", "PARAM", "TYPE", "VALUE", "PTR", "INTERNAL", "MEMORY", "NOT_SUPPORT",
                   "NOT_FOUND", "UNAVAIL", "SYSCALL", "TIMEOUT", "PERMISSION", "ACL", "HCCL", "GE", "EXCEPT"):
        setattr(ErrCode, member, member)
    err.ErrCode = ErrCode
    err.ops_error = err.pta_error = lambda code: f" [ERR {code}]"
    root_utils = types.ModuleType("torch_npu.utils")
    root_utils._error_code = err
    root.utils = root_utils
    return {"torch_npu": root, "torch_npu.npu": npu_pkg, "torch_npu.npu.utils": utils,
            "torch_npu.npu._backends": backends, "torch_npu.utils": root_utils,
            "torch_npu.utils._error_code": err}


def _vendor_library(v: Vendor):
    real_library = torch.library.Library

    def library(ns, kind, dispatch_key=""):
        if ns != "npu":
            v.skipped_aten.append(f"{ns}:{kind}:{dispatch_key}")
            return _Skipped(ns)
        lib = real_library(ns, kind, dispatch_key)
        v.libraries.append(lib)
        return lib

    def impl(lib, name, dispatch_key=""):
        def register(fn):
            if isinstance(lib, _Skipped):
                v.skipped_aten.append(f"{lib.ns}::{name}")
                return fn
            try:
                lib.impl(name, fn, dispatch_key) if dispatch_key else lib.impl(name, fn)
                v.meta.add(name.split(".")[0])
            except Exception as exc:  # an op the yaml does not define: recorded, not fatal
                v.meta_failed[name] = f"{type(exc).__name__}: {str(exc)[:200]}"
            return fn

        return register

    return types.SimpleNamespace(Library=library, impl=impl)


@lru_cache(maxsize=None)
def vendor() -> Vendor:
    """Define the wheel's `npu` schemas and load its Meta kernels into this process (once)."""
    v = Vendor()
    lib = torch.library.Library("npu", "DEF")
    v.libraries.append(lib)
    for text in schema.schema_texts():
        try:
            lib.define(text)
            v.defined.add(text.split("(")[0].split(".")[0])
        except Exception as exc:
            v.define_failed[text.split("(")[0]] = f"{type(exc).__name__}: {str(exc)[:200]}"
    stubs = _runtime_stubs(v)
    library = _vendor_library(v)
    real_import = builtins.__import__

    def vendor_import(name, globals=None, locals=None, fromlist=(), level=0):
        if name == "torch.library" and fromlist:
            return library
        if name.split(".")[0] == "torch_npu":
            return stubs[name] if fromlist else stubs["torch_npu"]
        return real_import(name, globals, locals, fromlist, level)

    namespace = {"__name__": "torch_npu.op_plugin.meta._meta_registrations",
                 "__builtins__": {**vars(builtins), "__import__": vendor_import}}
    exec(compile(wheel.meta_source(), wheel.META_MEMBER, "exec"), namespace)
    return v


# ------------------------------------------------------------------------------------- the shim

def describe(value: Any) -> str:
    if isinstance(value, torch.Tensor):
        where = "" if value.device.type == "meta" else f"@{value.device.type}"
        return f"{str(value.dtype).replace('torch.', '')}{list(value.shape)}{where}"
    if isinstance(value, (list, tuple)):
        inner = ", ".join(describe(v) for v in value[:4]) + (", ..." if len(value) > 4 else "")
        return f"[{inner}]"
    if isinstance(value, torch.dtype):
        return str(value)
    return repr(value)


@dataclass
class Call:
    op: str
    chip: str
    args: list[str]
    kwargs: dict[str, str]
    outputs: str = ""
    problems: list[str] = field(default_factory=list)

    def signature(self) -> str:
        parts = self.args + [f"{k}={v}" for k, v in self.kwargs.items()]
        return f"{self.op}({', '.join(parts)})"


def _tensors(values) -> list[torch.Tensor]:
    out = []
    for v in values:
        if isinstance(v, torch.Tensor):
            out.append(v)
        elif isinstance(v, (list, tuple)):
            out += _tensors(v)
    return out


class Shim:
    """Stands in for the torch_npu module: `npu_<name>` attributes run the vendor Meta kernels."""

    def __init__(self, session: "Session"):
        self._session = session

    def __getattr__(self, name: str):
        code = schema.npu_dtype_codes().get(f"torch_npu.{name}")
        if code is not None:
            return code
        if not name.startswith("npu_") or name not in vendor().defined:
            raise AttributeError(f"torch_npu {wheel.TORCH_NPU_VERSION} has no op {name!r} (Meta dry run)")
        packet = getattr(torch.ops.npu, name)
        return lambda *args, **kwargs: self._session.call(name, packet, args, kwargs)


class Session:
    """One dry run on one chip: what `ascend._dry_run` points at while it is installed."""

    def __init__(self, chip: str):
        if chip not in ascend.CHIPS:
            raise ValueError(f"chip: expected one of {', '.join(ascend.CHIPS)}, got {chip!r}")
        self.chip = chip
        self.shim = Shim(self)
        self.calls: list[Call] = []

    def call(self, op: str, packet, args: tuple, kwargs: dict):
        record = Call(op, self.chip, [describe(a) for a in args], {k: describe(v) for k, v in kwargs.items()})
        self.calls.append(record)
        tensors = _tensors(list(args) + list(kwargs.values()))
        if self.chip in ("A2", "A3"):
            record.problems += [f"{describe(t)} reaches {op} on {self.chip}, which has no FP8 units"
                                for t in tensors if t.dtype in FP8_DTYPES]
        record.problems += [f"{describe(t)} reaches {op} but is not on the device ({ascend.device()})"
                            for t in tensors if t.device.type != "meta"]
        chips = schema.doc_chips(op)
        if chips is not None and self.chip not in chips:
            record.problems.append(f"the {op} docs list {', '.join(sorted(chips))}, not {self.chip}")
        try:
            out = packet(*args, **kwargs)
        except Exception as exc:
            raise VendorRejected(op, record.signature(), exc) from exc
        record.outputs = describe(out)
        return out


@contextlib.contextmanager
def install(chip: str):
    """Run the ascend backend as a Meta dry run for `chip` inside the block."""
    vendor().chip = chip
    session = Session(chip)
    previous = ascend._dry_run
    ascend._dry_run = session
    registry.reset()
    try:
        yield session
    finally:
        ascend._dry_run = previous
        registry.reset()


# --------------------------------------------------------------------------------- running cases

# Problems a chip path may show without failing: the docs' product lists lag the kernels.
WARNING_PREFIX = "the "


@dataclass
class Result:
    case: str
    op: str
    chip: str
    status: str                 # pass | fail | fallback
    note: str = ""
    calls: list[Call] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def vendor_ops(self) -> list[str]:
        return sorted({c.op for c in self.calls})


def _on_meta(value):
    if isinstance(value, torch.Tensor):
        return value if value.device.type == "meta" else value.to("meta")
    if isinstance(value, (list, tuple)):
        return type(value)(_on_meta(v) for v in value)
    if isinstance(value, dict):
        return {k: _on_meta(v) for k, v in value.items()}
    return value


def meta_inputs(case) -> dict:
    """The case's inputs as Meta tensors at its real shapes (built by its own `make` with every
    factory call on the meta device, so nothing of the real size is allocated)."""
    with registry.forced("cpu"), torch.device("meta"):
        return _on_meta(case.make(torch.Generator().manual_seed(0)))


def signature(outputs: dict[str, torch.Tensor]) -> dict[str, tuple]:
    return {k: (tuple(v.shape), v.dtype) for k, v in outputs.items()}


def _outputs(case, out) -> dict[str, torch.Tensor]:
    from v4hal.bench.parity import named_outputs

    return case.compare(out) if case.compare is not None else named_outputs(out)


def expected(case) -> dict[str, tuple]:
    """Names, shapes and dtypes of the reference's outputs, computed on Meta tensors, or (when the
    reference needs real values) on real inputs built by the case. The batched cpu_fast path
    stands in for the cpu reference where it has its own version: parity holds it to the
    reference, and the reference's per-token loops cost seconds even on Meta tensors."""
    try:
        with registry.forced("cpu_fast"):
            return signature(_outputs(case, case.run(**meta_inputs(case))))
    except (NotImplementedError, RuntimeError):
        with registry.forced("cpu_fast"):
            return signature(_outputs(case, case.run(**case.make(torch.Generator().manual_seed(0)))))


def run_case(case, chip: str, want: dict[str, tuple] | None = None) -> Result:
    """Dry-run one parity case on `chip` (see the module docstring for what fails); `want` is
    `expected(case)`, computed here when not given."""
    start = time.perf_counter()
    with install(chip) as session:
        fn, why = registry.implementation(case.op, "ascend")
        if fn is None:
            return Result(case.id, case.op, chip, "fallback", why)
        want = expected(case) if want is None else want
        inputs = meta_inputs(case)
        session.calls.clear()
        try:
            with registry.forced("ascend"):
                got = signature(_outputs(case, case.run(**inputs)))
        except VendorRejected as exc:
            return Result(case.id, case.op, chip, "fail", f"vendor Meta kernel: {exc}", list(session.calls),
                          seconds=time.perf_counter() - start)
        except Exception as exc:
            return Result(case.id, case.op, chip, "fail", f"our code on meta: {type(exc).__name__}: "
                          f"{_oneline(exc)[:400]}", list(session.calls), seconds=time.perf_counter() - start)
        problems = _compare(want, got)
        warnings = []
        for c in session.calls:
            for p in c.problems:
                (warnings if p.startswith(WARNING_PREFIX) else problems).append(p)
        return Result(case.id, case.op, chip, "fail" if problems else "pass", "; ".join(dict.fromkeys(problems)),
                      list(session.calls), list(dict.fromkeys(warnings)), time.perf_counter() - start)


def _compare(want: dict[str, tuple], got: dict[str, tuple]) -> list[str]:
    problems = []
    for name, (shape, dtype) in want.items():
        if name not in got:
            problems.append(f"output {name} missing (reference: {dtype} {list(shape)})")
        elif got[name] != (shape, dtype):
            problems.append(f"output {name}: {got[name][1]} {list(got[name][0])}, the reference gives "
                            f"{dtype} {list(shape)}")
    problems += [f"extra output {name}" for name in got if name not in want]
    return problems


def run_cases(chips=ascend.CHIPS, select: str | None = None, quick: bool = False) -> list[Result]:
    """Every parity case (or those whose id contains `select`) on every chip in `chips`."""
    from v4hal.bench.cases import parity_cases

    results = []
    for case in parity_cases(quick=quick, select=select):
        with install(chips[0]):
            implemented = registry.implementation(case.op, "ascend")[0] is not None
        want = expected(case) if implemented else None
        results += [run_case(case, chip, want) for chip in chips]
    return results
