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

import ast
import contextlib
import re
import time
import types
from collections import Counter
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any

import torch

from v4hal.backends import ascend, registry
from v4hal.tools.ascend import schema, wheel
from v4hal.tools.ascend.numerics import cell as numerics_cell, load as load_numerics

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

    class ErrCode:
        """The real one is an Enum whose members only feed error-message text."""

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
    stubs = {**_runtime_stubs(v), "torch.library": _vendor_library(v)}
    tree, namespace = _bind_stub_imports(ast.parse(wheel.meta_source(), wheel.META_MEMBER), stubs)
    namespace["__name__"] = "torch_npu.op_plugin.meta._meta_registrations"
    exec(compile(tree, wheel.META_MEMBER, "exec"), namespace)
    return v


def _bind_stub_imports(tree: ast.Module, stubs: dict[str, Any]) -> tuple[ast.Module, dict[str, Any]]:
    """The Meta file without its top-level imports of stubbed modules (torch_npu.*, torch.library),
    and a namespace binding the names they would have bound to the stubs, so the file runs
    unchanged otherwise and nothing outside it sees a stub."""
    namespace: dict[str, Any] = {}
    kept = []
    for node in tree.body:
        if isinstance(node, ast.Import) and all(a.name.split(".")[0] in stubs for a in node.names):
            for a in node.names:  # `import torch_npu.x` binds `torch_npu`, `... as y` binds the module
                namespace[a.asname or a.name.split(".")[0]] = stubs[a.name if a.asname else a.name.split(".")[0]]
        elif isinstance(node, ast.ImportFrom) and node.module in stubs:
            for a in node.names:
                namespace[a.asname or a.name] = getattr(stubs[node.module], a.name)
        else:
            kept.append(node)
    tree.body = kept
    return tree, namespace


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


def _bind(op: str, args: tuple, kwargs: dict) -> dict[str, Any]:
    """Parameter name -> value for a call, by the first overload it fits."""
    for sch in schema.schemas().get(op, ()):
        names = [p.name for p in sch.positional]
        if len(args) <= len(names) and all(sch.param(k) is not None for k in kwargs):
            return {**dict(zip(names, args)), **kwargs}
    return {}


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
        # On real CPU tensors (see run_case) vendor ops see Meta copies of their inputs and hand
        # back zero-filled tensors of the shapes and dtypes their Meta kernels infer.
        self.real = False

    def versions(self) -> dict[str, str]:
        """What the ascend backend's `versions()` reports while this run is installed."""
        return {"torch": torch.__version__, "torch_npu": f"{wheel.TORCH_NPU_VERSION} (Meta dry run)",
                "cann": f"{wheel.CANN_VERSION} (pinned)", "chip": self.chip}

    def call(self, op: str, packet, args: tuple, kwargs: dict):
        record = Call(op, self.chip, [describe(a) for a in args], {k: describe(v) for k, v in kwargs.items()})
        self.calls.append(record)
        tensors = _tensors(list(args) + list(kwargs.values()))
        if self.chip in ("A2", "A3"):
            record.problems += [f"{describe(t)} reaches {op} on {self.chip}, which has no FP8 units"
                                for t in tensors if t.dtype in FP8_DTYPES]
        if not self.real:
            record.problems += [f"{describe(t)} reaches {op} but is not on the device ({ascend.device()})"
                                for t in tensors if t.device.type != "meta"]
        chips = schema.doc_chips(op)
        documented = chips is None or self.chip in chips
        if not documented:
            record.problems.append(f"the {op} docs list {', '.join(sorted(chips))}, not {self.chip}")
        for param, value in _bind(op, args, kwargs).items():
            allowed = schema.tensor_dtypes(op, param)
            for t in _tensors([value]):
                if allowed is not None and t.dtype not in allowed:
                    names = ", ".join(sorted(str(d).replace("torch.", "") for d in allowed))
                    # Where the docs do not describe this chip their dtype lists are only a hint.
                    prefix = "" if documented else f"the {op} docs (for {', '.join(sorted(chips))}) say: "
                    record.problems.append(f"{prefix}{param} of {op} takes {names}, got {describe(t)}")
        if self.real:
            args, kwargs = _on_meta(args), _on_meta(kwargs)
        try:
            out = packet(*args, **kwargs)
        except Exception as exc:
            raise VendorRejected(op, record.signature(), exc) from exc
        record.outputs = describe(out)
        return _zeros_on_cpu(out) if self.real else out


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
    status: str                 # pass | fail | unchecked | fallback
    note: str = ""
    calls: list[Call] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def vendor_ops(self) -> list[str]:
        return sorted({c.op for c in self.calls})


