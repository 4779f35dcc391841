"""`v4hal plan`: memory per device for a model, a context length and a parallel layout.

Arithmetic only (nothing is allocated). The layout is `model.parallel.Layout`, the one the running
model uses: `tp` splits attention heads, dense/shared MLPs and the vocabulary; `ep` splits the
routed experts (what `ep` leaves of a tp*dp group splits each expert's matrices); `pp` splits the
layers; `dp` replicates everything above and splits the batch. Devices = tp * dp * pp. V4's single
shared KV head and V3.2's MLA latent are not split by tp (each rank keeps the whole cache for its
sequences), as in DeepSeek's own inference code.

Weight bytes are exact element counts per device (`ModelArgs.parameter_groups`: what each layout
splits and what every rank holds whole, checked against the built model in
tests/test_plan_parallel.py) times each tensor's format: the checkpoint's FP8 e4m3 (1 byte + one
fp32 scale per 128x128 block) or MXFP4 routed experts for V4 (half a byte + one ue8m0 byte per 32),
norms / biases / router / embeddings / head in the model's dtype, FP32 mHC / sinks / position and
router biases, int64 hash tables. `--weights fp32`, `bf16` or `int8` plans a converted checkpoint
(int8 scales counted as for rows of 4096).
"""

from __future__ import annotations

import argparse
import os
from v4hal.model.config import PRESETS, PROJECTED, ModelArgs, human, load_args
from v4hal.model.engram import plan_bytes
from v4hal.model.parallel import Layout
from v4hal.ops import KV_LAYOUTS

BYTES = {"bf16": 2.0, "fp8": 1.0 + 4 / (128 * 128), "int8": 1.0 + 4 / 4096, "fp4": 0.5 + 1 / 32, "fp32": 4.0}


def parse_count(text: str) -> int:
    """'1M' -> 1048576, '128k' -> 131072, '4096' -> 4096."""
    t = text.strip().lower()
    mult = {"k": 1024, "m": 1024 ** 2, "g": 1024 ** 3}.get(t[-1:], 1)
    try:
        return int(float(t[:-1] if mult > 1 else t) * mult)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a count like 4096, 128k or 1M, got {text!r}") from None


PARTS = {"embed": "embed+head", "head": "embed+head", "attention": "attention", "routed_experts": "routed experts",
         "router": "router", "shared": "shared/dense mlp", "norms": "norms+mhc+tables", "mhc": "norms+mhc+tables",
         "hash_tables": "norms+mhc+tables"}


def element_bytes(args: ModelArgs, weights: str = "auto") -> dict[str, float]:
    """Bytes per element of each kind of `ModelArgs.parameter_groups` in the weight format
    `weights` (auto: the checkpoint's own)."""
    float_fmt = "fp32" if weights == "fp32" or weights == "auto" and args.torch_dtype == "float32" else "bf16"
    if weights == "auto":
        matrix_fmt = "fp8" if args.weight_quant == "fp8" else float_fmt
        expert_fmt = "fp4" if args.expert_dtype == "fp4" else matrix_fmt
    else:
        matrix_fmt = expert_fmt = weights
    return {"matrix": BYTES[matrix_fmt], "expert": BYTES[expert_fmt], "float": BYTES[float_fmt], "fp32": 4, "ids": 8}


def weight_bytes(args: ModelArgs, lay: Layout, weights: str = "auto") -> dict[str, float]:
    """Parameter (and buffer) bytes one device holds, by part: `ModelArgs.parameter_groups`, each
    group cut as `lay` cuts it (exact element counts; quantization scales are counted at their rate
    per element, exact for FP8 and MXFP4 where the matrix sides are multiples of 128). V4.1's
    Engram modules are apart: `engram_bytes`."""
    size = element_bytes(args, weights)
    split = {"tp": lay.tp, "experts": lay.expert_split, "whole": 1}
    out = dict.fromkeys(dict.fromkeys(PARTS.values()), 0.0)
    for part, how, kind, n in args.parameter_groups():
        out[PARTS[part]] += n // split[how] * size[kind]
    return {k: v / lay.pp for k, v in out.items()}


