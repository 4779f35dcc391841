"""The layering rules, checked on the source (ast, no imports run):

- only backends/ (and tests, tools) import a backend package `v4hal.backends.<name>`;
- a backend imports no other backend: it reaches its parent through the registry
  (`registry.parent_family`), so PARENT is the one place a lineage is declared;
- the layers, bottom up: the base modules (`v4hal.subcommand`, `v4hal.checkpoint_files`), ops/ and
  the registry, model/, conversion/ (its ONNX exporter builds a model), then bench/, tools/ and the
  `v4hal` dispatcher (`v4hal.cli`); each imports only downward:
  - a base module imports no other v4hal module;
  - model/ imports only `v4hal.ops`, `v4hal.backends.registry`, the base modules and model/;
  - conversion/ imports the same plus model/;
  - ops/, backends/, model/ and conversion/ import none of `v4hal.bench`, `v4hal.tools`, `v4hal.cli`;
- no module imports a private `_name` (module or attribute) from another package;
- a backend's family module defines every op it holds (a re-export would be a forwarder).
"""

import ast
from pathlib import Path

import pytest

from v4hal.backends import registry

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("ops", "backends", "model", "conversion", "tools", "bench", "v4hal")
LOW = ("ops", "backends", "model", "conversion")  # below bench/, tools/ and v4hal.cli
BASE = ("v4hal.subcommand", "v4hal.checkpoint_files")  # below every layer
BELOW = {"model": ("v4hal.ops", "v4hal.backends.registry", *BASE),
         "conversion": ("v4hal.ops", "v4hal.backends.registry", *BASE, "v4hal.model")}
ABOVE_LOW = ("v4hal.bench", "v4hal.tools", "v4hal.cli")
# The one upward import allowed: the ascend backend's npu() answers from the emulator in tools/
# when V4HAL_ASCEND_EMULATE asks for it (an explicit switch; the emulator shares no code with it).
EMULATOR_SWITCH = {
    ("backends/ascend/__init__.py", "v4hal.tools.ascend.emulator.Emulator"),
    ("backends/ascend/__init__.py", "v4hal.tools.ascend.emulator.requested_chip"),
}
KNOWN = EMULATOR_SWITCH


def module_name(path: Path) -> str:
    rel = path.relative_to(ROOT).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts) if parts[0] == "v4hal" else ".".join(["v4hal", *parts])


def package_of(module: str, is_package: bool) -> str:
    return module if is_package else module.rpartition(".")[0]