def _zeros_on_cpu(value):
    if isinstance(value, torch.Tensor):
        return torch.zeros(value.shape, dtype=value.dtype)
    if isinstance(value, (list, tuple)):
        return _rebuild(value, [_zeros_on_cpu(v) for v in value])
    return value


def _rebuild(container, items: list):
    """A list or tuple (named tuples included) of the same type holding `items`."""
    return type(container)(*items) if hasattr(container, "_fields") else type(container)(items)


def _on_meta(value):
    if isinstance(value, torch.Tensor):
        return value if value.device.type == "meta" else value.to("meta")
    if isinstance(value, (list, tuple)):
        return _rebuild(value, [_on_meta(v) for v in value])
    if isinstance(value, dict):
        return {k: _on_meta(v) for k, v in value.items()}
    return value


def meta_inputs(case) -> dict:
    """The case's inputs as Meta tensors at its real shapes: built by its own `make` with every
    factory call on the meta device, so nothing of the real size is allocated, or, when `make`
    needs values (e.g. a table size read from a tensor), built for real and moved to meta."""
    with registry.forced("cpu"):
        try:
            with torch.device("meta"):
                return _on_meta(case.make(torch.Generator().manual_seed(0)))
        except (NotImplementedError, RuntimeError):
            return _on_meta(case.make(torch.Generator().manual_seed(0)))


def signature(outputs: dict[str, torch.Tensor]) -> dict[str, tuple]:
    return {k: (tuple(v.shape), v.dtype) for k, v in outputs.items()}


def _outputs(case, out) -> dict[str, torch.Tensor]:
    from v4hal.bench.parity import named_outputs

    return case.compare(out) if case.compare is not None else named_outputs(out)


def expected(case) -> dict[str, tuple]:
    """Names, shapes and dtypes of the reference's outputs, computed on Meta tensors, or (when the
    reference needs real values) on real inputs built by the case. The batched cpu_fast path
    is tried first where it has its own version (parity holds it to the reference, and the
    reference's per-token loops cost seconds even on Meta tensors), then the cpu reference."""
    inputs = meta_inputs(case)
    for backend in ("cpu_fast", "cpu"):
        try:
            with registry.forced(backend):
                return signature(_outputs(case, case.run(**inputs)))
        except (NotImplementedError, RuntimeError):
            continue
    if _nbytes(inputs) > REAL_INPUT_BUDGET:
        raise Unchecked(f"the reference reads tensor values and the inputs ({_nbytes(inputs) / 2**20:.0f} MiB) "
                        f"exceed the real-tensor budget")
    with registry.forced("cpu_fast"):
        return signature(_outputs(case, case.run(**case.make(torch.Generator().manual_seed(0)))))


class Unchecked(Exception):
    """A case the dry run cannot check within its budget (the reason is the message)."""


# What torch says when code reads the values of a Meta tensor.
_NEEDS_VALUES = re.compile(r"cannot be called on meta tensors|Cannot copy out of meta tensor|data-dependent|"
                           r"data-independent")
# Above this input size a case that reads values is left unchecked rather than run on real tensors.
REAL_INPUT_BUDGET = 32 * 2**20


def _verdict(exc: BaseException, real: bool, calls: list, where_read: str = "") -> tuple[str, str] | None:
    """How an exception ends one dry-run attempt: ("unchecked" | "fail", note), or None for a
    value read on Meta tensors, which is worth another attempt on real tensors."""
    if real and calls:
        return "unchecked", _zeros_note(exc)
    if real or not _NEEDS_VALUES.search(str(exc)):
        where = "real CPU tensors" if real else "meta"
        return "fail", f"our code on {where}: {type(exc).__name__}: {_oneline(exc)[:400]}{where_read}"
    return None


