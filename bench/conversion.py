"""Conversion throughput benchmark (not a test): `python -m v4hal.bench.conversion`.

Writes a synthetic DeepSeek-V3-shaped FP8 checkpoint (random e4m3 codes, fp32 128x128 scales,
V3 HF names) to a scratch directory, then, with the source evicted from the page cache before
every run (posix_fadvise DONTNEED, so reads come from the disk):
  1. the disk's sequential read speed (16 MiB reads of every shard), its sequential write speed
     (16 MiB writes of as many bytes, writeback started behind them as the converter does, then
     fsync) and the manifest hashes' speed on one core (BLAKE3, and hashlib's sha256 that the
     previous converter used; the converter hashes every input and output byte);
  2. `v4hal convert run --to bf16` and `--to w8a8` (streaming), each in a fresh process, with
     `--workers 1` and `--workers 2`; with `--previous REV` (repeatable), the converter of git
     revision REV of this repository too (e.g. fd22c6a, the last one with sha256 manifests and one
     shard at a time), extracted with `git archive` and imported in place of this one;
  3. the same peer in the same run: a naive script that loads each whole shard with
     `safetensors.torch.load_file`, converts every tensor with the same v4hal.ops math, and
     `save_file`s the result (DeepSeek's fp8_cast_bf16 pattern). Loading the whole checkpoint at
     once would need input + output (~3x the source) in RAM, beyond this machine's per-process
     budget, so the shard is the naive unit;
  4. a stage breakdown: one more conversion of each target in a fresh process with the converter's
     stages wrapped in timers (CPU seconds each thread spent in each stage, per GB of input), from
     the plain folder and from the same files laid out as a Hugging Face cache snapshot (their
     hashes stated by the blob names: not hashed again), and with `--previous`, that converter's
     from the plain folder. `--stages-only` runs just these, interleaved, `--repeats` times each,
     and reports the run with the least process CPU.
Reports GB/s of input, the share of the disk's read speed, CPU seconds per GB (the process and
its workers), peak RSS of the process (VmHWM) and of its largest worker (ru_maxrss of its
children) against the largest tensor, the load average before each run, and the cost model's
prediction from the stage breakdown. Deletes everything it wrote.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

NAIVE = r"""
import sys, json, glob, os, time
import torch
from safetensors.torch import load_file, save_file
from v4hal.ops import quant
src, dst, target = sys.argv[1:4]
start = time.perf_counter()
os.makedirs(dst, exist_ok=True)
for path in sorted(glob.glob(os.path.join(src, "*.safetensors"))):
    tensors = load_file(path)
    out = {}
    for name, t in tensors.items():
        if name.endswith("_scale_inv"):
            continue
        scale = tensors.get(name + "_scale_inv")
        if scale is None:
            out[name] = t
            continue
        x = quant.dequantize_fp8(t, scale, out_dtype=torch.bfloat16 if target == "bf16" else torch.float32)
        if target == "bf16":
            out[name] = x
        else:
            q, s = quant.quantize_int8(x)
            stem = name[: -len("weight")]
            out[name], out[stem + "weight_scale"] = q, s.unsqueeze(1)
            out[stem + "weight_offset"] = torch.zeros_like(s.unsqueeze(1))
    save_file(out, os.path.join(dst, os.path.basename(path)))
    del tensors, out
print(json.dumps({"peak_rss_kb": int(next(l for l in open("/proc/self/status") if l.startswith("VmHWM")).split()[1]),
                  "convert_s": time.perf_counter() - start}))
"""

STREAMING = r"""
import sys, json, os, resource, time
import torch
from v4hal.cli import main
start = time.perf_counter()
rc = main(sys.argv[1:])
t = os.times()
print(json.dumps({"peak_rss_kb": int(next(l for l in open("/proc/self/status") if l.startswith("VmHWM")).split()[1]), "rc": rc,
                  "worker_rss_kb": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss,
                  "cpu_s": t.user + t.system + t.children_user + t.children_system, "convert_s": time.perf_counter() - start}))
