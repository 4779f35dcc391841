"""The FP8 KV cache against the BF16 cache in whole models: greedy decode agreement and logits
(used by tests/test_kv_fp8_model.py with a budget), cache bytes, and the decode step's time.

    python -m v4hal.bench.kv_fp8 accuracy            # tiny V4 and V3.2, 64 greedy steps
    python -m v4hal.bench.kv_fp8 bytes               # per token and per 1M tokens: plan and real caches
    python -m v4hal.bench.kv_fp8 speed --context 16384 60000
    python -m v4hal.bench.kv_fp8 speed --compiled --synthetic --context 61440   # random rows, no prefill

The FP8 layouts are DeepSeek's, at the real attention widths (V4: head_dim 512 with 64 RoPE,
V3.2: kv_lora 512 with 64 RoPE, indexer keys 128): the models here keep every other size small.
"""

from __future__ import annotations

import argparse
import json
import time
from functools import partial

import torch

from v4hal import ops
from v4hal.bench.cases_model import BENCH_V4_FP8, TINY_V4_FP8, TINY_V32_FP8
from v4hal.model.cache_fp8 import FP8Rows
from v4hal.model.config import ModelArgs, preset
from v4hal.model.engram import random_token_map
from v4hal.model.generate import generate
from v4hal.model.model import build

ACCURACY_MODELS = {"tiny-v4": TINY_V4_FP8, "tiny-v32": TINY_V32_FP8}


@torch.inference_mode()
def accuracy(args: ModelArgs, steps: int = 64, prompt: int = 16, batch: int = 2, seed: int = 0,
             dtype: torch.dtype = torch.bfloat16, kind: str = "fp8") -> dict:
    """Greedy decode of `steps` tokens with the BF16 cache and with the FP8 cache (random weights,
    `seed`): how many generated tokens agree (and the first step that differs), and the logits of
    the FP8-cache model fed the BF16 run's tokens (teacher forcing, so every step compares the
    same context) against the BF16 run's: the worst step's max |diff| over the logits' max |value|
    and its relative RMS, and the share of steps whose argmax agrees. kind: the quantized cache
    ("fp8", or "int8" for V3.2 / V3); the result's keys say fp8 for either."""
    model = build(args, dtype=dtype).init_random(seed)
    if args.is_v41:  # random weights: a random Engram token map
        model.set_engram_token_map(random_token_map(args, seed))
    g = torch.Generator().manual_seed(seed + 1)
    prompts = torch.randint(0, args.vocab_size, (batch, prompt), generator=g).tolist()
    runs = {}
    for run in ("auto", kind):
        model.kv_cache_dtype = run
        runs["fp8" if run == kind else run] = generate(model, prompts, steps, keep_logits=True)
    ref_tokens = torch.tensor(runs["auto"].tokens)
    fp8_tokens = torch.tensor(runs["fp8"].tokens)
    differs = (ref_tokens != fp8_tokens).any(0).nonzero()
    forced = _teacher_forced(model, prompts, ref_tokens, kind)                # [B, steps, vocab]
    ref = torch.stack(runs["auto"].logits)                                    # [B, steps, vocab]
    diff = (forced - ref).abs()
    scale = ref.abs().amax(-1)
    rel_rms = (forced - ref).pow(2).mean(-1).sqrt() / ref.pow(2).mean(-1).sqrt()
    return {"steps": steps, "batch": batch, "prompt": prompt, "dtype": str(dtype).replace("torch.", ""),
            "token_agreement": float((ref_tokens == fp8_tokens).float().mean()),
            "first_differing_step": int(differs[0]) if len(differs) else None,
            "max_abs_over_max_logit": float((diff.amax(-1) / scale).max()),
            "max_rel_rms": float(rel_rms.max()), "mean_rel_rms": float(rel_rms.mean()),
            "argmax_agreement_forced": float((forced.argmax(-1) == ref.argmax(-1)).float().mean()),
            "cache_bytes": {k: r.cache_bytes for k, r in runs.items()}}