def _zeros_note(exc: BaseException) -> str:
    """Why a real-tensor run stopped after vendor ops answered zeros: the code after them checks
    or uses values, which zeros do not satisfy; every vendor call up to there was accepted."""
    return (f"vendor ops answer zeros on real tensors, and the code after them reads values "
            f"({type(exc).__name__} at {_first_value_read(exc)}: {_oneline(exc)[:160]}); the vendor calls "
            f"up to there passed")


def _nbytes(value) -> int:
    return sum(t.numel() * t.element_size() for t in _tensors(list(value.values())))


def run_case(case, chip: str, want=None) -> Result:
    """Dry-run one parity case on `chip` (see the module docstring for what fails); `want` is
    `expected(case)` (or the Unchecked it raised), computed here when not given. Without a
    reference signature the vendor calls are still checked; the case is then "unchecked".

    When the code reads tensor values (contracts that validate ids or offsets by value, routing
    with data-dependent shapes), Meta tensors cannot go further: the case runs again on real CPU
    tensors, with each vendor op still checked by its Meta kernel (on Meta copies of its inputs)
    and answering zeros of the inferred shapes; the result carries a warning, since on an NPU
    those reads are host synchronisations. Cases whose inputs exceed REAL_INPUT_BUDGET are then
    reported "unchecked" instead."""
    start = time.perf_counter()
    with install(chip) as session:
        fn, why = registry.implementation(case.op, "ascend")
        if fn is None:
            return Result(case.id, case.op, chip, "fallback", why)
        unreferenced = None  # why the outputs cannot be compared, when they cannot
        try:
            want = expected(case) if want is None else want
        except Unchecked as exc:
            unreferenced = str(exc)
        if isinstance(want, Unchecked):
            unreferenced = str(want)
        warnings = []

        def result(status: str, note: str) -> Result:
            return Result(case.id, case.op, chip, status, note, list(session.calls), warnings,
                          time.perf_counter() - start)

        inputs = meta_inputs(case)
        for real in (False, True):
            session.calls.clear()
            session.real = real
            try:
                with registry.forced("ascend"):
                    got = signature(_outputs(case, case.run(**inputs)))
                break
            except VendorRejected as exc:
                return result("fail", f"vendor Meta kernel: {exc}")
            except Exception as exc:
                verdict = _verdict(exc, real, session.calls)
                if verdict is not None:
                    return result(*verdict)
                warnings.append(f"reads tensor values ({_oneline(exc)[:60]}...): a host sync on an NPU")
                if _nbytes(inputs) > REAL_INPUT_BUDGET:
                    return result("unchecked", f"reads tensor values and its inputs "
                                  f"({_nbytes(inputs) / 2**20:.0f} MiB) exceed the real-tensor budget")
                inputs = case.make(torch.Generator().manual_seed(0))
        problems = [] if unreferenced else _compare(want, got)
        for c in session.calls:
            for p in c.problems:
                (warnings if p.startswith(WARNING_PREFIX) else problems).append(p)
        if unreferenced and not problems:
            return result("unchecked", f"outputs not compared: {unreferenced}; the vendor calls passed")
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


# ------------------------------------------------------------------------- cases for the gaps

