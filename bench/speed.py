"""`v4hal bench`: time ops per backend against peers measured in the same run.

Each speed case is timed with warm-up and repeats (device-synchronised), reported as median and
spread (10th-90th percentile), achieved TFLOP/s and GB/s, their share of the machine's measured
limits (bench.machine.limits), and the ratio to every peer: `speedup = peer median / our median`.
Output: a terminal table, bench.json, bench.md and bench.png.

Under torchrun (`--tp N [--ep N]`, model/launch.py) only the cases with a per-rank form run
(`SpeedCase.distributed`: bench-v4's prefill and decode, eager and compiled; other selected cases
are reported unavailable, and a selection with none is refused): every rank times its part in
step with the others (a fixed number of repeats, no time budget, so no rank calls a collective
alone), each sample is the slowest rank's; rank 0 alone measures the machine's limits (after the cases: no
roofline shares), prints and writes, the layout in the report's machine lines. Peers run whole on
every rank at the same time.
"""

from __future__ import annotations

import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist
from tqdm import tqdm

from v4hal.backends import registry
from v4hal.bench.cases import Distributed, SpeedCase, speed_cases
from v4hal.bench.machine import describe, limits, synchronize


def time_fn(fn, device: torch.device, warmup: int = 2, repeats: int = 10, budget_s: float = 20.0) -> list[float]:
    """Seconds per call, `repeats` samples (fewer if one call would blow `budget_s`)."""
    for _ in range(warmup):
        fn()
    synchronize(device)
    samples: list[float] = []
    spent = 0.0
    while len(samples) < repeats and (spent < budget_s or len(samples) < 3):
        start = time.perf_counter()
        fn()
        synchronize(device)
        samples.append(time.perf_counter() - start)
        spent += samples[-1]
    return samples


def interleaved(fns: dict, repeats: int) -> dict[str, list[float]]:
    """Seconds per call of each named callable, `repeats` samples each, the callables taking
    turns (after one warm-up round), so a load change on a shared machine hits all of them alike."""
    samples: dict[str, list[float]] = {k: [] for k in fns}
    for r in range(repeats + 1):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            if r:
                samples[name].append(time.perf_counter() - start)
    return samples


def _stats(samples: list[float]) -> dict[str, float]:
    s = sorted(samples)
    pick = lambda q: s[min(len(s) - 1, int(q * (len(s) - 1) + 0.5))]  # noqa: E731
    return {"median_s": statistics.median(s), "p10_s": pick(0.1), "p90_s": pick(0.9), "samples": len(s)}


def slowest_rank(samples: list[float]) -> list[float]:
    """Per repeat, the longest any rank took (every rank passes its samples; all get the result)."""
    everyone: list = [None] * dist.get_world_size()
    dist.all_gather_object(everyone, samples)
    return [max(per_rank) for per_rank in zip(*everyone)]


def run_case(case: SpeedCase, backend: str, repeats: int, machine_limits: dict,
             distributed: Distributed | None = None) -> dict:
    row = {"case": case.id, "op": case.op, "backend": backend}
    device = registry.backend_module(backend).device()

    def timed(fn) -> dict:
        if distributed is None:
            return _stats(time_fn(fn, device, repeats=repeats))
        return _stats(slowest_rank(time_fn(fn, device, repeats=repeats, budget_s=float("inf"))))

    with registry.forced(backend):
        try:
            fn, peers = case.make(device) if distributed is None else case.make(device, distributed=distributed)
            ours = timed(fn)
        except registry.BackendError as exc:
            return {**row, "status": "unavailable", "note": str(exc)}
        except Exception as exc:  # one broken case is reported; the other cases still run
            if distributed is not None:  # the other ranks' collectives are out of step: stop them all
                raise
            return {**row, "status": "fail", "note": f"{type(exc).__name__}: {exc}"}
        row.update(ours, status="ok")
        t = ours["median_s"]
        if case.flops:
            row["tflops"] = case.flops / t / 1e12
            if machine_limits:
                row["flops_share"] = row["tflops"] / machine_limits["bf16_tflops"]
        if case.bytes:
            row["gbs"] = case.bytes / t / 1e9
            if machine_limits:
                row["bandwidth_share"] = row["gbs"] / machine_limits["bandwidth_gbs"]
        row["peers"] = {}
        for name, peer in peers.items():
            p = timed(peer)
            row["peers"][name] = {**p, "speedup": p["median_s"] / t}
        del fn, peers
    return row