"""

# Runs one conversion with its stages wrapped in per-thread CPU timers (time.thread_time), so the
# figures are what each stage costs, not how long it waited for a core on a shared machine.
STAGES = r"""
import sys, json, time, threading, collections, inspect
from pathlib import Path
from v4hal.conversion import formats, io, plan
try:
    from v4hal.conversion import output  # the writing side, since conversion/io.py was split
except ImportError:
    output = io
from v4hal.conversion.formats import Options
src, dst, target = sys.argv[1:4]
cpu, wall, lock = collections.defaultdict(float), collections.defaultdict(float), threading.Lock()
def timed(stage, fn):
    def run(*args, **kwargs):
        c, w = time.thread_time(), time.perf_counter()
        try:
            return fn(*args, **kwargs)
        finally:
            with lock:
                cpu[stage] += time.thread_time() - c
                wall[stage] += time.perf_counter() - w
    return run
BACKGROUND = {"v4hal-hash-in": "hash of the source (thread)", "v4hal-hash-out": "hash of the output (thread)"}
submit = io.Background.submit
def submit_timed(self, fn, *args):
    stage = BACKGROUND.get(self._pool._thread_name_prefix)
    return timed("main: waiting for a full queue", submit)(self, timed(stage, fn) if stage else fn, *args)
io.Background.submit = submit_timed
io.HashingReader._consume = timed("read: preadv, read-ahead hint, queue for hashing (main)", io.HashingReader._consume)
if hasattr(io.HashingReader, "_read_at"):  # since O_DIRECT reads: announced chunks are read on a thread
    read_at, read_ahead = io.HashingReader._read_at, timed("read: O_DIRECT preadv (read-ahead thread)", io.HashingReader._read_at)
    io.HashingReader._read_at = lambda self, *a: (read_ahead if threading.current_thread().name.startswith("v4hal-read")
                                                  else read_at)(self, *a)
output.ShardWriter._put = timed("write: O_DIRECT stage, or page cache + write-behind (thread)", output.ShardWriter._put)
output.ShardWriter.close = timed("close: drain, fsync, rename (main)", output.ShardWriter.close)
formats.decode_rows = timed("decode FP8 (main)", formats.decode_rows)
formats.encode_rows = timed("encode (main)", formats.encode_rows)
if hasattr(formats, "fp8_to_int8_rows"):  # since FP8 -> int8 in one pass
    formats.fp8_to_int8_rows = timed("decode + encode FP8 -> int8, one pass (main)", formats.fp8_to_int8_rows)
p = plan.Plan(io.Source(src), Options(target=target))
start, cpu0 = time.perf_counter(), time.process_time()
one_worker = {"n_workers": 1} if "n_workers" in inspect.signature(plan.run).parameters else {}  # before --workers: always 1
plan.run(p, dst, progress=False, **one_worker)
seconds, process_cpu = time.perf_counter() - start, time.process_time() - cpu0
print(json.dumps({"seconds": seconds, "process_cpu": process_cpu, "cpu": cpu, "wall": wall}))
"""

HIDDEN, VOCAB = 7168, 16384


def layer_shapes() -> dict[str, tuple[int, int]]:
    """One DeepSeek-V3 MoE layer's FP8 linears (8 of its 256 routed experts)."""
    shapes = {"self_attn.q_a_proj": (1536, HIDDEN), "self_attn.q_b_proj": (24576, 1536),
              "self_attn.kv_a_proj_with_mqa": (576, HIDDEN), "self_attn.kv_b_proj": (32768, 512),
              "self_attn.o_proj": (HIDDEN, 16384)}
    for e in range(8):
        shapes.update({f"mlp.experts.{e}.gate_proj": (2048, HIDDEN), f"mlp.experts.{e}.up_proj": (2048, HIDDEN),
                       f"mlp.experts.{e}.down_proj": (HIDDEN, 2048)})
    return shapes