def _gap_cases() -> list:
    """Dry-run cases for contracts the parity set has no case for yet, at the real V4-Flash,
    V4-Pro and V3.2 shapes in bfloat16 (the dtype the model runs in, which is what reaches the
    vendor kernels; parity cases are mostly float32). 16 tokens of activations against the q_a
    projection `[q_lora, hidden]` and a routed expert `[moe_inter, hidden]`."""
    from v4hal import ops
    from v4hal.bench.cases import SHAPES, Case, randn

    bf16 = torch.bfloat16
    cases = []
    for model, dims in SHAPES.items():
        hidden, n, inter = dims["hidden"], dims["q_lora"], dims["moe_inter"]

        def x(g, hidden=hidden):
            return randn(g, 16, hidden, dtype=bf16)

        def fp8_weight(g, n=n, hidden=hidden):
            return ops.quantize_fp8(randn(g, n, hidden, scale=0.05), (128, 128))

        def fp4_weight(g, inter=inter, hidden=hidden):
            return ops.quantize_fp4(randn(g, inter, hidden, scale=0.05))

        def int8_weight(g, n=n, hidden=hidden):
            return ops.quantize_int8(randn(g, n, hidden, scale=0.05))

        def act_int8(g, hidden=hidden):
            return ops.quantize_int8(x(g, hidden))

        made = {
            ("rms_norm", "bf16"): lambda g, hidden=hidden: dict(x=x(g), weight=randn(g, hidden, dtype=bf16)),
            ("rms_norm", "f32-weight"): lambda g, hidden=hidden: dict(x=x(g), weight=randn(g, hidden)),
            ("quantize_fp8", "act-ue8m0"): lambda g: dict(x=x(g), block=(1, 128), scale_fmt="ue8m0"),
            ("quantize_fp8", "act-fp32"): lambda g: dict(x=x(g), block=(1, 128), scale_fmt="fp32"),
            ("dequantize_fp8", "q_a"): lambda g: dict(zip(("q", "scale"), fp8_weight(g)), block=(128, 128)),
            ("quantize_int8", "act"): lambda g: dict(x=x(g)),
            ("int8_matmul", "q_a"): lambda g: dict(zip(("a", "a_scale"), act_int8(g)),
                                                   **dict(zip(("b", "b_scale"), int8_weight(g)))),
            ("quantize_fp4", "expert"): lambda g, inter=inter, hidden=hidden: dict(w=randn(g, inter, hidden, dtype=bf16)),
            ("dequantize_fp4", "expert"): lambda g: dict(zip(("packed", "scale"), fp4_weight(g))),
            ("fp4_matmul", "expert"): lambda g: dict(a=x(g), **dict(zip(("b", "b_scale"), fp4_weight(g)))),
            ("linear", "q_a-dense"): lambda g, n=n, hidden=hidden: dict(x=x(g), weight=randn(g, n, hidden, dtype=bf16)),
            ("linear", "q_a-fp8"): lambda g: dict(x=x(g), **dict(zip(("weight", "scale"), fp8_weight(g)))),
            ("linear", "q_a-int8"): lambda g: dict(x=x(g), **dict(zip(("weight", "scale"), int8_weight(g)))),
            ("linear", "expert-fp4"): lambda g: dict(x=x(g), **dict(zip(("weight", "scale"), fp4_weight(g)))),
        }
        cases += [Case(op, f"{model}/{name}/dryrun", getattr(ops, op), make) for (op, name), make in made.items()]
    return cases


def run_cases(chips=ascend.CHIPS, select: str | None = None, quick: bool = False) -> list[Result]:
    """Every parity case of an op contract (or those whose id contains `select`) on every chip in
    `chips`, plus `_gap_cases()` for contracts with no parity case (not in `quick` mode: they
    are real-sized). Whole-model cases (`model_logits`, built on CPU weights) are left to
    `run_model`."""
    from v4hal.bench.cases import parity_cases

    results = []
    contracts = registry.ops()
    cases = parity_cases(quick=quick, select=select)
    covered = {c.op for c in parity_cases()}
    if not quick:
        cases += [c for c in _gap_cases() if c.op not in covered and (select is None or select in c.id)]
    for case in cases:
        if case.op not in contracts:
            continue
        with install(chips[0]):
            implemented = registry.implementation(case.op, "ascend")[0] is not None
        try:
            want = expected(case) if implemented else None
        except Unchecked as exc:
            want = exc
        results += [run_case(case, chip, want) for chip in chips]
    return results


# ------------------------------------------------------------------------------------ whole model

# The real models (built on the meta device) and the small configs of the model parity cases
# (bench.cases_model: tiny V4, tiny V3.2, and a 4-layer V4 with every feature at realistic ratios).
MODEL_PRESETS = ("v4-flash", "v4-pro", "v3.2")
SMALL_MODELS = ("tiny-v4", "tiny-v32", "bench-v4")


