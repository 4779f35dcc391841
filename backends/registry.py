"""Backend selection: which implementation runs each op, and why.

An op is registered by its contract in `v4hal.ops` (`register_op`). A backend is a package
`v4hal.backends.<name>` (or one added with `register_backend`) with a `probe()` telling whether it
can run here, optionally a `PARENT` (the backend whose code it runs for every op it does not
implement itself), and one module per op family holding only the functions it overrides, named
after the ops. `lineage(b)` is b, its parent, the parent's parent...; `lookup(op, b)` names the
backend in that chain whose code runs; `parent_family(__name__)` is how an override reaches the
code it overrides (no backend imports another). Selection is resolved once per op and cached
(`reset()` clears it, for tests and for `configure`).

Environment:
  V4HAL_BACKEND      auto | cpu | cpu_fast | cuda | ascend | mindspore   (default auto)
  V4HAL_OP_BACKENDS  per-op overrides, e.g. "fp8_matmul=cpu,moe_dispatch=ascend"
  V4HAL_FALLBACK     cpu: run an op on the cpu reference when the requested backend cannot
                     (recorded, and shown in every parity and bench report)
  V4HAL_CHECKS       full | shapes (default full). `shapes` skips the argument checks that read
                     tensor values (NaN/Inf, index and position ranges): on an NPU or GPU each is a
                     host synchronisation, which a tested serving loop may not want to pay
"""

from __future__ import annotations

import contextlib
import importlib
import os
from dataclasses import dataclass, field
from typing import Callable

from torch.compiler import is_compiling as _is_compiling

BACKENDS = ("cpu", "cpu_fast", "cuda", "ascend", "mindspore")  # the packages under v4hal.backends
# `auto` takes, per op, the first usable backend in this order that implements the op.
AUTO_ORDER = ("ascend", "cuda", "cpu_fast", "cpu")
FALLBACKS = ("cpu",)
CHECKS = ("full", "shapes")


class BackendError(RuntimeError):
    """A requested backend cannot run a requested op; the message says why."""


@dataclass(frozen=True)
class OpSpec:
    name: str
    family: str  # module name inside each backend package


@dataclass
class Choice:
    op: str
    backend: str
    fn: Callable
    requested: str
    fell_back: bool = False
    reason: str = ""
    source: str = ""  # the backend in `backend`'s lineage whose code `fn` is


@dataclass
class Settings:
    backend: str = "auto"
    op_backends: dict[str, str] = field(default_factory=dict)
    fallback: str | None = None
    checks: str = "full"


_OPS: dict[str, OpSpec] = {}
_PACKAGES: dict[str, str] = {name: f"v4hal.backends.{name}" for name in BACKENDS}
_choices: dict[str, Choice] = {}
_probes: dict[str, tuple[bool, str]] = {}
_settings: Settings | None = None


def register_op(name: str, family: str) -> None:
    """Called by each contract module at import time."""
    _OPS[name] = OpSpec(name, family)


def ops() -> dict[str, OpSpec]:
    import v4hal.ops  # noqa: F401  (importing the contracts registers them)

    return dict(_OPS)


def register_backend(name: str, package: str) -> None:
    """Add a backend living outside v4hal.backends (the package must have `probe()` and may have
    `PARENT`). `auto` never picks it: select it with V4HAL_BACKEND / `configure`."""
    if name == "auto" or not name.isidentifier():
        raise BackendError(f"register_backend: expected an identifier other than 'auto' as name, got {name!r}")
    if name in _PACKAGES and _PACKAGES[name] != package:
        raise BackendError(f"register_backend: {name!r} is already the backend in {_PACKAGES[name]}")
    _PACKAGES[name] = package
    reset()


def unregister_backend(name: str) -> None:
    """Undo `register_backend` (the built-in backends stay)."""
    if name in BACKENDS:
        raise BackendError(f"unregister_backend: {name!r} is built in")
    _PACKAGES.pop(name, None)
    reset()


def backends() -> tuple[str, ...]:
    """Every known backend: the built-in ones, then those added with `register_backend`."""
    return tuple(_PACKAGES)


