"""Figures for docs/distributed.md (measurements, not tests).

    python -m v4hal.bench.distributed make DIR [--bench-v4]   # a float32 checkpoint: bench-v4 with 64
                                                          # experts (memory), or bench-v4 itself (speed)
    python -m torch.distributed.run --nproc-per-node N -m v4hal.bench.distributed memory DIR --tp N [--ep N]
    python -m torch.distributed.run --nproc-per-node 2 -m v4hal.bench.distributed speed DIR
    python -m v4hal.bench.distributed comm                # computed: bytes per decode step per layout

`memory`: each rank's anonymous resident memory (what it allocated; mapped checkpoint pages are
page cache, counted apart) before building, at its peak while building and loading its slices
(sampled), and after, beside `v4hal plan`'s share; and VmHWM's growth, which includes mapped pages.
`speed`: bench-v4's prefill and decode at tp=1 (rank 0 alone, at 1 and 2 threads, the other rank
waiting) and at tp=2 (one thread per rank), in the same run. `comm`: what one decode step sends
per rank under each layout, from the model's collectives (model/collectives.py call sites).
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import torch
import torch.distributed as dist

from v4hal.bench.cases_model import BENCH_V4, hf_model
from v4hal.model.config import ModelArgs, preset
from v4hal.model.engram import EngramArgs
from v4hal.model.loader import load_checkpoint
from v4hal.model.model import build
from v4hal.model.parallel import Layout
from v4hal.model.plan import weight_bytes

MEMORY_MODEL = BENCH_V4.replace(n_routed_experts=64)  # ~0.5 GB in float32: well above the process's own


def _status() -> dict[str, int]:
    """VmHWM, VmRSS, RssAnon, RssFile of this process, bytes."""
    out = {}
    with open("/proc/self/status") as f:
        for line in f:
            key, _, value = line.partition(":")
            if key in ("VmHWM", "VmRSS", "RssAnon", "RssFile"):
                out[key] = int(value.split()[0]) * 1024
    return out


def make(directory: str, args: ModelArgs) -> None:
    hf_model(args, seed=0).save_pretrained(directory)
    print(f"wrote {directory}")


class _AnonPeak:
    """The largest RssAnon (anonymous resident memory: what the process itself allocated, not
    file pages it maps) seen while the block runs, sampled every 2 ms."""

    def __enter__(self):
        import threading

        self.peak, self.done = _status()["RssAnon"], threading.Event()

        def sample():
            while not self.done.wait(0.002):
                self.peak = max(self.peak, _status()["RssAnon"])

        self.thread = threading.Thread(target=sample, daemon=True)
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.done.set()
        self.thread.join()
        self.peak = max(self.peak, _status()["RssAnon"])


def memory(directory: str, layout: Layout) -> None:
    if layout.devices > 1:
        dist.init_process_group("gloo")
    args = ModelArgs.from_json(directory)
    before = _status()
    with _AnonPeak() as anon:
        model = build(args, layout=layout)
        load_checkpoint(model, directory, args)
    after = _status()
    share = sum(weight_bytes(args, layout).values())
    row = (before["RssAnon"], anon.peak, after["RssAnon"], after["VmHWM"] - before["VmHWM"], share)
    rows = [row] if layout.devices == 1 else [None] * layout.devices
    if layout.devices > 1:
        dist.all_gather_object(rows, row)
    mib = 2 ** 20
    if not layout.devices > 1 or dist.get_rank() == 0:
        print("| layout | rank | plan's share | anon before | anon peak while loading | peak - before - share | "
              "anon after | VmHWM growth (with mapped file pages) |\n|---|---|---|---|---|---|---|---|")
        for rank, (b, peak, after_anon, hwm, sh) in enumerate(rows):
            print(f"| {layout} | {rank} | {sh / mib:.0f} MiB | {b / mib:.0f} MiB | {peak / mib:.0f} MiB | "
                  f"{(peak - b - sh) / mib:+.0f} MiB | {after_anon / mib:.0f} MiB | {hwm / mib:.0f} MiB |")
    if layout.devices > 1:
        dist.destroy_process_group()


def _time(fn, repeats: int) -> float:
    fn()  # warm-up
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
    return best


def _speeds(model, prompt: int, context: int, steps: int) -> tuple[float, float]:
    """Seconds of a `prompt`-token prefill, and per decode step after a `context`-token prefill."""
    ids = torch.randint(0, model.args.vocab_size, (1, context), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        prefill = _time(lambda: model(ids[:, :prompt], cache=model.new_cache(), last_only=True), 2)
        cache = model.new_cache()
        for i in range(0, context, 1024):
            model(ids[:, i:i + 1024], cache=cache, last_only=True)
        step = ids[:, -1:]
        model(step, cache=cache)
        t = time.perf_counter()
        for _ in range(steps):
            model(step, cache=cache)
        return prefill, (time.perf_counter() - t) / steps


def speed(directory: str, prompt: int, context: int, steps: int) -> None:
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    args = ModelArgs.from_json(directory)
    rows = []
    if rank == 0:
        model = build(args)
        load_checkpoint(model, directory, args)
        for threads in (1, 2):
            torch.set_num_threads(threads)
            rows.append((f"tp=1, {threads} thread(s)", *_speeds(model, prompt, context, steps)))
        del model
    dist.barrier()
    torch.set_num_threads(1)
    model = build(args, layout=Layout(tp=2))
    load_checkpoint(model, directory, args)
    rows.append(("tp=2, 1 thread per rank", *_speeds(model, prompt, context, steps)))
    if rank == 0:
        print(f"| bench-v4 | prefill {prompt} tokens | decode step at {context} context |\n|---|---|---|")
        for name, pre, dec in rows:
            print(f"| {name} | {pre * 1e3:.0f} ms | {dec * 1e3:.1f} ms |")
    dist.destroy_process_group()


def collectives(args: ModelArgs, layout: Layout, context: int, tokens: int = 1,
                act_bytes: int = 2) -> list[tuple[str, int]]:
    """The collectives one rank joins in a forward of `tokens` tokens per rank that ends at
    `context` tokens of cache, in the order the model makes them (model/collectives.py call
    sites; what `collectives.recording()` lists): (kind, bytes of the whole message; for an
    all-gather the gathered result, for an all-to-all the rows sent). The embedding all-reduce
    (tp); V4.1 under data parallelism, every rank's token count and hashed Engram rows (int64)
    all-gathered; per layer the Engram exchanges (V4.1, `engram_collectives`), the indexer's score
    all-reduce (tp; V4 CSA layers: context/4 float32 scores per token; V4.1 index sources:
    context/ratio; V3.2: context), the attention output all-reduce, the MLP / MoE all-reduce (tp)
    or the MoE's token exchanges (ep with dp: every expert's row count, int64, rows out, rows back,
    assuming an even spread); the float32 logits all-gather (tp)."""
    h, tp, ep = args.hidden_size, layout.tp, layout.ep
    out = [("all_reduce", tokens * h * act_bytes)] if tp > 1 else []  # embedding
    engram_first, engram_layers = engram_collectives(args, layout, tokens, act_bytes)
    out += engram_first
    for i in range(args.num_hidden_layers):
        out += engram_layers.get(i, [])
        if tp > 1:
            keys = _indexed_keys(args, i, context)
            if keys:
                out.append(("all_reduce", tokens * keys * 4))  # indexer scores, before the attention
            out.append(("all_reduce", tokens * h * act_bytes))  # attention output
            out.append(("all_reduce", tokens * h * act_bytes))  # MLP / MoE
        elif ep > 1 and args.is_moe_layer(i):
            rows = tokens * args.num_experts_per_tok * h * act_bytes
            out += [("all_to_all", args.n_routed_experts * 8), ("all_to_all", rows), ("all_to_all", rows)]
    if tp > 1:
        out.append(("all_gather", tokens * args.vocab_size * 4))  # logits
    return out


def _indexed_keys(args: ModelArgs, layer: int, context: int) -> int:
    """Compressed entries (V3.2: tokens) `layer`'s indexer scores at `context`; 0 without an indexer."""
    if args.is_v41:
        return context // args.compress_ratio(layer) if layer in args.index_source_layer_ids else 0
    if args.is_v4:
        return context // 4 if args.compress_ratio(layer) == 4 else 0
    return context if args.is_v32 else 0


