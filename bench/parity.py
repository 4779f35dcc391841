"""`v4hal parity`: run every case on every usable backend and judge it against the cpu reference
computed in float64 from the same inputs. Writes a terminal table, JSON and Markdown; exits 1 if any
case fails on any backend.

Under torchrun (`--tp N [--ep N]`, model/launch.py) only the cases with a per-rank form run (the
whole-model logits, `Case.distributed`): every rank runs its layout's slices of the model, rank 0
computes the reference in one process (the whole model, float64) and judges the whole logits the
ranks gathered; only rank 0 prints and writes. A per-op case has no per-rank form and is refused."""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from tqdm import tqdm

from v4hal.backends import registry
from v4hal.bench.cases import Case, Distributed, Tolerance, parity_cases
from v4hal.bench.metrics import judge, metrics

FLOAT_UPCAST = (torch.float32, torch.bfloat16, torch.float16)


def default_reference_inputs(inputs: dict) -> dict:
    def up(v):
        if isinstance(v, torch.Tensor) and v.dtype in FLOAT_UPCAST:
            return v.to(torch.float64)
        return v

    out = {k: up(v) for k, v in inputs.items()}
    if "out_dtype" in out:
        out["out_dtype"] = torch.float64
    return out


def named_outputs(out: Any) -> dict[str, torch.Tensor]:
    if isinstance(out, torch.Tensor):
        return {"out": out}
    if isinstance(out, dict):
        return {k: v for k, v in out.items() if isinstance(v, torch.Tensor)}
    if isinstance(out, (tuple, list)):
        return {f"out{i}": v for i, v in enumerate(out) if isinstance(v, torch.Tensor)}
    raise TypeError(f"cannot compare an output of type {type(out).__name__}")


def _to_device(inputs: dict, device: torch.device) -> dict:
    return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in inputs.items()}


def _outputs(case: Case, out: Any) -> dict[str, torch.Tensor]:
    named = case.compare(out) if case.compare is not None else named_outputs(out)
    return {k: v.detach().cpu() for k, v in named.items()}


@dataclass(frozen=True)
class Built:
    """A case's inputs and its float64 cpu reference outputs: built once, they can judge any number
    of backends (or of emulated chips, one after another). `reference` is None on the ranks of a
    distributed run that do not judge."""

    inputs: dict
    reference: dict[str, torch.Tensor] | None


def build(case: Case, seed: int = 0, judging: bool = True) -> Built:
    inputs = case.make(torch.Generator().manual_seed(seed))
    if not judging:
        return Built(inputs, None)
    ref_inputs = (case.reference_inputs or default_reference_inputs)(inputs)
    with registry.forced("cpu"):
        return Built(inputs, _outputs(case, case.run(**ref_inputs)))


def run_case(case: Case, backends: list[str], seed: int = 0, built: Built | None = None,
             distributed: Distributed | None = None) -> list[dict]:
    """One row per backend. `built` (from `build(case, seed)`) reuses inputs and reference built
    before; backends must leave the inputs unchanged, since every backend here gets the same ones.
    Under `distributed` every rank runs the backends (in step) and rank 0, which alone computes the
    reference, judges them; the other ranks' rows are empty."""
    judging = distributed is None or dist.get_rank() == 0
    built = built or build(case, seed, judging)
    rows = [_judge_on(case, built, backend, distributed) for backend in backends]
    return [row for row in rows if row is not None]