def _check_backend_name(name: str, what: str) -> str:
    if name not in _PACKAGES and name != "auto":
        raise BackendError(f"{what}: unknown backend {name!r}; valid: auto, {', '.join(_PACKAGES)}")
    return name


def _check_choice(value: str, allowed: tuple[str, ...], what: str) -> str:
    if value not in allowed:
        raise BackendError(f"{what}: expected one of {', '.join(allowed)}, got {value!r}")
    return value


def _check_op_name(name: str, what: str) -> str:
    known = ops()
    if name not in known:
        raise BackendError(f"{what}: unknown op {name!r}; valid: {', '.join(sorted(known))}")
    return name


def settings_from_env(env: dict[str, str] | None = None) -> Settings:
    env = os.environ if env is None else env
    backend = _check_backend_name(env.get("V4HAL_BACKEND", "auto").strip() or "auto", "V4HAL_BACKEND")
    overrides: dict[str, str] = {}
    for item in filter(None, (s.strip() for s in env.get("V4HAL_OP_BACKENDS", "").split(","))):
        if "=" not in item:
            raise BackendError(f"V4HAL_OP_BACKENDS: expected op=backend, got {item!r}")
        op, be = (s.strip() for s in item.split("=", 1))
        overrides[_check_op_name(op, "V4HAL_OP_BACKENDS")] = _check_backend_name(be, "V4HAL_OP_BACKENDS")
    fallback = env.get("V4HAL_FALLBACK", "").strip() or None
    if fallback is not None:
        _check_choice(fallback, FALLBACKS, "V4HAL_FALLBACK")
    checks = _check_choice(env.get("V4HAL_CHECKS", "").strip() or "full", CHECKS, "V4HAL_CHECKS")
    return Settings(backend, overrides, fallback, checks)


def configure(backend: str | None = None, op_backends: dict[str, str] | None = None,
              fallback: str | None = None, checks: str | None = None) -> None:
    """Programmatic twin of the environment variables; clears cached choices."""
    global _settings
    s = settings_from_env()
    if backend is not None:
        s.backend = _check_backend_name(backend, "configure(backend)")
    if op_backends is not None:
        s.op_backends = {_check_op_name(o, "configure(op_backends)"): _check_backend_name(b, "configure")
                         for o, b in op_backends.items()}
    if fallback is not None:
        s.fallback = _check_choice(fallback, FALLBACKS, "configure(fallback)") if fallback else None
    if checks is not None:
        s.checks = _check_choice(checks, CHECKS, "configure(checks)")
    reset()
    _settings = s


def settings() -> Settings:
    global _settings
    if _settings is None:
        _settings = settings_from_env()
    return _settings


def reset() -> None:
    """Forget cached settings, probes and choices (the environment is read again)."""
    global _settings
    _settings = None
    _choices.clear()
    _probes.clear()


@contextlib.contextmanager
def forced(backend: str):
    """Run every op on `backend` inside the block (no fallback), then restore the settings."""
    global _settings
    saved_settings, saved_choices = _settings, dict(_choices)
    _check_backend_name(backend, "forced")
    _settings = Settings(backend=backend)
    _choices.clear()
    try:
        yield
    finally:
        _settings = saved_settings
        _choices.clear()
        _choices.update(saved_choices)


def backend_module(backend: str):
    _check_backend_name(backend, "backend_module")
    return importlib.import_module(_PACKAGES[backend])


def probe(backend: str) -> tuple[bool, str]:
    """(usable, reason) for a backend on this machine; imports its vendor package if needed."""
    _check_backend_name(backend, "probe")
    if backend not in _probes:
        try:
            _probes[backend] = backend_module(backend).probe()
        except Exception as exc:  # a broken vendor install must not crash selection
            _probes[backend] = (False, f"probe failed: {type(exc).__name__}: {exc}")
    return _probes[backend]


def parent(backend: str) -> str | None:
    """The backend whose code `backend` runs for the ops it does not implement (its `PARENT`)."""
    name = getattr(backend_module(backend), "PARENT", None)
    if name is not None:
        _check_backend_name(name, f"{backend}.PARENT")
    return name