@contextlib.contextmanager
def _ascend_with_fallback():
    """The settings a user runs a model with on an NPU: ascend for every op it implements, the
    cpu reference (on the NPU's tensors) for the rest, each fallback recorded."""
    registry.configure(backend="ascend", op_backends={}, fallback="cpu")
    try:
        yield
    finally:
        registry.reset()


def _model_args(name: str):
    from v4hal.model import config

    if name in SMALL_MODELS:
        from v4hal.bench.cases_model import CONFIGS

        return CONFIGS[name]
    return config.preset(name)


def _first_value_read(exc: BaseException) -> str:
    """Where in our code a value was read (the innermost frame outside torch)."""
    import traceback

    frames = [f for f in traceback.extract_tb(exc.__traceback__) if "site-packages" not in f.filename]
    if not frames:
        return "?"
    f = frames[-1]
    return f"{'/'.join(Path(f.filename).parts[-2:])}:{f.lineno} ({f.name})"


def run_model(name: str, chip: str, batch: int = 1, tokens: int = 16) -> Result:
    """A full prefill forward in bfloat16 under the ascend backend for `chip` (ops it lacks fall
    back to the cpu reference, listed as a warning): passes when no vendor kernel rejects a call,
    no chip rule is broken and the logits are float32 `[batch, tokens, vocab]`.

    The model is built on the meta device. Where the model reads tensor values (each read is a
    host synchronisation on an NPU), the small configs (SMALL_MODELS) run again on real CPU
    tensors with random weights, every vendor op still answered by its Meta kernel; the real
    presets cannot, and are reported "unchecked" with the place of the first read."""
    from v4hal.model import model

    start = time.perf_counter()
    case = f"model/{name}"
    args = _model_args(name)
    warnings: list[str] = []
    with install(chip) as session:
        def result(status: str, note: str) -> Result:
            return Result(case, "model", chip, status, note, list(session.calls), list(dict.fromkeys(warnings)),
                          time.perf_counter() - start)

        for real in (False, True):
            session.calls.clear()
            session.real = real
            try:
                device = "cpu" if real else "meta"
                net = model.build(args, dtype=torch.bfloat16, device=device)
                if real:
                    net.init_random()
                ids = torch.zeros(batch, tokens, dtype=torch.long, device=device)
                with _ascend_with_fallback(), torch.no_grad():
                    logits = net(ids)
                    fell_back = sorted(registry.fallbacks())
                break
            except VendorRejected as exc:
                return result("fail", f"vendor Meta kernel: {exc}")
            except Exception as exc:
                verdict = _verdict(exc, real, session.calls, f" at {_first_value_read(exc)}")
                if verdict is not None:
                    return result(*verdict)
                warnings.append(f"reads tensor values at {_first_value_read(exc)}: a host sync on an NPU")
                if name not in SMALL_MODELS:
                    return result("unchecked", f"the forward reads tensor values (first at "
                                               f"{_first_value_read(exc)}), which Meta tensors do not have")
        problems = _compare({"logits": ((batch, tokens, args.vocab_size), torch.float32)},
                            {"logits": (tuple(logits.shape), logits.dtype)})
        if fell_back:
            warnings.append(f"ops on the cpu reference (no ascend implementation): {', '.join(fell_back)}")
        for c in session.calls:
            for p in c.problems:
                (warnings if p.startswith(WARNING_PREFIX) else problems).append(p)
        return result("fail" if problems else "pass", "; ".join(dict.fromkeys(problems)))


