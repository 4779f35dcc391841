"""The measurements in docs/attention.md: one V4-Flash CSA attention layer (real dimensions,
random weights shared by both sides), v4hal vs transformers' DeepseekV4Attention.

  python -m v4hal.bench.attention_report prefill   # time + peak memory vs context, both, and a plot
  python -m v4hal.bench.attention_report decode    # decode-step time vs context (cpu_fast)

Each point runs in a fresh subprocess so its peak RSS (`ru_maxrss`) minus the RSS after the
weights are built is that point's working memory, whatever allocator the code uses. Threads are
fixed (`--threads`, default 1) for both sides: on a shared machine, OpenMP threads that spin on
busy cores distort timings far more than they help.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

import torch

LAYER = "compressed_sparse_attention"


def _rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize() / 2**20


def _peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _layer(dtype):
    from v4hal.bench.attention_layers import v4_pair  # noqa: PLC0415

    return v4_pair(LAYER, dtype=dtype)


def measure_prefill(impl: str, seq: int, dtype) -> dict:
    ours, _, run_ref = _layer(dtype)
    x = torch.randn(1, seq, ours.c.hidden, generator=torch.Generator().manual_seed(0)).to(dtype)
    pos = torch.arange(seq).view(1, seq)
    base = _rss_mb()
    start, cpu_start = time.perf_counter(), time.process_time()
    with torch.no_grad():
        out = ours(x, pos) if impl == "v4hal" else run_ref(x)
    seconds, cpu_seconds = time.perf_counter() - start, time.process_time() - cpu_start
    return {"impl": impl, "seq": seq, "seconds": seconds, "cpu_seconds": cpu_seconds, "peak_mb": _peak_mb() - base,
            "checksum": float(out.float().abs().mean())}


def _with_spare_rows(rows: torch.Tensor):
    """A cache `Rows` holding `rows` with the spare capacity a decoding cache has, so the timed
    step appends in place (as in a real decode) instead of paying a one-off regrowth."""
    from v4hal.model.cache import Rows  # noqa: PLC0415

    out = Rows()
    out.append(rows)
    return out


def _decode_cache(ours, ctx: int, dtype):
    """The cache a CSA layer holds after `ctx - 1` tokens (random contents): the decode step at
    position ctx - 1 closes a window, so compressor and indexer both emit an entry."""
    from v4hal import ops  # noqa: PLC0415

    c, g = ours.c, torch.Generator().manual_seed(1)
    t = (ctx - 1) // c.ratio
    open_tokens = (ctx - 1) % c.ratio

    def r(*shape):
        return torch.randn(*shape, generator=g).to(dtype)

    cache = ours.new_cache()
    cache.length = ctx - 1
    cache.raw = r(1, c.window - 1, c.head_dim)
    cache.compressed = _with_spare_rows(r(1, t, c.head_dim))
    cache.index_keys = _with_spare_rows(r(1, t, c.index_dim))
    cache.comp_state = ops.CompressState(r(1, open_tokens, 2 * c.head_dim), r(1, open_tokens, 2 * c.head_dim),
                                         r(1, c.ratio, c.head_dim), r(1, c.ratio, c.head_dim), t)
    cache.index_state = ops.CompressState(r(1, open_tokens, 2 * c.index_dim), r(1, open_tokens, 2 * c.index_dim),
                                          r(1, c.ratio, c.index_dim), r(1, c.ratio, c.index_dim), t)
    return cache


def measure_decode(ctx: int, dtype, steps: int = 5) -> dict:
    """Median decode-step CPU time (process time: robust to a loaded machine, one thread) at
    context `ctx`, split into the sparse attention call, the indexer's selection and the rest
    (projections, compressor, cache appends), plus the dense peer: plain SDPA over every cached
    row (window + all compressed entries)."""
    import copy  # noqa: PLC0415

    import torch.nn.functional as F  # noqa: PLC0415

    from v4hal import ops  # noqa: PLC0415

    ours, _, _ = _layer(dtype)
    base_cache = _decode_cache(ours, ctx, dtype)
    spent = {"sparse_attention": 0.0, "indexer_select": 0.0}
    originals = {name: getattr(ops, name) for name in spent}

    def timed(name):
        def call(*a, **k):
            t0 = time.process_time()
            out = originals[name](*a, **k)
            spent[name] += time.process_time() - t0
            return out
        return call

    for name in spent:
        setattr(ops, name, timed(name))
    x = torch.randn(1, 1, ours.c.hidden, generator=torch.Generator().manual_seed(2)).to(dtype)
    pos = torch.tensor([[ctx - 1]])
    rows = []
    try:
        with torch.no_grad():
            for i in range(steps + 1):
                cache = copy.copy(base_cache)  # the step appends to its rows: fresh ones each time
                cache.compressed = _with_spare_rows(base_cache.compressed.tensor)
                cache.index_keys = _with_spare_rows(base_cache.index_keys.tensor)
                for k in spent:
                    spent[k] = 0.0
                t0 = time.process_time()
                ours(x, pos, cache)
                total = time.process_time() - t0
                if i:  # the first step warms up
                    rows.append((total, spent["sparse_attention"], spent["indexer_select"]))
    finally:
        for name, fn in originals.items():
            setattr(ops, name, fn)
    rows.sort()
    total, attn, index = rows[len(rows) // 2]
    q = torch.randn(1, ours.c.heads, 1, ours.c.head_dim, dtype=dtype)
    kv = torch.cat([base_cache.raw, base_cache.compressed.tensor], 1).unsqueeze(1).expand(-1, ours.c.heads, -1, -1)
    dense = []
    for _ in range(steps + 1):
        t0 = time.process_time()
        F.scaled_dot_product_attention(q, kv, kv)
        dense.append(time.process_time() - t0)
    return {"ctx": ctx, "step_s": total, "attention_s": attn, "indexer_s": index, "rest_s": total - attn - index,
            "dense_sdpa_s": sorted(dense[1:])[len(dense[1:]) // 2], "compressed_entries": len(base_cache.compressed)}


def _point(args: list[str], threads: int) -> dict:
    cmd = [sys.executable, "-m", "v4hal.bench.attention_report", "point", "--threads", str(threads)] + args
    out = subprocess.run(cmd, check=True, capture_output=True, text=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def plot_prefill(rows: list[dict], path: Path) -> None:
    import matplotlib  # noqa: PLC0415

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # noqa: PLC0415

    fig, (ax_t, ax_m) = plt.subplots(1, 2, figsize=(11, 4.2))
    for impl, style in (("v4hal", "o-"), ("transformers", "s-"), ("transformers (extrapolated)", "s--")):
        pts = sorted((r for r in rows if r["impl"] == impl), key=lambda r: r["seq"])
        if pts:
            ax_t.plot([p["seq"] for p in pts], [p["cpu_seconds"] for p in pts], style, label=impl)
            ax_m.plot([p["seq"] for p in pts], [p["peak_mb"] for p in pts], style, label=impl)
    for ax, what in ((ax_t, "prefill CPU time (s, one thread)"), (ax_m, "peak working memory (MiB)")):
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("context length (tokens)")
        ax.set_ylabel(what)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend()
    fig.suptitle("V4-Flash CSA attention layer prefill, CPU: v4hal cpu_fast vs transformers DeepseekV4Attention")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def extrapolate(rows: list[dict], targets: list[int]) -> list[dict]:
    """transformers' eager CSA attention costs c + a*S (projections, compressor) + b*S^2 (scores
    and probabilities over S x (S + S/4) keys, several copies alive at once): fit that through
    its measured points (exact for three) and evaluate it at `targets`."""
    pts = sorted((r for r in rows if r["impl"] == "transformers"), key=lambda r: r["seq"])
    s = torch.tensor([float(p["seq"]) for p in pts], dtype=torch.float64)
    basis = torch.stack([torch.ones_like(s), s, s * s], 1)
    t = torch.tensor([float(x) for x in targets], dtype=torch.float64)
    out = [{"impl": "transformers (extrapolated)", "seq": x} for x in targets]
    for key in ("cpu_seconds", "peak_mb"):
        coef = torch.linalg.lstsq(basis, torch.tensor([p[key] for p in pts], dtype=torch.float64).unsqueeze(1)).solution
        for row, v in zip(out, (torch.stack([torch.ones_like(t), t, t * t], 1) @ coef).flatten().tolist()):
            row[key] = v
    return out


def replot(out: Path, targets: list[int]) -> list[dict]:
    """Redo the extrapolation and the plot from attention_prefill.json (measured rows kept; the
    plot and the fit use CPU time, which a loaded machine distorts far less than wall time)."""
    rows = [r for r in json.loads((out / "attention_prefill.json").read_text()) if "extrapolated" not in r["impl"]]
    rows += extrapolate(rows, targets)
    (out / "attention_prefill.json").write_text(json.dumps(rows, indent=1))
    plot_prefill(rows, out / "attention_prefill.png")
    return rows


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("what", choices=["prefill", "decode", "point", "replot"])
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--impl", default="v4hal")
    p.add_argument("--seq", type=int, default=1024)
    p.add_argument("--mode", default="prefill")
    p.add_argument("--ours", default="1024,2048,4096,8192,16384,32768")
    p.add_argument("--theirs", default="256,512,1024")
    p.add_argument("--contexts", default="8192,16384,32768,65536,131072")
    p.add_argument("--out", default="docs")
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)
    dtype = torch.float32
    if a.what == "point":
        print(json.dumps(measure_prefill(a.impl, a.seq, dtype) if a.mode == "prefill" else measure_decode(a.seq, dtype)))
        return
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    theirs_max = max(map(int, a.theirs.split(",")))
    targets = [s for s in map(int, a.ours.split(",")) if s > theirs_max]
    if a.what == "replot":
        for row in replot(out, targets):
            print(json.dumps(row))
    elif a.what == "prefill":
        rows = []
        for impl, seqs in (("transformers", a.theirs), ("v4hal", a.ours)):
            for s in map(int, seqs.split(",")):
                rows.append(_point(["--impl", impl, "--seq", str(s)], a.threads))
                print(json.dumps(rows[-1]), flush=True)
        (out / "attention_prefill.json").write_text(json.dumps(rows, indent=1))
        replot(out, targets)
    else:
        rows = []
        for ctx in map(int, a.contexts.split(",")):
            rows.append(_point(["--mode", "decode", "--seq", str(ctx)], a.threads))
            print(json.dumps(rows[-1]), flush=True)
        (out / "attention_decode.json").write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