def lineage(backend: str) -> tuple[str, ...]:
    """`backend`, its parent, the parent's parent, ... (a cycle is an error)."""
    chain = [backend]
    while (up := parent(chain[-1])) is not None:
        if up in chain:
            raise BackendError(f"{backend}: PARENT chain loops: {' -> '.join(chain + [up])}")
        chain.append(up)
    return tuple(chain)


def family_module(backend: str, family: str):
    """`backend`'s own module for an op family, or None when it has none (it inherits them all)."""
    name = f"{backend_module(backend).__name__}.{family}"
    try:
        return importlib.import_module(name)
    except ModuleNotFoundError as exc:
        if exc.name == name:
            return None
        raise


def lookup(op: str, backend: str) -> str | None:
    """Which backend in `backend`'s lineage implements `op` (`backend` itself when it overrides
    it), or None when none does. Probes nothing."""
    family = _spec(op, "lookup").family
    for b in lineage(backend):
        module = family_module(b, family)
        if module is not None and getattr(module, op, None) is not None:
            return b
    return None


def _spec(op: str, what: str) -> OpSpec:
    spec = ops().get(op)
    if spec is None:
        _check_op_name(op, what)
    return spec


def implementation(op: str, backend: str) -> tuple[Callable | None, str]:
    """(fn, "") if `backend` implements `op`, itself or through its lineage, and can run it here,
    else (None, why not). Every backend from `backend` up to the one whose code runs must probe
    usable."""
    usable, why = probe(backend)
    if not usable:
        return None, why
    source = lookup(op, backend)
    if source is None:
        return None, f"op {op!r} not implemented by the {' -> '.join(lineage(backend))} backend"
    chain = lineage(backend)
    for b in chain[1: chain.index(source) + 1]:
        usable, why = probe(b)
        if not usable:
            return None, f"inherits {op} from {b}, which is unusable: {why}"
    supports = getattr(backend_module(backend), "supports", None)
    if supports is not None:
        ok, why = supports(op)
        if not ok:
            return None, why
    return getattr(family_module(source, _OPS[op].family), op), ""


class FamilyView:
    """An op family as `backend` sees it: an attribute is looked up in `backend`'s own family
    module, then its parent's, and so on, at every access (so a test's monkeypatch is seen). The
    modules are found when the view is made: an override runs inside torch.compile graphs, where
    importing (what finding them takes) would break the graph."""

    def __init__(self, backend: str, family: str):
        self._backend, self._family = backend, family
        chain = (family_module(b, family) for b in lineage(backend))
        self._modules = [m for m in chain if m is not None]

    def __getattr__(self, name: str):
        if name.startswith("__"):
            raise AttributeError(name)
        for module in self._modules:
            value = getattr(module, name, None)
            if value is not None:
                return value
        raise AttributeError(f"no backend in {' -> '.join(lineage(self._backend))} has {self._family}.{name}")


def family_view(backend: str, family: str) -> FamilyView:
    """`family` as `backend` runs it, overrides first, then what it inherits: e.g.
    `family_view("cuda", "mhc").hc_pre` is cpu_fast's (cuda has no mHC of its own)."""
    _check_backend_name(backend, "family_view")
    return FamilyView(backend, family)


def parent_family(module_name: str) -> FamilyView:
    """For a backend's family module (pass `__name__`): the same family as its parent provides it,
    e.g. in cuda's quant module `parent_family(__name__).fp8_matmul` is cpu_fast's. This is how an
    override falls back to the code it overrides without importing another backend."""
    package, _, family = module_name.rpartition(".")
    owners = [b for b, p in _PACKAGES.items() if p == package]
    if not owners:
        raise BackendError(f"parent_family: {module_name!r} is not a family module of a known backend")
    up = parent(owners[0])
    if up is None:
        raise BackendError(f"parent_family: the {owners[0]} backend declares no PARENT")
    return FamilyView(up, family)