def _judge_on(case: Case, built: Built, backend: str, distributed: Distributed | None) -> dict | None:
    row: dict[str, Any] = {"case": case.id, "op": case.op, "backend": backend}
    ok, why = registry.probe(backend)
    if not ok:
        return {**row, "status": "unavailable", "note": why}
    row["backend"] = registry.label(backend)  # e.g. "ascend (emulated A3)"
    per_rank = {} if distributed is None else {"distributed": distributed}
    try:
        with registry.forced(backend):
            device = registry.backend_module(backend).device()
            start = time.perf_counter()
            out = _outputs(case, case.run(**_to_device(built.inputs, device), **per_rank))
            row["seconds"] = time.perf_counter() - start
    except registry.BackendError as exc:
        return {**row, "status": "unavailable", "note": str(exc)}
    except Exception as exc:  # a crash on one backend is a failure to report, not to raise
        if distributed is not None:  # the other ranks' collectives are out of step: stop them all
            raise
        return {**row, "status": "fail", "note": f"{type(exc).__name__}: {exc}"}
    if built.reference is None:
        return None
    passed, notes, row["outputs"] = True, [], {}
    for name, r in built.reference.items():
        tol = case.tolerance.get(name, Tolerance()) if isinstance(case.tolerance, dict) else case.tolerance
        if name not in out:
            passed, _ = False, notes.append(f"{name}: missing")
            continue
        ok, note = judge(out[name], r, tol)
        comparable = out[name].shape == r.shape  # a wrong shape fails in judge, with no metrics
        row["outputs"][name] = {**(metrics(out[name], r) if comparable else {}), "passed": ok, "tolerance": tol.kind}
        passed &= ok
        if note:
            notes.append(f"{name}: {note}")
    if case.check is not None and passed:
        ok, note = case.check(built.reference, out, built.inputs)
        passed &= ok
        if note:
            notes.append(note)
    return {**row, "status": "pass" if passed else "fail", "note": "; ".join(notes)}


def run(backends: list[str] | None = None, quick: bool = False, select: str | None = None,
        seed: int = 0, progress: bool = True, distributed: Distributed | None = None) -> dict:
    backends = backends or list(registry.BACKENDS)
    cases = parity_cases(quick=quick, select=select)
    rows: list[dict] = []
    for case in tqdm(cases, desc="parity", unit="case", disable=not progress):
        rows.extend(run_case(case, backends, seed, distributed=distributed))
    return {
        "backends": {b: dict(zip(("usable", "reason"), registry.probe(b))) for b in backends},
        "fallbacks": {op: c.reason for op, c in registry.fallbacks().items()},
        "rows": rows,
        "failed": sum(r["status"] == "fail" for r in rows),
        "passed": sum(r["status"] == "pass" for r in rows),
    }


def _worst(row: dict) -> dict:
    outs = row.get("outputs", {})
    if not outs:
        return {}
    return {
        "cosine": min(o.get("cosine", 1.0) for o in outs.values()),
        "max_abs": max(o.get("max_abs", 0.0) for o in outs.values()),
        "max_rel": max(o.get("max_rel", 0.0) for o in outs.values()),
        "rmse": max(o.get("rmse", 0.0) for o in outs.values()),
        "within_1e-3": min(o.get("within_1e-3", 1.0) for o in outs.values()),
        "within_1e-2": min(o.get("within_1e-2", 1.0) for o in outs.values()),
        "fp8_diff": max(o.get("fp8_diff", 0.0) for o in outs.values()),
    }


COLUMNS = ("case", "backend", "status", "cosine", "max_abs", "max_rel", "rmse", "within_1e-3",
           "within_1e-2", "fp8_diff")


def table_rows(report: dict) -> list[list[str]]:
    out = []
    for row in report["rows"]:
        w = _worst(row)
        cells = [row["case"], row["backend"], row["status"]]
        cells += [f"{w[c]:.6f}" if c in ("cosine", "within_1e-3", "within_1e-2") else f"{w[c]:.2e}"
                  for c in COLUMNS[3:]] if w else [""] * (len(COLUMNS) - 3)
        out.append(cells)
    return out


def format_terminal(report: dict) -> str:
    rows = [list(COLUMNS)] + [r for r in table_rows(report)]
    widths = [max(len(r[i]) for r in rows) for i in range(len(COLUMNS))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)) for r in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    for row in report["rows"]:
        if row["status"] == "fail":
            lines.append(f"FAIL {row['case']} [{row['backend']}]: {row['note']}")
    lines.append(_summary(report))
    return "\n".join(lines)


def _summary(report: dict) -> str:
    unavailable = sorted({f"{b} ({v['reason']})" for b, v in report["backends"].items() if not v["usable"]})
    s = f"parity: {report['passed']} passed, {report['failed']} failed"
    if unavailable:
        s += "; unavailable here: " + "; ".join(unavailable)
    if report["fallbacks"]:
        s += "; fell back to cpu: " + ", ".join(sorted(report["fallbacks"]))
    return s


