"""CPU cost of the conversion manifest's hashes: hashlib's sha256 against BLAKE3 (the `blake3`
package), in CPU seconds per GB (process CPU time, so a shared machine's waiting is not counted)
and GB/s of wall time, on 16 MiB updates as the converter makes them.

    python -m v4hal.bench.convert_hash [--mib 512]

Not a test: prints one Markdown table with the machine and its load average.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import time

import blake3

CHUNK = 16 * 2**20  # the converter's READ_CHUNK


def measure(make, data: memoryview, total: int) -> tuple[float, float]:
    """(CPU s per GB, wall GB/s) hashing `total` bytes in CHUNK updates from `data`."""
    make().update(data[:CHUNK])  # warm up: first-touch, SIMD dispatch
    cpu, wall = time.process_time(), time.perf_counter()
    h, done = make(), 0
    while done < total:
        h.update(data[done % len(data):][:CHUNK])
        done += CHUNK
    h.hexdigest()
    return (time.process_time() - cpu) / total * 1e9, total / (time.perf_counter() - wall) / 1e9


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--mib", type=int, default=512, help="MiB hashed per algorithm (from a 256 MiB random buffer)")
    ap.add_argument("--repeats", type=int, default=3, help="interleaved runs of each; the best is reported")
    args = ap.parse_args(argv)
    data = memoryview(os.urandom(256 * 2**20))
    total = args.mib * 2**20 // CHUNK * CHUNK
    hashes = {"hashlib sha256": hashlib.sha256, "blake3, 1 thread": blake3.blake3,
              "blake3, all cores (max_threads=AUTO)": lambda: blake3.blake3(max_threads=blake3.blake3.AUTO)}
    best: dict[str, tuple[float, float]] = {}
    for _ in range(args.repeats):
        for name, make in hashes.items():
            cpu, gbps = measure(make, data, total)
            best[name] = (min(cpu, best.get(name, (cpu, 0))[0]), max(gbps, best.get(name, (0, gbps))[1]))
    from v4hal.bench.machine import cpu_name

    print(f"machine: {cpu_name()}, {len(os.sched_getaffinity(0))} cores available; load average "
          f"{' '.join(f'{x:.2f}' for x in os.getloadavg())}; {total / 2**20:.0f} MiB per run, best of {args.repeats}\n")
    print("| hash | CPU s per GB | GB/s (wall) | CPU vs sha256 |")
    print("|---|---|---|---|")
    for name, (cpu, gbps) in best.items():
        print(f"| {name} | {cpu:.3f} | {gbps:.2f} | {cpu / best['hashlib sha256'][0]:.2f}x |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