def imports(path: Path) -> list[str]:
    """Every module (and, for `from m import n`, every `m.n`) the file imports, anywhere in it."""
    name = module_name(path)
    here = package_of(name, path.name == "__init__.py")
    out = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            out += [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                up = here.split(".")[: len(here.split(".")) - node.level + 1]
                base = ".".join(up + ([base] if base else []))
            out += [f"{base}.{a.name}" for a in node.names]
    return [m for m in out if m == "v4hal" or m.startswith("v4hal.")]


def source_files() -> list[Path]:
    return sorted(p for pkg in PACKAGES for p in (ROOT / pkg).rglob("*.py") if ".venv" not in p.parts)


def top(path: Path) -> str:
    return path.relative_to(ROOT).parts[0]


def backend_of(target: str) -> str | None:
    """The backend package `target` lies in (`v4hal.backends.cuda.quant` -> cuda), if any."""
    parts = target.split(".")
    return parts[2] if len(parts) > 2 and parts[1] == "backends" and parts[2] in registry.BACKENDS else None


def within(target: str, modules: tuple[str, ...]) -> bool:
    """Whether `target` is one of `modules` or lies inside one."""
    return any(target == m or target.startswith(m + ".") for m in modules)


def private_crossing(importer_pkg: str, target: str) -> bool:
    """`target` names a private module or attribute (a `_name` part) outside the importer's own
    package (the root package `v4hal` owns only its direct children)."""
    parts = target.split(".")
    first = next((i for i, p in enumerate(parts) if p.startswith("_") and not p.startswith("__")), None)
    if first is None:
        return False
    if importer_pkg == "v4hal":
        return first != 1
    return not target.startswith(importer_pkg + ".")


def violations() -> set[tuple[str, str]]:
    found = set()
    for path in source_files():
        rel = path.relative_to(ROOT).as_posix()
        name = module_name(path)
        pkg = package_of(name, path.name == "__init__.py")
        layer = top(path)
        own_backend = backend_of(name)
        for target in imports(path):
            other = backend_of(target)
            if other is not None and layer not in ("backends", "tools"):
                found.add((rel, target))  # a backend named outside backends/
            if own_backend is not None and other is not None and other != own_backend:
                found.add((rel, target))  # a sibling backend (parents go through the registry)
            if name in BASE or layer in BELOW:
                allowed = () if name in BASE else (*BELOW[layer], f"v4hal.{layer}")
                if not within(target, allowed):
                    found.add((rel, target))
            if layer in LOW and within(target, ABOVE_LOW):
                found.add((rel, target))
            if private_crossing(pkg, target):
                found.add((rel, target))
    return found


def test_the_layering_rules_hold_except_the_known_imports():
    assert violations() - KNOWN == set()


def test_every_known_exception_is_still_needed():
    still = violations() & KNOWN
    assert still == KNOWN, f"no longer violating, remove: {KNOWN - still}"


@pytest.mark.parametrize("backend", registry.BACKENDS)
def test_backend_family_modules_hold_only_their_own_code(backend):
    """An op found in a backend's family module is defined there: inheriting is the registry's job.
    The cpu reference's composites are the contracts' own (written once in ops/)."""
    for op, spec in registry.ops().items():
        module = registry.family_module(backend, spec.family)
        fn = getattr(module, op, None) if module is not None else None
        if fn is not None:
            own = fn.__module__ == module.__name__
            composite = backend == "cpu" and fn.__module__.startswith("v4hal.ops.")
            assert own or composite, f"{module.__name__}.{op} is {fn.__module__}'s"


def test_the_checker_catches_what_it_forbids(tmp_path, monkeypatch):
    """Each rule, broken once in a throwaway tree: the checker must report every break."""
    for pkg in PACKAGES:
        (tmp_path / pkg).mkdir()
    files = {
        "model/bad.py": "from v4hal.backends.cpu import moe\nfrom v4hal.bench import cases\n",
        "conversion/bad.py": "import v4hal.backends.info\nfrom v4hal.ops._check import reads\n",
        "backends/cuda/bad.py": "from v4hal.backends.cpu_fast import quant\nfrom v4hal.backends.cuda import attention\n",
        "ops/bad.py": "from v4hal.tools.ascend import schema\n",
        "model/up.py": "from v4hal.conversion import io\nfrom v4hal.cli import main\n",
        "v4hal/subcommand.py": "from v4hal.ops import linear\n",
        "model/fine.py": "from v4hal import ops\nfrom v4hal.backends import registry\nfrom v4hal.model import _x\n"
                         "from v4hal.subcommand import error\nfrom v4hal.checkpoint_files import confined\n",
        "conversion/fine.py": "from v4hal.model.model import build\nfrom v4hal.checkpoint_files import CheckpointError\n",
    }
    for rel, text in files.items():
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_text(text)
    monkeypatch.setitem(globals(), "ROOT", tmp_path)
    assert violations() == {
        ("model/bad.py", "v4hal.backends.cpu.moe"), ("model/bad.py", "v4hal.bench.cases"),
        ("conversion/bad.py", "v4hal.backends.info"), ("conversion/bad.py", "v4hal.ops._check.reads"),
        ("backends/cuda/bad.py", "v4hal.backends.cpu_fast.quant"), ("ops/bad.py", "v4hal.tools.ascend.schema"),
        ("model/up.py", "v4hal.conversion.io"), ("model/up.py", "v4hal.cli.main"),
        ("v4hal/subcommand.py", "v4hal.ops.linear"),
    }