def synthesize(root: Path, layers: int) -> int:
    """Write the checkpoint, one layer per shard; returns the largest tensor's bytes."""
    import torch
    from safetensors.torch import save_file

    root.mkdir(parents=True)
    gen = torch.Generator().manual_seed(0)
    weight_map, largest = {}, 0
    for i in range(layers):
        shard = {}
        if i == 0:
            shard["model.embed_tokens.weight"] = torch.randn(VOCAB, HIDDEN, generator=gen).to(torch.bfloat16)
        for name, (n, k) in layer_shapes().items():
            bits = torch.randint(0, 256, (n, k), dtype=torch.uint8, generator=gen)
            bits = torch.where((bits & 0x7F) == 0x7F, bits & 0xF0, bits)  # no NaN codes
            shard[f"model.layers.{i}.{name}.weight"] = bits.view(torch.float8_e4m3fn)
            shard[f"model.layers.{i}.{name}.weight_scale_inv"] = torch.rand(-(-n // 128), -(-k // 128), generator=gen) * 1e-3
        shard[f"model.layers.{i}.input_layernorm.weight"] = torch.ones(HIDDEN, dtype=torch.bfloat16)
        largest = max([largest] + [t.numel() * t.element_size() for t in shard.values()])
        fname = f"model-{i + 1:05d}-of-{layers:05d}.safetensors"
        save_file(shard, str(root / fname))
        weight_map.update({k: fname for k in shard})
        del shard
    (root / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    (root / "config.json").write_text(json.dumps({"model_type": "deepseek_v3", "quantization_config": {"quant_method": "fp8"}}))
    return largest


def evict(root: Path) -> None:
    for p in root.iterdir():
        fd = os.open(p, os.O_RDONLY)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        os.close(fd)


def disk_read(root: Path, direct: bool = False, streams: int = 1) -> float:
    """Sequential read speed of every shard, cold, `streams` files at a time (one thread each):
    through the page cache (the kernel's read-ahead), or with O_DIRECT into a reused aligned
    buffer, 16 MiB at a time, as the converter reads."""
    import mmap
    from concurrent.futures import ThreadPoolExecutor

    def read(p: Path) -> int:
        total, buf = 0, mmap.mmap(-1, 16 * 2**20)  # page-aligned, as O_DIRECT needs
        fd = os.open(p, os.O_RDONLY | (os.O_DIRECT if direct else 0))
        try:
            while (n := os.readv(fd, [buf])) > 0:
                total += n
        finally:
            os.close(fd)
        return total

    os.sync()
    evict(root)
    start = time.perf_counter()
    with ThreadPoolExecutor(streams) as pool:
        total = sum(pool.map(read, sorted(root.glob("*.safetensors"))))
    return total / (time.perf_counter() - start) / 1e9


def _write_random(path: Path, nbytes: int) -> int:
    """Write `nbytes` of random bytes through a ShardWriter with hashing off (O_DIRECT where the
    filesystem allows, else the page cache with writeback started behind), fsync'd: the disk as
    conversions write. Returns the bytes written."""
    import torch

    from v4hal.conversion import output

    chunk = memoryview(os.urandom(output.STAGE))
    writer = output.ShardWriter(path, [output.OutSpec("bytes", torch.uint8, (nbytes,))], algo=None)
    for offset in range(0, nbytes, output.STAGE):
        writer.write_bytes(chunk[:min(output.STAGE, nbytes - offset)])
    _, written = writer.close()
    path.unlink()
    return written


def _write_streams(work: Path, nbytes: int, streams: int) -> int:
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(streams) as pool:
        return sum(pool.map(lambda i: _write_random(work / f"write-test-{i}.safetensors", nbytes // streams), range(streams)))


def disk_write(work: Path, nbytes: int, streams: int = 1) -> float:
    """Sequential write speed with fsync, as conversions write, `streams` files at a time."""
    start = time.perf_counter()
    written = _write_streams(work, nbytes, streams)
    return written / (time.perf_counter() - start) / 1e9


def measure_disk(src: Path, work: Path, streams: int) -> dict[str, float]:
    """One round of the disk's speeds (GB/s), each the best of the ways the converter could use
    it: cold read (page cache; O_DIRECT one file at a time; O_DIRECT `streams` files at once: the
    target is the disk, not one way of reading it) and fsync'd write (1 or `streams` files at
    once)."""
    size = sum(p.stat().st_size for p in src.glob("*.safetensors"))
    return {"read": max(disk_read(src), disk_read(src, direct=True), disk_read(src, direct=True, streams=streams)),
            "write": max(disk_write(work, size), disk_write(work, size, streams))}


def hash_speed(algo: str) -> float:
    """GB/s of one core hashing 16 MiB updates with the manifest's `algo` (io.HASHES)."""
    from v4hal.conversion import io

    data = memoryview(os.urandom(64 * 2**20))
    io.HASHES[algo](data)
    start = time.perf_counter()
    for _ in range(4):
        h = io.HASHES[algo]()
        for k in range(0, len(data), io.READ_CHUNK):
            h.update(data[k:k + io.READ_CHUNK])
    return 4 * len(data) / (time.perf_counter() - start) / 1e9


def previous_converter(rev: str, work: Path) -> dict[str, str]:
    """The environment that imports git revision `rev`'s v4hal instead of this one: its tree,
    extracted with `git archive`, laid out as the installed package is (each top-level folder is
    v4hal.<folder>) and put first on PYTHONPATH (before the editable install's finder)."""
    repo = Path(__file__).resolve().parent.parent
    tree, pkg = work / "previous" / rev / "tree", work / "previous" / rev / "pkg" / "v4hal"
    tree.mkdir(parents=True)
    archive = subprocess.run(["git", "-C", str(repo), "archive", rev], check=True, capture_output=True).stdout
    subprocess.run(["tar", "-x", "-C", str(tree)], input=archive, check=True)
    pkg.mkdir(parents=True)
    for entry in (tree / "v4hal").iterdir():
        (pkg / entry.name).symlink_to(entry)
    for folder in ("backends", "ops", "model", "conversion", "bench", "tools"):
        if (tree / folder).is_dir():
            (pkg / folder).symlink_to(tree / folder)
    return {**os.environ, "PYTHONPATH": str(pkg.parent)}


def hf_snapshot(src: Path, hub: Path) -> Path:
    """`src` laid out as a Hugging Face cache snapshot (blobs named by their sha256, hard links to
    src's files; the snapshot's symlinks lead to them): a source whose hashes are stated."""
    blobs, snapshot = hub / "models--bench--fp8" / "blobs", hub / "models--bench--fp8" / "snapshots" / ("0" * 40)
    blobs.mkdir(parents=True)
    snapshot.mkdir(parents=True)
    for p in sorted(src.iterdir()):
        with open(p, "rb") as f:
            digest = hashlib.file_digest(f, "sha256").hexdigest()
        os.link(p, blobs / digest)
        (snapshot / p.name).symlink_to(Path("..", "..", "blobs", digest))
    return snapshot


def stage_breakdown(src: Path, dst: Path, target: str, env: dict | None = None) -> dict:
    os.sync()
    evict(src)
    out = subprocess.run([sys.executable, "-c", STAGES, str(src), str(dst), target], check=True, capture_output=True, text=True,
                         env=env, cwd=src.parent)
    shutil.rmtree(dst)
    return json.loads(out.stdout.strip().splitlines()[-1])


def timed(cmd: list[str], root: Path, env: dict | None = None) -> dict:
    """One conversion in a fresh process, the source evicted first: process wall seconds,
    seconds after imports, CPU seconds (with its workers), peak RSS bytes of the process and of
    its largest worker, and the 1-minute load average just before it started."""
    os.sync()
    evict(root)
    load = os.getloadavg()[0]
    start = time.perf_counter()
    out = subprocess.run(cmd, check=True, capture_output=True, text=True, env={**(env or os.environ), "TQDM_DISABLE": "1"},
                         cwd=root.parent)  # not a checkout: its v4hal/ would shadow --previous
    seconds = time.perf_counter() - start
    result = json.loads(out.stdout.strip().splitlines()[-1])
    return {"seconds": seconds, "convert_s": result["convert_s"], "cpu_s": result.get("cpu_s"), "load": load,
            "rss": result["peak_rss_kb"] * 1024, "worker_rss": result.get("worker_rss_kb", 0) * 1024}


THREADS = {  # which thread runs each stage of the breakdown: a worker is as fast as its busiest one
    "hash of the source (thread)": "hash-in", "hash of the output (thread)": "hash-out",
    "write: O_DIRECT stage, or page cache + write-behind (thread)": "write",
    "read: O_DIRECT preadv (read-ahead thread)": "read"}


def cost_model(stage: dict, size: int, disk: dict[str, float], out_per_in: float, cores: int, workers: int) -> tuple[float, str]:
    """Predicted GB/s of input and the bound that sets it: the least of the disk's read speed, its
    write speed over the output bytes per input byte, the cores over the CPU seconds per GB, and
    the workers over the busiest thread's CPU seconds per GB (one worker's pipeline cannot go
    faster than its slowest stage)."""
    per_thread: dict[str, float] = {}
    for name, cpu in stage["cpu"].items():
        thread = THREADS.get(name, "main")
        per_thread[thread] = per_thread.get(thread, 0.0) + cpu / size * 1e9
    cpu_per_gb = stage["process_cpu"] / size * 1e9
    bounds = {"disk read": disk["read"], "disk write": disk["write"] / out_per_in, f"{cores} cores": cores / cpu_per_gb,
              f"{workers} worker pipeline(s)": workers / max(per_thread.values())}
    bound = min(bounds, key=bounds.get)
    return bounds[bound], bound


def _spread(disks: list[dict[str, float]], key: str) -> str:
    values = [d[key] for d in disks]
    return f"{statistics.median(values):.3f} ({min(values):.3f}-{max(values):.3f})"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dir", default="/tmp/v4hal-convert-bench")
    ap.add_argument("--layers", type=int, default=4, help="shards of one layer each (~0.58 GB of FP8)")
    ap.add_argument("--repeats", type=int, default=2, help="interleaved runs of each; the best is reported")
    ap.add_argument("--previous", metavar="REV", action="append", default=[], help="also time the converter of this git "
                    "revision (e.g. fd22c6a: sha256 manifests, one shard at a time); repeatable")
    ap.add_argument("--stages-only", action="store_true", help="only the stage breakdowns (this converter's and, with "
                    "--previous, that one's, interleaved, the least process CPU of --repeats each)")
    args = ap.parse_args(argv)
    work = Path(args.dir)
    shutil.rmtree(work, ignore_errors=True)
    src = work / "src"
    try:
        largest = synthesize(src, args.layers)
        size = sum(p.stat().st_size for p in src.glob("*.safetensors"))
        from v4hal.conversion.workers import default_workers

        n_default = default_workers()
        disks = [measure_disk(src, work, n_default)]
        speeds = {algo: hash_speed(algo) for algo in ("blake3", "sha256")}
        previous = {rev: previous_converter(rev, work) for rev in args.previous}
        torch_decode = {**os.environ, "V4HAL_CONVERT_KERNELS": "0"}  # the same converter without conversion/_kernels.c
        rows = []
        for target in () if args.stages_only else ("bf16", "w8a8"):
            stream = [sys.executable, "-c", STREAMING, "convert", "run", "--to", target, "--no-progress", str(src), str(work / "out")]
            runs = {"v4hal convert --workers 1": (stream + ["--workers", "1"], None),
                    "v4hal convert --workers 2": (stream + ["--workers", "2"], None),
                    f"v4hal convert (default --workers: {n_default})": (stream, None),
                    f"v4hal convert (default --workers: {n_default}), torch decode": (stream, torch_decode),
                    "naive (whole shard, load_file/save_file)": ([sys.executable, "-c", NAIVE, str(src), str(work / "out"), target], None)}
            runs.update({f"previous converter ({rev}, its defaults)": (stream, env) for rev, env in previous.items()})
            best: dict[str, dict] = {}
            for _ in range(args.repeats):  # interleaved, best of each: the machine is shared and noisy
                disks.append(measure_disk(src, work, n_default))  # the disk's speed drifts too: measured between rounds
                for how, (cmd, env) in runs.items():
                    run = timed(cmd, src, env)
                    shutil.rmtree(work / "out")
                    if how not in best or run["seconds"] < best[how]["seconds"]:
                        best[how] = run
            rows += [{"target": target, "how": how, **run} for how, run in best.items()]
        versions = {"this converter": (src, None),
                    "this converter, torch decode (V4HAL_CONVERT_KERNELS=0)": (src, torch_decode),
                    "this converter, source in a Hugging Face cache (hashes stated)": (hf_snapshot(src, work / "hub"), None),
                    **{f"previous converter ({rev})": (src, env) for rev, env in previous.items()}}
        stages: dict[tuple[str, str], dict] = {}
        for _ in range(args.repeats if args.stages_only else 1):
            for target in ("bf16", "w8a8"):
                for version, (source, env) in versions.items():
                    st = stage_breakdown(source, work / "out", target, env)
                    if (target, version) not in stages or st["process_cpu"] < stages[target, version]["process_cpu"]:
                        stages[target, version] = st
        from v4hal.bench.machine import describe

        disk = {k: statistics.median(d[k] for d in disks) for k in disks[0]}

        cores = len(os.sched_getaffinity(0))
        print(f"machine: {describe()}; {cores} cores available; load average now {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
        print(f"source: {size / 1e9:.2f} GB in {args.layers} shards, largest tensor {largest / 1e6:.0f} MB; best of {args.repeats}; "
              f"disk, median (min-max) of {len(disks)} rounds between the runs: sequential read (cold, the best of page cache "
              f"and O_DIRECT, one or {n_default} streams) {_spread(disks, 'read')} GB/s; sequential write (fsync'd, one or "
              f"{n_default} streams) {_spread(disks, 'write')} GB/s; "
              + ", ".join(f"{algo}: {gbps:.2f} GB/s per core" for algo, gbps in speeds.items()) + "\n")
        out_per_in = {"bf16": 2.0, "w8a8": 1.0}  # output bytes per input byte (FP8 weights dominate)
        print("\n| conversion | how | load before | process time (s) | GB/s of input | GB/s after start-up | share of disk read "
              "(after start-up) | CPU s per GB | peak RSS: process / largest worker (GB) | largest RSS / largest tensor |")
        print("|---|---|---|---|---|---|---|---|---|---|")
        for r in rows:
            peak = max(r["rss"], r["worker_rss"])
            cpu = f"{r['cpu_s'] / size * 1e9:.2f}" if r["cpu_s"] is not None else "-"
            worker = f"{r['worker_rss'] / 1e9:.2f}" if r["worker_rss"] else "-"
            gbps, steady = size / r["seconds"] / 1e9, size / r["convert_s"] / 1e9
            print(f"| FP8 -> {r['target'].upper()} | {r['how']} | {r['load']:.1f} | {r['seconds']:.1f} | {gbps:.3f} | {steady:.3f} | "
                  f"{gbps / disk['read']:.0%} ({steady / disk['read']:.0%}) | {cpu} | "
                  f"{r['rss'] / 1e9:.2f} / {worker} | {peak / largest:.1f}x |")
        for (target, version), st in stages.items():
            print(f"\nstages, {version}, FP8 -> {target.upper()}, one worker (fsync'd; {size / st['seconds'] / 1e9:.3f} GB/s in this instrumented run; "
                  f"process CPU {st['process_cpu'] / st['seconds']:.2f} cores on average, {st['process_cpu'] / size * 1e9:.2f} CPU s per GB):")
            print("| stage | CPU s per GB of input | wall s per GB of input |")
            print("|---|---|---|")
            for stage, c in sorted(st["cpu"].items(), key=lambda kv: -kv[1]):
                print(f"| {stage} | {c / size * 1e9:.2f} | {st['wall'][stage] / size * 1e9:.2f} |")
            for n in (1, 2):
                gbps, bound = cost_model(st, size, disk, out_per_in[target], cores, n)
                print(f"cost model, {n} worker(s) on {cores} idle cores: {gbps:.3f} GB/s of input ({gbps / disk['read']:.0%} of the disk read), "
                      f"bound by the {bound}")
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