def run_speed_case(case, chip: str) -> Result:
    """What `v4hal bench --backend ascend` does with a speed case, dry: build it for the device
    (here `meta`) and run v4hal's function once under the ascend backend. It fails where the
    case builds its operands off the device or a vendor kernel rejects a call (peers are plain
    torch and are not run)."""
    start = time.perf_counter()
    with install(chip) as session:
        def result(status: str, note: str, warnings=()) -> Result:
            return Result(f"bench/{case.id}", f"bench:{case.op}", chip, status, note, list(session.calls),
                          list(warnings), time.perf_counter() - start)

        try:
            with registry.forced("ascend"):
                fn, _ = case.make(ascend.device())
                fn()
        except VendorRejected as exc:
            return result("fail", f"vendor Meta kernel: {exc}")
        except registry.BackendError as exc:
            return result("fallback", str(exc))
        except Exception as exc:
            if _NEEDS_VALUES.search(str(exc)):
                return result("unchecked", f"reads tensor values at {_first_value_read(exc)}")
            return result("fail", f"our code on meta: {type(exc).__name__}: {_oneline(exc)[:300]}")
        problems = [p for c in session.calls for p in c.problems if not p.startswith(WARNING_PREFIX)]
        warnings = [p for c in session.calls for p in c.problems if p.startswith(WARNING_PREFIX)]
        return result("fail" if problems else "pass", "; ".join(dict.fromkeys(problems)), dict.fromkeys(warnings))


def run_speed_cases(chips=ascend.CHIPS, select: str | None = None) -> list[Result]:
    from v4hal.bench.cases import speed_cases

    return [run_speed_case(c, chip) for c in speed_cases(select=select) for chip in chips]


# ------------------------------------------------------------------------------- report and CLI

def _cell(results: list[Result]) -> str:
    """One op x chip cell of the report: the vendor ops called, the shapes that took the torch
    path, fallbacks and failures."""
    if not results:
        return "no parity case"
    if all(r.status == "fallback" for r in results):
        return f"cpu fallback ({results[0].note})"
    vendor_ops = sorted({op for r in results for op in r.vendor_ops})
    torch_path = [r.case.split("/", 1)[1] for r in results if r.status in ("pass", "fail") and not r.vendor_ops]
    parts = [", ".join(f"`{op}`" for op in vendor_ops)] if vendor_ops else []
    if torch_path:
        parts.append(("torch ops on the NPU" if not vendor_ops else "torch path for")
                     + (f" ({', '.join(torch_path)})" if vendor_ops else ""))
    for status, label in (("unchecked", "unchecked"), ("fail", "**FAILS**")):
        names = [r.case.split("/", 1)[1] for r in results if r.status == status]
        if names:
            parts.append(f"{label} ({', '.join(names)})")
    return "; ".join(parts)


def _family_notes() -> list[str]:
    """The first paragraph of each ascend backend module's docstring: its authors' own account of
    which kernel runs on which chip and why."""
    import importlib

    lines = []
    for path in schema.backend_files():
        doc = (importlib.import_module(f"v4hal.backends.ascend.{path.stem}").__doc__ or "").strip()
        if doc:
            lines.append(f"- `backends/ascend/{path.name}`: " + " ".join(doc.split("\n\n")[0].split()))
    return lines