def stage_layers(args: ModelArgs, lay: Layout, stage: int) -> range:
    """The layers pipeline stage `stage` of `lay.pp` holds: contiguous, the first
    `num_hidden_layers % pp` stages one layer more than the rest."""
    per, extra = divmod(args.num_hidden_layers, lay.pp)
    start = stage * per + min(stage, extra)
    return range(start, start + per + (stage < extra))


def engram_bytes(args: ModelArgs, lay: Layout, weights: str = "auto", rank: int | None = None,
                 stage: int | None = None) -> tuple[float, float]:
    """V4.1: (device bytes of the Engram projections and gates, host bytes of the Engram tables)
    one device holds, in the format `weights`: those of the Engram layers of pipeline stage
    `stage`, the tables on rank `rank` of the tp * dp ranks splitting them by hash columns; None:
    the stage / rank holding the most table bytes. (0, 0) without Engram."""
    size = element_bytes(args, weights)
    stages = range(lay.pp) if stage is None else (stage,)
    return max((plan_bytes(args, size["matrix"], size["float"], lay.tp, lay.dp, rank, stage_layers(args, lay, s))
                for s in stages), key=lambda device_host: device_host[1])


def kv_row_bytes(args: ModelArgs, dim: int, rope: int, kv: str) -> int:
    """Cache bytes of one KV row of `dim` values, the last `rope` of them RoPE. fp8 is DeepSeek's
    sparse-FP8 layout (ops/kv_cache.py: V4 584 bytes for 448 + 64, V3.2 656 for 512 + 64); other
    dims (tiny models) take the same per-value rule without FlashMLA's padding. int8 (V3.2 / V3
    latents): the int8 layout, 656 bytes for 512 + 64 (int8 codes, BF16 RoPE, float32 scales)."""
    if kv == "bf16":
        return dim * 2
    lay = KV_LAYOUTS["int8" if kv == "int8" else "v4" if args.is_v4 else "v3.2"]
    nope = dim - rope
    if (nope, rope) == (lay.nope, lay.rope):
        return lay.token_bytes
    return nope + 2 * rope + -(-nope // lay.tile) * lay.scale_bytes


def index_key_bytes(args: ModelArgs, kv: str) -> float:
    """Indexer key bytes per entry: fp8 is e4m3 with one float32 scale per 128 values (the
    indexer's FP8 cache in DeepSeek's inference code); with the int8 cache they stay in BF16."""
    d = args.index_head_dim
    return d * 2 if kv in ("bf16", "int8") else d + 4 * -(-d // 128)


def kv_bytes_per_sequence(args: ModelArgs, context: int, kv: str = "bf16") -> dict[str, float]:
    """Cache bytes one sequence of `context` tokens holds, over all layers (kv: bf16, fp8, or
    int8 for V3.2 / V3)."""
    if kv not in ("bf16", "fp8", "int8"):
        raise ValueError(f"kv cache dtype must be bf16, fp8 or int8, got {kv!r}")
    if kv == "int8" and args.is_v4:
        raise ValueError("kv cache dtype int8 is for V3.2 / V3 (MLA latents) only; V4 takes bf16 or fp8")
    out = {"sliding window": 0.0, "compressed": 0.0, "indexer keys": 0.0, "compressor state": 0.0, "latent (MLA)": 0.0}
    for i in range(args.num_hidden_layers):
        if args.is_v4:
            d, r = args.head_dim, args.compress_ratio(i)
            row = kv_row_bytes(args, d, args.qk_rope_head_dim, kv)
            out["sliding window"] += min(context, args.sliding_window) * row
            if args.shares_compressed_caches:  # V4.1: caches and index keys held by their sources only
                if r and args.kv_source(i) == i:
                    out["compressed"] += (context // r) * row
                    out["compressor state"] += 2 * (r - 1) * d * BYTES["fp32"]  # ratio 2's open group
                    if i in args.index_source_layer_ids:
                        out["indexer keys"] += (context // r) * index_key_bytes(args, kv)
            elif r:
                out["compressed"] += (context // r) * row
                width = 2 if r == 4 else 1
                out["compressor state"] += 2 * r * width * d * BYTES["fp32"]  # open window's kv + gate
                if r == 4:
                    out["indexer keys"] += (context // r) * index_key_bytes(args, kv)
                    out["compressor state"] += 2 * r * 2 * args.index_head_dim * BYTES["fp32"]
        else:
            out["latent (MLA)"] += context * kv_row_bytes(args, args.kv_lora_rank + args.qk_rope_head_dim,
                                                          args.qk_rope_head_dim, kv)
            if args.is_v32:
                out["indexer keys"] += context * index_key_bytes(args, kv)
    return {k: v for k, v in out.items() if v}


def activation_bytes(args: ModelArgs, lay: Layout, chunk: int, context: int) -> dict[str, float]:
    """Peak transient memory of one prefill chunk of `chunk` tokens on one device (bf16, fp32
    softmax), the largest of the attention and the MoE sub-layer plus the residual streams."""
    h, heads = args.hidden_size, max(1, args.num_attention_heads // lay.tp)
    streams = chunk * h * (args.hc_mult if args.is_v4 else 1) * 2 * 2  # residual in and out
    if args.is_v4:
        keys = args.sliding_window + min(args.index_topk, context // 4) + context // 128
        # indexer scores are reduced over its heads as they are produced (lightning-indexer kernels)
        attn = chunk * heads * (2 * args.head_dim * 2 + keys * 4) + chunk * (context // 4) * 4
    else:
        keys = min(args.index_topk, context) if args.is_v32 else context
        attn = chunk * heads * (args.qk_head_dim * 2 * 2 + keys * 4 + args.v_head_dim * 2)
        if args.is_v32:
            attn += chunk * context * 4
    moe = chunk * args.num_experts_per_tok * (h * 2 + 3 * args.moe_intermediate_size * 2 / max(1, (lay.tp * lay.dp) // lay.ep))
    logits = chunk * args.vocab_size / lay.tp * 4
    return {"residual streams": streams, "attention (peak)": attn, "moe (peak)": moe, "logits": logits}


MILLION = 2 ** 20  # "1M" context, as --context parses it


def plan(args: ModelArgs, lay: Layout, context: int, batch: int = 1, chunk: int = 4096,
         weights: str = "auto", kv: str = "bf16") -> dict:
    lay.check(args)
    w = weight_bytes(args, lay, weights)
    engram_device, engram_host = engram_bytes(args, lay, weights)
    if engram_host:  # V4.1: projections on the device, tables in host memory (as vLLM keeps them)
        w["engram projections"] = engram_device
    per_seq = kv_bytes_per_sequence(args, context, kv)
    seqs_here = -(-batch // lay.dp)
    kv_dev = {k: v * seqs_here / lay.pp for k, v in per_seq.items()}
    act = activation_bytes(args, lay, min(chunk, context), context)
    act_peak = act["residual streams"] + max(act["attention (peak)"], act["moe (peak)"], act["logits"])
    total = sum(w.values()) + sum(kv_dev.values()) + act_peak
    million = sum(kv_bytes_per_sequence(args, MILLION, kv).values())
    return {"weights": w, "kv_cache": kv_dev, "host": {"engram tables": engram_host} if engram_host else {}, "activations": act, "activation_peak": act_peak,
            "total": total, "kv_dtype": kv, "kv_per_million": million, "layout": lay, "context": context, "batch": batch, "chunk": min(chunk, context)}


def random_model_bytes(args: ModelArgs, dtype_bytes: int) -> float:
    """Memory of a model built with random weights (every matrix dense at `dtype_bytes` per element),
    on one device: what `generate --preset` and `checkpoint` would allocate."""
    return sum(weight_bytes(args, Layout(), "bf16").values()) * dtype_bytes / BYTES["bf16"]


def available_memory() -> int | None:
    """Bytes the kernel says can be allocated without swapping (MemAvailable), or free pages where
    /proc/meminfo is absent; None if neither is known."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


def memory_shortfall(args: ModelArgs, dtype_bytes: int) -> str | None:
    """Why a random-weights model of `args` cannot be built here (both numbers), or None if it fits."""
    need, have = random_model_bytes(args, dtype_bytes), available_memory()
    if have is None or need <= have:
        return None
    return (f"a random-weights model of this size needs about {need / 2 ** 30:.1f} GiB "
            f"({dtype_bytes}-byte weights, per `v4hal plan`) but only {have / 2 ** 30:.1f} GiB of memory is "
            f"available; try --preset tiny, or plan it with `v4hal plan`")


def gib(x: float) -> str:
    return f"{x / 2 ** 30:9.2f} GiB"


def format_plan(name: str, args: ModelArgs, p: dict) -> str:
    lay: Layout = p["layout"]
    c = args.parameter_counts()
    lines = [f"{name}: {args.model_type}, {human(c['total'])} parameters ({human(c['active'])} active per token)"
             + ("  [PROJECTION: not a released model]" if name in PROJECTED else ""),
             f"layout: tp={lay.tp} ep={lay.ep} pp={lay.pp} dp={lay.dp} -> {lay.devices} device(s); "
             f"context {p['context']:,} tokens, batch {p['batch']}, prefill chunk {p['chunk']:,}",
             "", "per device:", "  weights"]
    lines += [f"    {k:<22}{gib(v)}" for k, v in p["weights"].items()]
    lines += [f"    {'= weights':<22}{gib(sum(p['weights'].values()))}", "  kv cache"]
    lines += [f"    {k:<22}{gib(v)}" for k, v in p["kv_cache"].items()]
    lines += [f"    {'= kv cache':<22}{gib(sum(p['kv_cache'].values()))}",
              f"    ({p['kv_dtype']}: one 1M-token sequence holds {gib(p['kv_per_million']).strip()}, "
              f"{p['kv_per_million'] / MILLION:,.0f} bytes per token over all layers)",
              "  activations (prefill chunk)"]
    lines += [f"    {k:<22}{gib(v)}" for k, v in p["activations"].items()]
    lines += [f"    {'= peak':<22}{gib(p['activation_peak'])}", f"  {'total':<24}{gib(p['total'])}"]
    if p["host"]:
        lines += ["", "host memory (per rank, the rank holding the most; outside the device total):"]
        lines += [f"    {k:<22}{gib(v)}" for k, v in p["host"].items()]
    return "\n".join(lines)


def add_arguments(p: argparse.ArgumentParser) -> None:
    from v4hal.subcommand import at_least

    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--preset", choices=sorted(PRESETS), help="a named configuration")
    src.add_argument("--config", help="a config.json (or a checkpoint directory holding one)")
    p.add_argument("--context", type=parse_count, default=parse_count("128k"), help="tokens per sequence (e.g. 1M)")
    p.add_argument("--batch", type=at_least(1), default=1, help="sequences in flight")
    p.add_argument("--chunk", type=parse_count, default=4096, help="prefill chunk (tokens per forward)")
    for flag in ("tp", "ep", "pp", "dp"):
        p.add_argument(f"--{flag}", type=at_least(1), default=1)
    p.add_argument("--weights", choices=["auto", "fp32", "bf16", "fp8", "int8", "fp4"], default="auto",
                   help="weight format (auto: the checkpoint's own)")
    p.add_argument("--kv-cache-dtype", "--kv-dtype", dest="kv_dtype", choices=["bf16", "fp8", "int8"], default="bf16",
                   help="cache format: bf16, fp8 (DeepSeek's sparse-FP8 layout, ops/kv_cache.py), or int8 "
                        "(V3.2 / V3 latents in the int8 layout Ascend's int8-KV kernel reads)")


def main(ns: argparse.Namespace) -> int:
    from v4hal.subcommand import error

    try:
        args = load_args(ns.config, ns.preset)
        p = plan(args, Layout(ns.tp, ns.ep, ns.pp, ns.dp), ns.context, ns.batch, ns.chunk, ns.weights, ns.kv_dtype)
    except ValueError as exc:  # ConfigError is one too
        return error("plan", str(exc))
    print(format_plan(ns.preset or ns.config, args, p))
    return 0