def engram_collectives(args: ModelArgs, layout: Layout, tokens: int,
                       act_bytes: int) -> tuple[list[tuple[str, int]], dict[int, list[tuple[str, int]]]]:
    """V4.1's Engram collectives (model/engram.py): (those made once before the layers, those of
    each Engram layer by layer id); none without Engram or in one process. The tables are split
    by hash columns over tp (or dp) ranks, `ceil(columns / n)` each (`ColumnShard`). Under tp, each Engram layer
    all-gathers its ranks' looked-up columns, then its column-parallel `kv_proj` outputs. Under dp
    (even token counts assumed), the forward first all-gathers every rank's token count and every
    layer's hashed rows; each layer then all-to-alls the looked-up columns of every rank's tokens
    back to their ranks."""
    n = layout.tp if layout.tp > 1 else layout.dp
    if not args.is_v41 or n == 1:
        return [], {}
    ea = EngramArgs(args)
    columns = -(-ea.columns // n) * ea.head_dim  # values per token from each rank's hash columns
    if layout.tp > 1:
        per_layer = [("all_gather", tokens * n * columns * act_bytes),
                     ("all_gather", tokens * (args.hc_mult + 1) * args.hidden_size * act_bytes)]
        return [], {i: per_layer for i in ea.layer_ids}
    first = [("all_gather", n * 8), ("all_gather", n * len(ea.layer_ids) * tokens * ea.columns * 8)]
    return first, {i: [("all_to_all", n * tokens * columns * act_bytes)] for i in ea.layer_ids}


def comm_bytes(args: ModelArgs, layout: Layout, context: int, tokens: int = 1, act_bytes: int = 2) -> tuple[int, int]:
    """(bytes one rank sends, collectives it joins) in one decode step (`collectives`): ring
    all-reduce sends 2 (n-1)/n of the message, all-gather (n-1)/n of the whole, all-to-all (n-1)/n
    of its rows (over the tp ranks, or the ep = dp ranks)."""
    calls = collectives(args, layout, context, tokens, act_bytes)
    n = layout.tp if layout.tp > 1 else layout.ep
    factor = {"all_reduce": 2 * (n - 1) / n, "all_gather": (n - 1) / n, "all_to_all": (n - 1) / n}
    sent = sum(factor[kind] * nbytes for kind, nbytes in calls)
    return int(sent), len(calls)


NVLINK_H100 = 450e9  # bytes/s per direction (900 GB/s bidirectional NVLink 4, NVIDIA's H100 product page)
ASCEND_910C = 400e9  # chip-to-chip, as reported (DigiTimes via TechPowerUp, 2025-04-21); per direction unstated


def comm_table(contexts=(8192, 131072)) -> str:
    """docs/distributed.md's communication table: one row per model, layout and context, or one
    for every context where they send the same (the layout names only its settings above 1)."""
    lines = ["| model | layout | context | bytes sent per rank per step | collectives | at 450 GB/s (NVLink) | "
             "at 400 GB/s (910C, reported) |", "|---|---|---|---|---|---|---|"]
    for name, lays in (("v4-flash", [Layout(tp=8), Layout(tp=8, ep=8), Layout(ep=8, dp=8)]),
                       ("v4.1-flash", [Layout(tp=8), Layout(tp=8, ep=8), Layout(ep=8, dp=8)]),
                       ("v4-pro", [Layout(tp=8, ep=8), Layout(tp=16, ep=16), Layout(ep=16, dp=16)]),
                       ("v3.2", [Layout(tp=8, ep=8), Layout(ep=8, dp=8)])):
        args = preset(name)
        for lay in lays:
            layout = " ".join(f"{k}={getattr(lay, k)}" for k in ("tp", "ep", "pp", "dp") if getattr(lay, k) > 1)
            rows = {context: comm_bytes(args, lay, context) for context in contexts}
            if len(set(rows.values())) == 1:
                rows = {" / ".join(f"{c // 1024}k" for c in contexts): rows[contexts[0]]}
            else:
                rows = {f"{c // 1024}k": r for c, r in rows.items()}
            for context, (sent, calls) in rows.items():
                lines.append(f"| {name} | {layout} | {context} | {sent / 2**20:.2f} MiB | {calls} | "
                             f"{sent / NVLINK_H100 * 1e6:.1f} µs | {sent / ASCEND_910C * 1e6:.1f} µs |")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="v4hal.bench.distributed", description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="what", required=True)
    mk = sub.add_parser("make")
    mk.add_argument("dir")
    mk.add_argument("--bench-v4", action="store_true")
    m = sub.add_parser("memory")
    m.add_argument("dir")
    m.add_argument("--tp", type=int, default=1)
    m.add_argument("--ep", type=int, default=1)
    s = sub.add_parser("speed")
    s.add_argument("dir")
    s.add_argument("--prompt", type=int, default=1024)
    s.add_argument("--context", type=int, default=4096)
    s.add_argument("--steps", type=int, default=16)
    sub.add_parser("comm")
    ns = p.parse_args(argv)
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    if ns.what == "make":
        make(ns.dir, BENCH_V4 if ns.bench_v4 else MEMORY_MODEL)
    elif ns.what == "memory":
        memory(ns.dir, Layout(tp=ns.tp, ep=ns.ep))
    elif ns.what == "speed":
        speed(ns.dir, ns.prompt, ns.context, ns.steps)
    else:
        print(comm_table())
    return 0


if __name__ == "__main__":
    sys.exit(main())
