"""Two parity reports compared row by row: is parity identical between two source trees?

    cd /tmp && OMP_NUM_THREADS=1 python -m v4hal.bench.parity_diff --before fd22c6a [--after HEAD]
        [--backend cpu --backend cpu_fast ...] [--full] [--select TEXT] [--out DIR]
    python -m v4hal.bench.parity_diff BEFORE/parity.json AFTER/parity.json

With revisions, each is unpacked (`validation_reads.stage`) and runs `v4hal parity` (quick cases
unless --full) in its own process on its own tree; with two files, they are compared as they are.
A row is one (case, backend); two rows are identical when their status, note and every metric of
every output are equal (the time taken is not compared). The result always states each count,
zeros included, so "0 differ" is a measured statement, not an absence of lines.
Exit code: 0 when every shared row is identical and no row is in one report only, else 1.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

UNCOMPARED = ("seconds",)  # wall-clock time differs between any two runs


def _key(row: dict) -> tuple[str, str]:
    return row["case"], row["backend"]


def _comparable(row: dict) -> dict:
    return {k: v for k, v in row.items() if k not in UNCOMPARED}


def _changes(before: dict, after: dict, path: str = "") -> list[str]:
    """Every leaf that differs, as `path: before -> after` (floats compared exactly)."""
    if isinstance(before, dict) and isinstance(after, dict):
        out = []
        for k in sorted(set(before) | set(after), key=str):
            out += _changes(before.get(k), after.get(k), f"{path}.{k}" if path else str(k))
        return out
    return [] if before == after else [f"{path}: {before!r} -> {after!r}"]


def diff(before: dict, after: dict) -> dict:
    """{compared, identical, differ: {case [backend]: [changes]}, only_before, only_after}."""
    old = {_key(r): _comparable(r) for r in before["rows"]}
    new = {_key(r): _comparable(r) for r in after["rows"]}
    shared = sorted(old.keys() & new.keys())
    differ = {f"{c} [{b}]": ch for c, b in shared if (ch := _changes(old[c, b], new[c, b]))}
    return {"compared": len(shared), "identical": len(shared) - len(differ), "differ": differ,
            "only_before": [f"{c} [{b}]" for c, b in sorted(old.keys() - new.keys())],
            "only_after": [f"{c} [{b}]" for c, b in sorted(new.keys() - old.keys())]}


def format_diff(d: dict, before: str, after: str) -> str:
    lines = [f"parity diff {before} -> {after}: {d['compared']} rows in both, {d['identical']} identical, "
             f"{len(d['differ'])} differ; {len(d['only_before'])} only in {before}, "
             f"{len(d['only_after'])} only in {after}"]
    for row, changes in d["differ"].items():
        lines += [f"DIFFERS {row}"] + [f"  {c}" for c in changes]
    lines += [f"ONLY IN {before}: {r}" for r in d["only_before"]]
    lines += [f"ONLY IN {after}: {r}" for r in d["only_after"]]
    return "\n".join(lines)


def identical(d: dict) -> bool:
    return not (d["differ"] or d["only_before"] or d["only_after"])


def commit(rev: str) -> str:
    """`rev` as a short commit hash of this checkout."""
    here = Path(__file__).resolve().parents[1]
    return subprocess.run(["git", "-C", str(here), "rev-parse", "--short", rev], check=True, capture_output=True,
                          text=True).stdout.strip()


def run_parity(rev: str, workdir: Path, options: list[str]) -> dict:
    """`v4hal parity OPTIONS` on revision `rev`, in a process importing only that tree."""
    from v4hal.bench.validation_reads import stage

    pkg, out = stage(rev, workdir / "src"), workdir / "report"
    env = {**os.environ, "PYTHONPATH": str(pkg), "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    code = "import sys, v4hal.ops; from v4hal.cli import main; print(v4hal.ops.__file__); sys.exit(main(sys.argv[1:]))"
    proc = subprocess.run([sys.executable, "-c", code, "parity", "--out", str(out), *options], env=env, cwd=workdir,
                          capture_output=True, text=True)
    ops_file = proc.stdout.splitlines()[0] if proc.stdout else ""
    if not ops_file.startswith(str(pkg)) or not (out / "parity.json").exists():  # the wrong tree, or a crash
        raise RuntimeError(f"parity on {rev} (ops from {ops_file!r}) wrote no report:\n{proc.stderr[-3000:]}")
    return json.loads((out / "parity.json").read_text())


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("reports", nargs="*", metavar="PARITY.json", help="two reports to compare instead of revisions")
    p.add_argument("--before", default="fd22c6a", help="revision (default fd22c6a: before issue 16's reshaping)")
    p.add_argument("--after", default="HEAD")
    p.add_argument("--backend", action="append", help="passed to v4hal parity (default: all)")
    p.add_argument("--full", action="store_true", help="every case, not only --quick's")
    p.add_argument("--select", help="passed to v4hal parity")
    p.add_argument("--out", type=Path, help="also write both reports and diff.json here")
    a = p.parse_args(argv)
    if a.reports:
        if len(a.reports) != 2:
            p.error(f"expected two reports, got {len(a.reports)}")
        labels = a.reports
        before, after = (json.loads(Path(r).read_text()) for r in a.reports)
    else:
        options = [] if a.full else ["--quick"]
        options += [f"--backend={b}" for b in a.backend or []] + ([f"--select={a.select}"] if a.select else [])
        labels = [commit(a.before), commit(a.after)]  # HEAD may move while the runs take minutes
        with tempfile.TemporaryDirectory() as tmp:
            before, after = (run_parity(rev, Path(tmp) / side, options) for rev, side in zip(labels, ("before", "after")))
    d = diff(before, after)
    print(format_diff(d, *labels))
    if a.out:
        a.out.mkdir(parents=True, exist_ok=True)
        for name, value in (("before.json", before), ("after.json", after), ("diff.json", d)):
            (a.out / name).write_text(json.dumps(value, indent=1, default=str))
    return 0 if identical(d) else 1


if __name__ == "__main__":
    sys.exit(main())