def choose(op: str) -> Choice:
    """The implementation `op` dispatches to under the current settings (cached)."""
    if op in _choices:
        return _choices[op]
    s = settings()
    requested = s.op_backends.get(op, s.backend)
    if requested == "auto":
        reasons = []
        for backend in AUTO_ORDER:
            fn, why = implementation(op, backend)
            if fn is not None and _explicit_only(backend):
                fn, why = None, f"{label(backend)} runs only when asked for (V4HAL_BACKEND={backend})"
            if fn is not None:
                choice = Choice(op, backend, fn, "auto", reason="; ".join(reasons), source=lookup(op, backend))
                break
            reasons.append(f"{backend}: {why}")
        else:  # pragma: no cover - cpu implements every op
            raise BackendError(f"{op}: no backend can run it: {'; '.join(reasons)}")
    else:
        fn, why = implementation(op, requested)
        if fn is not None:
            choice = Choice(op, requested, fn, requested, source=lookup(op, requested))
        elif s.fallback is not None:
            fb, fb_why = implementation(op, s.fallback)
            if fb is None:
                raise BackendError(f"{op}: backend {requested!r} unusable ({why}) and fallback "
                                   f"{s.fallback!r} unusable too ({fb_why})")
            choice = Choice(op, s.fallback, fb, requested, fell_back=True, reason=why,
                            source=lookup(op, s.fallback))
        else:
            raise BackendError(f"{op}: backend {requested!r} cannot run it: {why}. "
                               f"Pick another backend, or set V4HAL_FALLBACK=cpu to run it on the "
                               f"cpu reference instead")
    _choices[op] = choice
    return choice


def preferred_backend() -> str:
    """V4HAL_BACKEND if set to a backend, else the first usable backend in AUTO_ORDER."""
    if settings().backend != "auto":
        return settings().backend
    return next(b for b in AUTO_ORDER if probe(b)[0] and not _explicit_only(b))


def _explicit_only(backend: str) -> bool:
    """A backend standing in for hardware (the emulated ascend) that `auto` must never pick."""
    return getattr(backend_module(backend), "explicit_only", lambda: False)()


def label(backend: str) -> str:
    """The backend's name as reports show it, e.g. "ascend (emulated A3)"."""
    return getattr(backend_module(backend), "label", lambda: backend)()


def dispatch(op: str) -> Callable:
    # Runs a few hundred times a decode step: the cached choice without a call to `choose`.
    if _is_compiling():
        _choose_all_untraced(op)
    choice = _choices.get(op)
    return (choice if choice is not None else choose(op)).fn


def _choose_all_untraced(op: str) -> bool:
    """Under torch.compile: choose every op not chosen yet, for real rather than traced (choosing
    imports backend modules, which dynamo cannot follow). All ops at once, because a trace keeps
    seeing `_choices` as it was when the trace first read it; `op`'s own error is raised here."""
    for other in ops():
        if other not in _choices and other != op:
            try:
                choose(other)
            except BackendError:
                pass  # raised where that op is used, if it is
    choose(op)
    return True


# What `torch.compiler.assume_constant_result` sets (dynamo then calls the function at trace time
# and keeps its result), set directly: the decorator would import torch._dynamo (~0.8 s) with v4hal.
_choose_all_untraced._dynamo_marked_constant = True


def chosen() -> dict[str, Choice]:
    """Ops resolved so far and their choices (what a run reports as "ops ran on")."""
    return dict(_choices)


def fallbacks() -> dict[str, Choice]:
    """Ops resolved so far that fell back, for reports."""
    return {op: c for op, c in _choices.items() if c.fell_back}


def explain() -> list[dict]:
    """Per op: the chosen backend (or the error), why every other backend was or was not usable,
    and for each backend whose code it would run (`sources`: itself, or the ancestor it inherits from)."""
    rows = []
    for op in sorted(ops()):
        row = {"op": op, "family": _OPS[op].family}
        try:
            c = choose(op)
            row.update(backend=c.backend, requested=c.requested, fell_back=c.fell_back, source=c.source)
        except BackendError as exc:
            row.update(backend=None, error=str(exc))
        row["backends"], row["sources"] = {}, {}
        for backend in backends():
            fn, why = implementation(op, backend)
            row["backends"][backend] = "ok" if fn is not None else why
            row["sources"][backend] = lookup(op, backend)
        rows.append(row)
    return rows