def format_markdown(report: dict, machine: str) -> str:
    lines = [f"# Parity report\n\nMachine: {machine}\n", _summary(report) + "\n",
             "| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    lines += ["| " + " | ".join(r) + " |" for r in table_rows(report)]
    notes = [r for r in report["rows"] if r["status"] != "pass" and r.get("note")]
    if notes:
        lines += ["", "## Notes", ""] + [f"- `{r['case']}` [{r['backend']}] {r['status']}: {r['note']}" for r in notes]
    return "\n".join(lines) + "\n"


def write(report: dict, out_dir: Path, machine: str) -> list[Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = [out_dir / "parity.json", out_dir / "parity.md"]
    paths[0].write_text(json.dumps({**report, "machine": machine}, indent=1, default=str))
    paths[1].write_text(format_markdown(report, machine))
    return paths


def add_arguments(p) -> None:
    from v4hal.model import launch

    p.add_argument("--backend", action="append", choices=registry.BACKENDS,
                   help="backend to check (repeatable; default: all, unusable ones are reported)")
    p.add_argument("--quick", action="store_true", help="small cases only (CI)")
    p.add_argument("--select", help="only cases whose id contains this text, e.g. fp8_matmul")
    p.add_argument("--emulate", choices=("A2", "A3", "A5"),
                   help="run the ascend backend on the CPU emulator of its npu_* ops for this chip "
                        "(sets V4HAL_ASCEND_EMULATE; reported as 'ascend (emulated <chip>)')")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=Path("out"), help="folder for parity.json / parity.md")
    launch.add_arguments(p)


def main(args) -> int:
    from v4hal.model import launch
    from v4hal.subcommand import error

    if args.emulate:
        import os

        os.environ["V4HAL_ASCEND_EMULATE"] = args.emulate
        registry.reset()
    cases = parity_cases(quick=args.quick, select=args.select)
    if not cases:
        return error("parity", f"--select {args.select!r}: no {'quick ' if args.quick else ''}parity case id contains it")
    layout = launch.read_layout(args)
    whole_only = [c.id for c in cases if not c.distributed]
    if layout.devices > 1 and whole_only:
        return error("parity", f"layout {layout} (--tp {args.tp} --ep {args.ep}): under torchrun only the whole-model "
                               f"cases run (--select model); {len(whole_only)} selected case(s) have no per-rank "
                               f"form ({', '.join(whole_only[:3])}{', ...' if len(whole_only) > 3 else ''}): run them "
                               f"in one process")
    for backend in args.backend or []:
        usable, why = registry.probe(backend)
        if not usable:
            return error("parity", f"--backend {backend}: requested but unavailable here: {why}")
    device = registry.backend_module(registry.preferred_backend()).device()
    return launch.run("parity", args, layout, device, lambda placement: _check(args, layout, placement),
                      before_join=lambda: [c.prepare() for c in cases if c.prepare])


def _check(args, layout, placement) -> int:
    """Run, print and (rank 0) write the report; `placement` is None in one process."""
    from v4hal.bench.machine import describe
    from v4hal.subcommand import BAD_INPUT, CHECK_FAILED, OK, error

    machine, backends, distributed = describe(), args.backend, None
    if placement is not None:
        backends = _on_device(args.backend, placement)
        distributed = Distributed(layout, args.dist_timeout)
        machine += f"; torchrun, layout {layout}: {layout.devices} ranks, {placement}"
    rank0 = placement is None or dist.get_rank() == 0
    report = run(backends, quick=args.quick, select=args.select, seed=args.seed, progress=rank0,
                 distributed=distributed)
    if not rank0:
        return OK
    print(format_terminal(report))
    for path in write(report, args.out, machine):
        print(f"wrote {path}")
    if not report["passed"] + report["failed"]:  # every row unavailable: nothing was checked
        return error("parity", "no case ran on any backend (see the table's notes)", BAD_INPUT)
    return CHECK_FAILED if report["failed"] else OK


def _on_device(requested: list[str] | None, placement) -> list[str]:
    """The backends to check under torchrun: those on the process group's device type (and the
    unusable ones, which the report names); a requested one on another device is an error."""
    from v4hal.model.parallel import LayoutError

    kind = placement.device.split(":")[0]

    def elsewhere(b: str) -> bool:
        return registry.probe(b)[0] and registry.backend_module(b).device().type != kind

    for b in requested or []:
        if elsewhere(b):
            raise LayoutError(f"--backend {b}: runs on {registry.backend_module(b).device().type}, but this "
                              f"torchrun's process group is {placement}: check it in another run")
    return [b for b in requested or registry.BACKENDS if not elsewhere(b)]