def oversubscription_warning(threads: int, cores: int, load: float, ranks: int = 1) -> str | None:
    """Why CPU timings from `threads` torch threads (in each of `ranks` torchrun ranks) on `cores`
    cores, with a 1-minute load average of `load` (other processes' runnable threads), are not to
    be trusted, or None. OpenMP threads spin-wait on each other at every parallel region, ranks at
    every collective: with fewer free cores than threads, each op waits on a descheduled thread
    and the figures come out 10-40x off."""
    busy = threads * ranks
    uses = f"torch uses {busy} threads" + (f" ({ranks} ranks x {threads})" if ranks > 1 else "")
    fix = "rerun with --threads 1" if threads > 1 else "time them on a quieter machine"
    if busy > cores:
        return (f"{uses} on {cores} cores: the timings measure threads waiting on each other, not the ops; "
                + (f"rerun with --threads 1 (or --threads {cores})" if ranks == 1 else
                   "start fewer ranks (torchrun --nproc-per-node) or threads"))
    if busy > 1 and load + busy > cores + 0.5:
        return (f"the machine is loaded (1-minute load average {load:.1f} on {cores} cores) and {uses}: the "
                f"timings can be 10-40x off; {fix}")
    return None


def cpu_oversubscription(ranks: int = 1) -> str | None:
    """oversubscription_warning for this process (one of `ranks` torchrun ranks on this node) and
    machine, now."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else 0.0
    return oversubscription_warning(torch.get_num_threads(), cores, load, ranks)


def run(backends: list[str] | None = None, quick: bool = False, select: str | None = None,
        repeats: int = 10, progress: bool = True, distributed: Distributed | None = None) -> dict:
    """The machine's limits are measured only when a case has flops or bytes to compare with them
    (minutes on a loaded CPU at one thread). Under `distributed`, every rank calls this; the
    machines are rank 0's, their limits measured after the cases (the other ranks must not wait
    for them inside a collective), so no roofline shares then."""
    backends = backends or [registry.preferred_backend()]
    rows, machines = [], {}
    rank0 = distributed is None or dist.get_rank() == 0
    cases = speed_cases(quick=quick, select=select)
    roofline = any(c.flops or c.bytes for c in cases)
    for backend in backends:
        ok, why = registry.probe(backend)
        if not ok:
            rows.append({"case": "*", "backend": backend, "status": "unavailable", "note": why})
            continue
        device = registry.backend_module(backend).device()
        machine = {"machine": describe(device), "limits": limits(str(device)) if roofline and not distributed else {}}
        if distributed is not None:
            machine["machine"] += (f"; torchrun, layout {distributed.layout}: {dist.get_world_size()} ranks "
                                   f"({dist.get_backend()}), each time the slowest rank's")
        machines[backend] = machine
        for case in tqdm(cases, desc=f"bench {backend}", unit="case", disable=not progress):
            if distributed is not None and not case.distributed:
                rows.append({"case": case.id, "op": case.op, "backend": backend, "status": "unavailable",
                             "note": f"no per-rank form: time it in one process, not under layout {distributed.layout}"})
                continue
            rows.append(run_case(case, backend, repeats, machine["limits"], distributed))
        if roofline and distributed is not None and rank0:
            machine["limits"] = limits(str(device))
    return {"machines": machines, "rows": rows, "warnings": [],
            "fallbacks": {op: c.reason for op, c in registry.fallbacks().items()}}


def format_row(row: dict) -> list[str]:
    if row.get("status") != "ok":
        return [row["case"], row["backend"], row.get("status", "?"), "", "", "", "", row.get("note", "")]
    peers = ", ".join(f"{n}: {p['median_s'] * 1e3:.3g} ms ({p['speedup']:.2f}x)" for n, p in row["peers"].items())
    share = ", ".join(f"{k.split('_')[0]} {row[k]:.0%}" for k in ("flops_share", "bandwidth_share") if k in row)
    return [row["case"], row["backend"], f"{row['median_s'] * 1e3:.3g} ms",
            f"{row['p10_s'] * 1e3:.3g}-{row['p90_s'] * 1e3:.3g}",
            f"{row['tflops']:.3g}" if "tflops" in row else "", f"{row['gbs']:.3g}" if "gbs" in row else "",
            share, peers]


HEADER = ["case", "backend", "median", "p10-p90 ms", "TFLOP/s", "GB/s", "roofline share", "peers (speedup = peer/ours)"]


def format_terminal(report: dict) -> str:
    rows = [HEADER] + [format_row(r) for r in report["rows"]]
    widths = [max(len(r[i]) for r in rows) for i in range(len(HEADER))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows]
    for backend, m in report["machines"].items():
        lines.append(f"{backend}: {m['machine']}; {_limits(m['limits'])}")
    return "\n".join(lines)


def _limits(lim: dict) -> str:
    if not lim:
        return "limits not measured (no case has flops or bytes to compare with them)"
    return (f"measured limits {lim['bandwidth_gbs']:.1f} GB/s copy bandwidth, {lim['bf16_tflops']:.2f} BF16 / "
            f"{lim['fp32_tflops']:.2f} FP32 TFLOP/s")


def format_markdown(report: dict, command: str) -> str:
    lines = ["# Benchmark report", "", f"Command: `{command}`", ""]
    for backend, m in report["machines"].items():
        lines.append(f"- {backend}: {m['machine']}; {_limits(m['limits'])}")
    if report["fallbacks"]:
        lines.append(f"- ops that fell back to cpu: {', '.join(sorted(report['fallbacks']))}")
    lines += [f"- **warning**: {w}" for w in report["warnings"]]
    lines += ["", "| " + " | ".join(HEADER) + " |", "|" + "---|" * len(HEADER)]
    lines += ["| " + " | ".join(format_row(r)) + " |" for r in report["rows"]]
    return "\n".join(lines) + "\n"


def plot(report: dict, path: Path) -> Path | None:
    """Horizontal bars: our speedup over each peer per case (1.0 = parity with the peer)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    bars = [(f"{r['case']} [{r['backend']}] vs {n}", p["speedup"])
            for r in report["rows"] if r.get("status") == "ok" for n, p in r["peers"].items()]
    if not bars:
        return None
    fig, ax = plt.subplots(figsize=(10, 0.35 * len(bars) + 1.5))
    labels, values = zip(*bars)
    ax.barh(range(len(bars)), values, color=["tab:green" if v >= 1 else "tab:red" for v in values])
    ax.axvline(1.0, color="black", lw=0.8)
    ax.set_yticks(range(len(bars)), labels, fontsize=8)
    ax.invert_yaxis()
    ax.set_xlabel("speedup over peer (peer time / v4hal time)")
    ax.set_title(next(iter(report["machines"].values()))["machine"], fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def add_arguments(p) -> None:
    from v4hal.model import launch
    from v4hal.subcommand import at_least

    p.add_argument("--backend", action="append", choices=registry.BACKENDS,
                   help="backend to time (repeatable; default: what auto picks on this machine)")
    p.add_argument("--quick", action="store_true", help="small cases only")
    p.add_argument("--select", help="only cases whose id contains this text")
    p.add_argument("--repeats", type=at_least(1), default=10)
    p.add_argument("--threads", type=at_least(1), help="torch CPU threads (on a loaded machine 1 measures the ops, "
                   "not OpenMP threads waiting on each other)")
    p.add_argument("--out", type=Path, default=Path("out"), help="folder for bench.json / .md / .png")
    launch.add_arguments(p)


def main(args) -> int:
    from v4hal.model import launch
    from v4hal.subcommand import error

    cases = speed_cases(quick=args.quick, select=args.select)
    if not cases:
        return error("bench", f"--select {args.select!r}: no {'quick ' if args.quick else ''}speed case id contains it")
    layout = launch.read_layout(args)
    if layout.devices > 1 and not any(c.distributed for c in cases):
        return error("bench", f"layout {layout} (--tp {args.tp} --ep {args.ep}): under torchrun only the whole-model "
                              f"cases run (--select bench-v4/); none of the {len(cases)} selected case(s) has a "
                              f"per-rank form ({', '.join(c.id for c in cases[:3])}{', ...' if len(cases) > 3 else ''}): "
                              f"time them in one process")
    for backend in args.backend or []:
        usable, why = registry.probe(backend)
        if not usable:
            return error("bench", f"--backend {backend}: requested but unavailable here: {why}")
    if args.threads:
        torch.set_num_threads(args.threads)
    backends = args.backend or [registry.preferred_backend()]
    if layout.devices > 1 and len(backends) > 1:
        return error("bench", f"--backend: under torchrun one backend at a time (its device sets the process "
                              f"group), got {backends}")
    device = registry.backend_module(backends[0]).device()
    return launch.run("bench", args, layout, device, lambda placement: _bench(args, layout, placement, backends),
                      before_join=lambda: [c.prepare() for c in cases if c.prepare])


def _bench(args, layout, placement, backends: list[str]) -> int:
    """Run, print and (rank 0) write the report; `placement` is None in one process."""
    from v4hal.subcommand import CHECK_FAILED, OK, error

    rank0 = placement is None or dist.get_rank() == 0
    on_cpu = any(registry.backend_module(b).device().type == "cpu" for b in backends)
    ranks_here = 1 if placement is None else int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    warning = cpu_oversubscription(ranks_here) if on_cpu and rank0 else None
    if warning:
        print(f"v4hal bench: warning: {warning}", file=sys.stderr)
    distributed = None if placement is None else Distributed(layout, args.dist_timeout)
    report = run(backends, quick=args.quick, select=args.select, repeats=args.repeats, progress=rank0,
                 distributed=distributed)
    if not rank0:
        return OK
    report["warnings"] += [warning] if warning else []
    print(format_terminal(report))
    args.out.mkdir(parents=True, exist_ok=True)
    command = "v4hal " + " ".join(sys.argv[1:])
    (args.out / "bench.json").write_text(json.dumps({**report, "command": command}, indent=1, default=str))
    (args.out / "bench.md").write_text(format_markdown(report, command))
    png = plot(report, args.out / "bench.png")
    print(f"wrote {args.out / 'bench.json'}, {args.out / 'bench.md'}" + (f", {png}" if png else ""))
    failed = [r["case"] for r in report["rows"] if r.get("status") == "fail"]
    if failed:
        print(f"bench: {len(failed)} case(s) failed: {', '.join(failed)}")
        return CHECK_FAILED
    if not any(r.get("status") == "ok" for r in report["rows"]):
        return error("bench", "no case ran on any backend (see the table's notes)")
    return OK