def format_markdown(results: list[Result], findings: list, sites: list, command: str,
                    numerics: dict[str, list[dict]] | None = None) -> str:
    """The op map; `numerics` (chip -> emulated parity rows, tools/ascend/numerics.py) adds the
    "numerics (emulated)" column."""
    ops = registry.ops()
    chips = sorted({r.chip for r in results}) or list(ascend.CHIPS)
    vm = wheel.version_matrix()
    lines = ["# Ascend op map (generated)", "",
             f"Generated by `{command}`: a Meta dry run of the `ascend` backend against the pinned "
             "torch-npu wheel's schemas and Meta kernels on a machine without an NPU (see "
             "docs/ascend.md). Do not edit by hand.", "",
             "## Version matrix", "",
             "| torch | torch-npu | TorchNPU release (branch) | CANN | wheel (sha256) |", "|---|---|---|---|---|",
             f"| {vm['torch']} | {vm['torch-npu']} | {vm['TorchNPU release']} (`{vm['branch']}`) | "
             f"{vm['CANN']} | `{vm['wheel']}` (`{vm['sha256'][:16]}...`) |", "",
             "Chips: A2 = Atlas A2 / 910B (dry run as SoC Ascend910B3), A3 = Atlas A3 / 910C "
             "(Ascend910_9391), A5 = Ascend 950 (Ascend950). A2 and A3 have no FP8 units: a float8 "
             "tensor reaching a vendor op there fails the dry run.", "",
             "## Contract x chip", "",
             "Per contract and chip: the vendor ops its ascend implementation calls over all parity "
             "cases (real V4-Flash / V4-Pro / V3.2 shapes and small ones), the cases that take the "
             "plain torch path on the NPU instead, or the cpu fallback when the ascend backend has no "
             "implementation (it then runs only with `V4HAL_FALLBACK=cpu`)."]
    if numerics is not None:
        from v4hal.bench.cases import parity_cases

        total = Counter(case.op for case in parity_cases())
        lines += ["", "Numerics (emulated): the same backend on the vendor-op emulator (`v4hal parity "
                  "--backend ascend --emulate <chip>`, docs/ascend.md), its parity cases against the "
                  "float64 reference: passed / run per chip, the failures with their notes; emulated, "
                  "not measured on a device."]
    lines += ["", "| contract | family | " + " | ".join(chips) + " |" + (" numerics (emulated) |" if numerics else ""),
              "|---|---|" + "---|" * (len(chips) + (1 if numerics else 0))]
    for op in sorted(ops, key=lambda o: (ops[o].family, o)):
        cells = [_cell([r for r in results if r.op == op and r.chip == chip]) for chip in chips]
        if numerics is not None:
            cells.append(numerics_cell(numerics, op, chips, total))
        lines.append(f"| `{op}` | {ops[op].family} | " + " | ".join(cells) + " |")
    benches = [r for r in results if r.op.startswith("bench:")]
    if benches:
        lines += ["", "## Speed cases (what `v4hal bench --backend ascend` runs)", "",
                  "| case | chip | status | vendor ops | note |", "|---|---|---|---|---|"]
        lines += [f"| {r.case} | {r.chip} | {r.status} | {', '.join(r.vendor_ops) or '-'} | {r.note or '-'} |"
                  for r in benches]
    models = [r for r in results if r.op == "model"]
    if models:
        lines += ["", "## Full model forward", "", "| model | chip | status | vendor ops | note |", "|---|---|---|---|---|"]
        lines += [f"| {r.case} | {r.chip} | {r.status} | {', '.join(r.vendor_ops) or '-'} | "
                  f"{'; '.join(filter(None, [r.note] + r.warnings)) or '-'} |" for r in models]
    used = sorted({c.op for r in results for c in r.calls})
    if used:
        lines += ["", "## Vendor ops called", "",
                  "| vendor op | chips its docs list | first call recorded (dtypes and shapes) |", "|---|---|---|"]
        for op in used:
            first = next(c for r in results for c in r.calls if c.op == op)
            listed = schema.doc_chips(op)
            lines.append(f"| `{op}` | {', '.join(sorted(listed)) if listed else 'not stated'} | "
                         f"`{first.signature()}` -> `{first.outputs}` ({first.chip}) |")
    failures = [r for r in results if r.status == "fail"]
    warnings: dict[str, list[str]] = {}
    for r in results:
        for w in r.warnings:
            warnings.setdefault(re.sub(r"\[[\d, ]*\]", "[...]", w), []).append(f"{r.case} [{r.chip}]")
    lines += ["", "## Results", "",
              f"- dry run: {sum(r.status == 'pass' for r in results)} passed, {len(failures)} failed, "
              f"{sum(r.status == 'unchecked' for r in results)} unchecked, "
              f"{sum(r.status == 'fallback' for r in results)} on the cpu fallback (case x chip)",
              f"- static schema check: {len(sites)} call sites in {len(schema.backend_files())} modules, "
              f"{len(findings)} findings"]
    lines += [f"- FAIL `{r.case}` [{r.chip}]: {r.note}" for r in failures]
    lines += [f"- unchecked `{r.case}` [{r.chip}]: {r.note}" for r in results if r.status == "unchecked"]
    lines += [f"- finding: {f}" for f in findings]
    lines += [f"- warning: {w} ({len(where)} case x chip: {', '.join(where[:6])}{', ...' if len(where) > 6 else ''})"
              for w, where in sorted(warnings.items())]
    notes = _family_notes()
    if notes:
        lines += ["", "## Why each path (from the backend modules)", ""] + notes
    return "\n".join(lines) + "\n"


