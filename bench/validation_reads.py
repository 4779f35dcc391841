"""Host reads and time of one eager bench-v4 decode step, for two source trees in one run.

    OMP_NUM_THREADS=1 .venv/bin/python bench/validation_reads.py --before fd22c6a [--after HEAD]
        [--context 4096] [--steps 20] [--rounds 2]

Each revision is unpacked (`git archive`) into a temporary tree laid out as the `v4hal` package,
and every measurement runs in its own process on that tree, alternating the revisions round by
round on one thread (backend `auto`, i.e. cpu_fast on a CPU): a `context`-token prefill of
bench/cases_model.py's bench-v4 model (its seeded weights), two warm-up steps, the host reads of
one step (`host_reads.HostReads`: all, and those of the contracts' checks), then `steps` timed
steps, each timed by the wall clock and by the process's CPU time (less disturbed than the wall
clock on a loaded machine). Prints one JSON line per measurement and a summary (median of the
per-process medians).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
PACKAGES = {"backends": "backends", "ops": "ops", "model": "model", "conversion": "conversion",
            "bench": "bench", "tools": "tools"}


def stage(rev: str, root: Path) -> Path:
    """`rev` unpacked under root/tree and a package dir root/pkg whose v4hal/<name> link there."""
    tree, pkg = root / "tree", root / "pkg" / "v4hal"
    tree.mkdir(parents=True)
    archive = subprocess.run(["git", "-C", str(HERE.parent), "archive", rev], check=True, capture_output=True).stdout
    tar = root / "rev.tar"
    tar.write_bytes(archive)
    with tarfile.open(tar) as t:
        t.extractall(tree, filter="data")
    pkg.mkdir(parents=True)
    for f in (tree / "v4hal").iterdir():
        (pkg / f.name).symlink_to(f)
    for name, folder in PACKAGES.items():
        if (tree / folder).is_dir():
            (pkg / name).symlink_to(tree / folder)
    return pkg.parent


def measure(context: int, steps: int) -> dict:
    import torch

    sys.path.insert(0, str(HERE))
    from host_reads import HostReads

    from v4hal.bench.cases_model import BENCH_V4, model_for

    torch.set_num_threads(1)
    model = model_for("bench-v4")
    ids = torch.randint(0, BENCH_V4.vocab_size, (1, context), generator=torch.Generator().manual_seed(0))
    cache = model.new_cache()
    with torch.no_grad():
        for i in range(0, context, 1024):
            model(ids[:, i:i + 1024], cache=cache, last_only=True)
        step = ids[:, -1:]
        for _ in range(2):
            model(step, cache=cache)
        with HostReads() as reads:
            model(step, cache=cache)
        times, cpu_times = [], []
        for _ in range(steps):
            start, cpu_start = time.perf_counter(), time.process_time()
            model(step, cache=cache)
            times.append((time.perf_counter() - start) * 1e3)
            cpu_times.append((time.process_time() - cpu_start) * 1e3)
    import v4hal.ops

    return {"ops": v4hal.ops.__file__, "check_reads": reads.checks, "all_reads": reads.total,
            "median_ms": statistics.median(times), "min_ms": min(times),
            "cpu_median_ms": statistics.median(cpu_times), "cpu_min_ms": min(cpu_times)}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--before", default="fd22c6a")
    p.add_argument("--after", default="HEAD")
    p.add_argument("--context", type=int, default=4096)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--measure", action="store_true", help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.measure:
        print(json.dumps(measure(a.context, a.steps)))
        return 0
    results: dict[str, list[dict]] = {"before": [], "after": []}
    with tempfile.TemporaryDirectory() as tmp:
        pkgs = {label: stage(rev, Path(tmp) / label) for label, rev in (("before", a.before), ("after", a.after))}
        for r in range(a.rounds):
            for label in ("before", "after"):
                env = {**os.environ, "PYTHONPATH": str(pkgs[label]), "OMP_NUM_THREADS": "1"}
                out = subprocess.run([sys.executable, __file__, "--measure", "--context", str(a.context),
                                      "--steps", str(a.steps)], env=env, check=True, capture_output=True,
                                     text=True, cwd=tmp).stdout.strip().splitlines()[-1]
                row = {"rev": getattr(a, label), "round": r, **json.loads(out)}
                print(json.dumps(row), flush=True)
                results[label].append(row)
    for label, rows in results.items():
        print(f"{label} ({getattr(a, label)}): check reads {rows[0]['check_reads']}, all reads {rows[0]['all_reads']}, "
              f"decode step wall median {statistics.median(r['median_ms'] for r in rows):.2f} ms "
              f"(min {min(r['min_ms'] for r in rows):.2f}), process CPU time median "
              f"{statistics.median(r['cpu_median_ms'] for r in rows):.2f} ms (min {min(r['cpu_min_ms'] for r in rows):.2f})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