def _teacher_forced(model, prompts: list[list[int]], tokens: torch.Tensor, kind: str = "fp8") -> torch.Tensor:
    """Logits `[B, steps, vocab]` of the `kind`-cache model after each prompt + tokens[:, :i]."""
    model.kv_cache_dtype = kind
    cache = model.new_cache()
    out = [model(torch.tensor(prompts), cache=cache, last_only=True)[:, -1]]
    for i in range(tokens.shape[1] - 1):
        out.append(model(tokens[:, i:i + 1], cache=cache)[:, -1])
    return torch.stack(out, 1)


def _prefilled(args: ModelArgs, kind: str, context: int, dtype: torch.dtype, chunk: int = 1024):
    model = build(args, dtype=dtype, kv_cache_dtype=kind).init_random(0)
    ids = torch.randint(0, args.vocab_size, (1, context), generator=torch.Generator().manual_seed(0))
    cache = model.new_cache()
    with torch.inference_mode():
        for i in range(0, context, chunk):
            model(ids[:, i:i + chunk], cache=cache, last_only=True)
    return model, cache, ids[:, -1:]


def cache_bytes(context: int, dtype: torch.dtype = torch.float32) -> dict:
    """Bytes per token of the plan (V4-Flash, V4-Pro) and of bench-v4's real cache objects after a
    `context`-token prefill, with each cache dtype."""
    from v4hal.model.parallel import Layout
    from v4hal.model.plan import plan

    out = {}
    for name in ("v4-flash", "v4-pro"):
        for kv in ("bf16", "fp8"):
            p = plan(preset(name), Layout(), context=1 << 20, batch=1, kv=kv)
            out[f"plan {name} {kv}"] = {"per_token": p["kv_per_million"] / (1 << 20), "per_1m": p["kv_per_million"]}
    for kind in ("auto", "fp8"):
        _, cache, _ = _prefilled(BENCH_V4_FP8, kind, context, dtype)
        n = cache.nbytes()
        out[f"bench-v4 real widths {kind} ({str(dtype).replace('torch.', '')})"] = {
            "bytes": n, "per_token": n / context, "per_1m": n / context * (1 << 20)}
    return out


def speed(context: int, repeats: int, compiled: bool, dtype: torch.dtype = torch.float32,
          synthetic: bool = False) -> dict:
    """Median seconds of one decode step of bench-v4 at real widths after a `context`-token
    prefill, the compute-dtype cache and the FP8 cache taking turns (`speed.interleaved`): wall
    time, and the process's CPU time ("cpu_*": on a machine shared with other work, the time
    this process computed, whatever the scheduler gave the others). synthetic (compiled only):
    no long prefill; `_synthetic_decoder` fills the caches with random rows instead."""
    from v4hal.bench.speed import _stats, interleaved
    from v4hal.model.static import StaticDecoder

    if synthetic and not compiled:
        raise ValueError("kv_fp8 speed: --synthetic fills the static decoder's caches; it needs --compiled")
    steps, cpu = {}, {}
    for kind in ("auto", "fp8"):
        capacity = context + repeats + 8
        if synthetic:
            decoder, step = _synthetic_decoder(kind, context, capacity, dtype)
        elif compiled:
            model, cache, step = _prefilled(BENCH_V4_FP8, kind, context, dtype)
            decoder = StaticDecoder(model, cache, capacity=capacity)
        if compiled:
            decoder(step)  # compiles
            fn = partial(decoder, step)
        else:
            model, cache, step = _prefilled(BENCH_V4_FP8, kind, context, dtype)
            fn = partial(torch.inference_mode()(model), step, cache=cache)
        steps[kind], cpu[kind] = _cpu_timed(fn)
    walls = interleaved(steps, repeats)
    return {k: {**_stats(walls[k]), **{f"cpu_{n}": v for n, v in _stats(cpu[k][1:]).items()}} for k in steps}