def format_terminal(results: list[Result]) -> str:
    rows = [("case", "chip", "status", "vendor ops", "note")]
    rows += [(r.case, r.chip, r.status, ",".join(r.vendor_ops) or "-", "; ".join(filter(None, [r.note] + r.warnings)))
             for r in results]
    widths = [max(len(r[i]) for r in rows) for i in range(4)]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r[:4], widths)) + "  " + r[4] for r in rows)


def add_arguments(p) -> None:
    p.add_argument("--backend", choices=["ascend"], default="ascend", help="backend to dry-run (ascend)")
    p.add_argument("--chip", action="append", choices=ascend.CHIPS,
                   help="chip path to dry-run (repeatable; default A2, A3 and A5)")
    p.add_argument("--op", help="only parity cases whose id contains this text, e.g. hc_pre")
    p.add_argument("--quick", action="store_true", help="small parity cases only")
    p.add_argument("--model", nargs="*", choices=MODEL_PRESETS + SMALL_MODELS, metavar="MODEL",
                   help="also dry-run full model forwards (default: "
                        f"{', '.join(MODEL_PRESETS + SMALL_MODELS)})")
    p.add_argument("--parallel", type=int, metavar="N",
                   help="also dry-run rank 0 of V4-Flash and V4-Pro at tp=ep=N (fake process group; "
                        "tools/ascend/dryrun_parallel.py)")
    p.add_argument("--bench", action="store_true",
                   help="also dry-run every speed case (what `v4hal bench --backend ascend` runs)")
    p.add_argument("--report", type=Path, help="write the op x chip Markdown report here, e.g. docs/ascend-ops.md")
    p.add_argument("--numerics", type=Path, nargs="+", metavar="PARITY_JSON",
                   help="with --report: emulated parity results (`v4hal parity --backend ascend --emulate A2 "
                        "--out DIR` writes DIR/parity.json), one per chip, for the numerics (emulated) column")


def main(args) -> int:
    import sys

    from v4hal.bench.cases import parity_cases, speed_cases
    from v4hal.subcommand import error

    if args.op is not None and not (parity_cases(quick=args.quick, select=args.op)
                                    or (not args.quick and any(args.op in c.id for c in _gap_cases()))
                                    or (args.bench and speed_cases(select=args.op))):
        return error("dryrun", f"--op {args.op!r}: no {'quick ' if args.quick else ''}parity case"
                               f"{' or speed case' if args.bench else ''} id contains it")
    chips = tuple(args.chip or ascend.CHIPS)
    sites, findings = schema.check()
    print(f"schema check: {len(sites)} npu() call sites in backends/ascend, {len(findings)} findings")
    for f in findings:
        print(f"  {f}")
    results = run_cases(chips, select=args.op, quick=args.quick)
    if args.model is not None:
        results += [run_model(m, chip) for m in (args.model or MODEL_PRESETS + SMALL_MODELS) for chip in chips]
    if args.parallel:
        from v4hal.model.parallel import Layout
        from v4hal.tools.ascend.dryrun_parallel import run_parallel_model

        layout = Layout(tp=args.parallel, ep=args.parallel)
        results += [run_parallel_model(m, chip, layout) for m in ("v4-flash", "v4-pro") for chip in chips]
    if args.bench:
        results += run_speed_cases(chips, select=args.op)
    print(format_terminal(results))
    failed = sum(r.status == "fail" for r in results)
    print(f"dryrun: {sum(r.status == 'pass' for r in results)} passed, {failed} failed, "
          f"{sum(r.status == 'unchecked' for r in results)} unchecked, "
          f"{sum(r.status == 'fallback' for r in results)} need the cpu fallback (torch-npu "
          f"{wheel.TORCH_NPU_VERSION}, CANN {wheel.CANN_VERSION})")
    if args.report is not None:
        args.report.parent.mkdir(parents=True, exist_ok=True)
        numerics = None if args.numerics is None else load_numerics(args.numerics)
        args.report.write_text(format_markdown(results, findings, sites, "v4hal " + " ".join(sys.argv[1:]), numerics))
        print(f"wrote {args.report}")
    return 1 if failed or findings else 0
