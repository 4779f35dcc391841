"""`v4hal info`: the selection the registry makes on this machine, and why."""

from __future__ import annotations

import json

from v4hal.backends import registry


PACKAGES = ("torch", "torch-npu", "mindspore", "triton", "transformers", "numpy")


def package_versions() -> dict[str, str]:
    """Installed versions, read from package metadata (nothing is imported)."""
    from importlib import metadata

    out = {}
    for name in PACKAGES:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = "not installed"
    import torch

    out["cuda (torch build)"] = str(torch.version.cuda)
    out["cann"] = cann_version()
    return out


def cann_version() -> str:
    """CANN's version from the toolkit's version file, if a toolkit is set up."""
    import os
    from pathlib import Path

    home = os.environ.get("ASCEND_TOOLKIT_HOME") or os.environ.get("ASCEND_HOME_PATH")
    if not home:
        return "not found (ASCEND_TOOLKIT_HOME unset)"
    for name in ("version.cfg", "version.info"):
        for path in Path(home).glob(f"**/{name}"):
            for line in path.read_text(errors="replace").splitlines():
                if "version" in line.lower() and "=" in line:
                    return line.split("=", 1)[1].strip()
    return f"unknown ({home})"


def report() -> dict:
    backends = {}
    for b in registry.backends():
        usable, why = registry.probe(b)
        entry = {"usable": usable, "reason": why, "label": registry.label(b) if usable else b,
                 "lineage": list(registry.lineage(b))}
        if usable:
            entry["versions"] = registry.backend_module(b).versions()
        backends[b] = entry
    s = registry.settings()
    return {"settings": {"backend": s.backend, "op_backends": s.op_backends, "fallback": s.fallback,
                         "checks": s.checks},
            "versions": package_versions(), "backends": backends, "ops": registry.explain(),
            "ascend_chip_paths": ascend_chip_paths()}


def ascend_chip_paths() -> dict[str, str]:
    """Per op, how the ascend backend runs it on each chip generation (A2/A3 have no FP8 units);
    read from the family modules' `chip_path`, which needs no NPU."""
    out = {}
    for op, spec in registry.ops().items():
        module = registry.family_module("ascend", spec.family)
        chip_path = getattr(module, "chip_path", None)
        if chip_path is not None and hasattr(module, op):
            out[op] = "; ".join(chip_path(op, chip) for chip in ("A2", "A3", "A5"))
    return out


def inherited(row: dict, backend: str) -> str:
    """" (inherited from cpu_fast)" when `backend` runs an ancestor's code for `row`'s op."""
    source = row["sources"][backend]
    return f" (inherited from {source})" if source not in (None, backend) else ""


def why_not(row: dict, backend: str, why: str, usable: bool) -> str:
    """Why `backend` does not run `row`'s op: what it lacks, or what the selection preferred."""
    if why != "ok":
        return why if usable else f"unusable here: {why}"
    if row["requested"] != "auto":
        return f"could run it; {row['requested']} was asked for (V4HAL_BACKEND / V4HAL_OP_BACKENDS)"
    if backend not in registry.AUTO_ORDER or registry._explicit_only(backend):
        return f"could run it; auto never picks {registry.label(backend)} (ask for it: V4HAL_BACKEND={backend})"
    return f"could run it; auto prefers {row['backend']} (order: {', '.join(registry.AUTO_ORDER)})"


def format_text(rep: dict) -> str:
    s = rep["settings"]
    lines = [f"V4HAL_BACKEND={s['backend']}  V4HAL_OP_BACKENDS={','.join(f'{k}={v}' for k, v in s['op_backends'].items()) or '-'}"
             f"  V4HAL_FALLBACK={s['fallback'] or '-'}  V4HAL_CHECKS={s['checks']}", "",
             "versions: " + ", ".join(f"{k} {v}" for k, v in rep["versions"].items()), "", "backends:"]
    for name, b in rep["backends"].items():
        detail = ", ".join(f"{k} {v}" for k, v in b.get("versions", {}).items()) if b["usable"] else b["reason"]
        lines.append(f"  {b['label']:10s} {'usable' if b['usable'] else 'unusable':9s} {detail}")
        if len(b["lineage"]) > 1:
            lines.append(f"  {'':10s} lineage: {' -> '.join(b['lineage'])}")
    lines += ["", "ops:"]
    for row in rep["ops"]:
        if row["backend"] is None:
            lines.append(f"  {row['op']:18s} ERROR {row['error']}")
            continue
        chosen = row["backend"] + inherited(row, row["backend"])
        chosen += f" (fell back from {row['requested']})" if row["fell_back"] else ""
        lines.append(f"  {row['op']:18s} -> {chosen}")
        for b, why in row["backends"].items():
            if b != row["backend"]:
                because = why_not(row, b, why, rep["backends"][b]["usable"])
                lines.append(f"  {'':18s}    {b}: {because}{inherited(row, b)}")
    lines += ["", "ascend, per chip (A2 = 910B, A3 = 910C, A5 = 950):"]
    lines += [f"  {op:18s} {path}" for op, path in rep["ascend_chip_paths"].items()]
    return "\n".join(lines)


def add_arguments(p) -> None:
    p.add_argument("--json", action="store_true", help="print JSON instead of text")


def main(args) -> int:
    rep = report()
    print(json.dumps(rep, indent=1) if args.json else format_text(rep))
    return 0 if all(r["backend"] is not None for r in rep["ops"]) else 1