def _synthetic_decoder(kind: str, context: int, capacity: int, dtype: torch.dtype, prompt: int = 1024):
    """A `StaticDecoder` as if `context` tokens had been prefilled, without the prefill: a real
    `prompt`-token prefill, then every compressed-entry and indexer-key slot up to `context`
    filled with standard normal rows (the rows are RMS-normed, weight 1, before RoPE: unit scale)
    and the length set to `context`. The compiled step's work is set by the buffers' sizes, not
    by the values; the logits are not a real model's at that context."""
    from v4hal.model.static import StaticDecoder

    model, cache, step = _prefilled(BENCH_V4_FP8, kind, prompt, dtype)
    decoder = StaticDecoder(model, cache, capacity=capacity)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for attn, layer in zip((m.self_attn for m in model.model.layers), decoder.cache.layers):
            if layer.entries:
                closed = context // attn.c.ratio  # entries `context` tokens have closed
                for store in (layer.rows, layer.index_keys):
                    if store is not None:
                        _fill(store, closed, g, dtype)
    decoder.cache.length = context
    return decoder, step
def _fill(store, rows: int, g: torch.Generator, dtype: torch.dtype, chunk: int = 4096) -> None:
    """Standard normal rows into entry slots [0, rows) of a static cache's buffer `[B, T, D]`,
    or of an `FP8Rows` (quantized, after its ring)."""
    if isinstance(store, FP8Rows):
        b, width = store.table.shape[0], ops.KV_LAYOUTS[store.layout].dim
        for i in range(0, rows, chunk):
            n = min(chunk, rows - i)
            positions = store.after_ring(torch.arange(i, i + n)).expand(b, n)
            store.write(positions, torch.randn(b, n, width, generator=g, dtype=dtype))
    else:
        store[:, :rows] = torch.randn(store.shape[0], rows, store.shape[2], generator=g, dtype=dtype)


def _cpu_timed(fn):
    """(fn that also appends its process CPU seconds per call to a list, that list)."""
    samples = []

    def run():
        start = time.process_time()
        fn()
        samples.append(time.process_time() - start)
    return run, samples


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("what", choices=["accuracy", "bytes", "speed"])
    p.add_argument("--context", type=int, nargs="+", default=[16384])
    p.add_argument("--repeats", type=int, default=10)
    p.add_argument("--compiled", action="store_true", help="speed: StaticDecoder steps (each compiles first)")
    p.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    p.add_argument("--synthetic", action="store_true",
                   help="speed --compiled: random cache rows instead of a long prefill (_synthetic_decoder)")
    ns = p.parse_args()
    dtype = getattr(torch, ns.dtype)
    t0 = time.perf_counter()
    if ns.what == "accuracy":
        for name, args in ACCURACY_MODELS.items():
            print(name, json.dumps(accuracy(args)), flush=True)
    elif ns.what == "bytes":
        for row, v in cache_bytes(ns.context[0], dtype).items():
            print(f"{row}: {v['per_token']:.1f} B/token, {v['per_1m'] / 2**30:.3f} GiB per 1M tokens", flush=True)
    else:
        for context in ns.context:
            r = speed(context, ns.repeats, ns.compiled, dtype, ns.synthetic)
            how = ("compiled" if ns.compiled else "eager") + (", synthetic cache" if ns.synthetic else "")
            print(f"context {context} ({how}, {ns.dtype}): " +
                  ", ".join(f"{k} {v['median_s'] * 1e3:.2f} ms (p10-p90 {v['p10_s'] * 1e3:.2f}-"
                            f"{v['p90_s'] * 1e3:.2f}; cpu {v['cpu_median_s'] * 1e3:.2f} ms)" for k, v in r.items()) +
                  f"; fp8 / auto = {r['fp8']['median_s'] / r['auto']['median_s']:.2f} wall, "
                  f"{r['fp8']['cpu_median_s'] / r['auto']['cpu_median_s']:.2f} cpu", flush=True)
    print(f"({time.perf_counter() - t0:.0f} s)")


if __name__ == "__main__":
    main()
