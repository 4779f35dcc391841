"""Prefill + decode with the model's KV cache (sliding rows, compressed entries, compressor and
indexer state), greedy or sampled, for a batch of prompts of any lengths; and `v4hal generate`.

Prompts of different lengths: the attention ops take no padding mask (V4's compressor windows are
tied to absolute positions, so left-padding would leak pad tokens into compressed entries), so
prompts are grouped by length and each group shares one batched cache; groups decode in turn.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections import defaultdict
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import torch
import torch.distributed as dist

from v4hal.model import launch
from v4hal.model.config import PRESETS, ModelArgs, human, load_args
from v4hal.model.parallel import Placement
from v4hal.model.static import StaticDecoder


@dataclass
class Sampling:
    """temperature 0 = greedy (argmax); else softmax(logits / temperature) restricted to the
    top_k most likely tokens (0 = all) and to the smallest set whose mass reaches top_p."""

    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int = 0


@dataclass
class GenerationResult:
    tokens: list[list[int]]                  # generated ids per prompt (prompt order)
    logits: list[torch.Tensor] = field(default_factory=list)  # per prompt [steps, vocab], if kept
    prefill_tokens: int = 0
    prefill_seconds: float = 0.0
    decode_steps: int = 0                    # batched decode forwards
    decode_seconds: float = 0.0
    compile_seconds: float = 0.0             # compiled decode: first steps (they compile), not in decode_*
    cache_bytes: int = 0

    @property
    def prefill_tokens_per_s(self) -> float:
        return self.prefill_tokens / self.prefill_seconds if self.prefill_seconds else 0.0

    @property
    def decode_ms_per_step(self) -> float:
        return 1e3 * self.decode_seconds / self.decode_steps if self.decode_steps else 0.0


def sample(logits: torch.Tensor, s: Sampling, generator: torch.Generator | None = None) -> torch.Tensor:
    """logits `[B, V]` -> token ids `[B]`."""
    if s.temperature <= 0:
        return logits.argmax(-1)
    logits = logits.float() / s.temperature
    if s.top_k:
        kth = logits.topk(min(s.top_k, logits.shape[-1]), -1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if s.top_p < 1.0:
        sorted_logits, order = logits.sort(-1, descending=True)
        mass = sorted_logits.softmax(-1).cumsum(-1)
        drop = mass - sorted_logits.softmax(-1) >= s.top_p  # keep the token that crosses top_p
        logits = logits.scatter(-1, order, sorted_logits.masked_fill(drop, float("-inf")))
    return torch.multinomial(logits.softmax(-1), 1, generator=generator).squeeze(-1)


@torch.inference_mode()
def generate(model, prompts: list[list[int]], max_new_tokens: int, sampling: Sampling = Sampling(),
             eos_token_id: int | None = None, keep_logits: bool = False, compile: bool = False) -> GenerationResult:
    """Generate up to `max_new_tokens` after each prompt; a sequence stops at `eos_token_id`.
    compile: decode with `StaticDecoder` (fixed shapes, one compiled graph per step; its first
    step per prompt group compiles and is timed apart, in compile_seconds)."""
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError("generate: every prompt needs at least one token")
    if max_new_tokens < 1:
        raise ValueError(f"generate: max_new_tokens must be >= 1, got {max_new_tokens}")
    vocab = model.args.vocab_size
    bad = [t for p in prompts for t in p if not 0 <= t < vocab]
    if bad:
        raise ValueError(f"generate: token ids must be in [0, {vocab}), got {bad[:5]}")
    device = next(model.parameters()).device
    gen = torch.Generator(device=device).manual_seed(sampling.seed)
    groups: dict[int, list[int]] = defaultdict(list)
    for i, p in enumerate(prompts):
        groups[len(p)].append(i)
    res = GenerationResult(tokens=[[] for _ in prompts], logits=[None] * len(prompts))
    for _, members in sorted(groups.items()):
        ids = torch.tensor([prompts[i] for i in members], device=device)
        cache = model.new_cache()
        t0 = time.perf_counter()
        logits = model(ids, cache=cache, last_only=True)[:, -1]
        res.prefill_seconds += time.perf_counter() - t0
        res.prefill_tokens += ids.numel()
        decode = (StaticDecoder(model, cache, capacity=ids.shape[1] + max_new_tokens) if compile
                  else partial(model, cache=cache))
        done = torch.zeros(len(members), dtype=torch.bool, device=device)
        kept = [[] for _ in members]
        for step in range(max_new_tokens):
            nxt = sample(logits, sampling, gen)
            for j, i in enumerate(members):
                if not done[j]:
                    res.tokens[i].append(int(nxt[j]))
                    if keep_logits:
                        kept[j].append(logits[j])
            if eos_token_id is not None:
                done |= nxt == eos_token_id
            if bool(done.all()) or step == max_new_tokens - 1:
                break
            t0 = time.perf_counter()
            logits = decode(nxt.unsqueeze(1))[:, -1]
            if compile and step == 0:
                res.compile_seconds += time.perf_counter() - t0
            else:
                res.decode_seconds += time.perf_counter() - t0
                res.decode_steps += 1
        res.cache_bytes += (decode.cache if compile else cache).nbytes()
        if keep_logits:
            for j, i in enumerate(members):
                res.logits[i] = torch.stack(kept[j])
    return res


# -- CLI -------------------------------------------------------------------------------------------

def add_arguments(p: argparse.ArgumentParser) -> None:
    from v4hal.subcommand import at_least

    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--config", help="config.json of a checkpoint (or its directory); needs --weights")
    src.add_argument("--preset", choices=sorted(PRESETS), help="a named configuration with random weights (demo)")
    p.add_argument("--weights", help="directory of safetensors shards (HF or DeepSeek naming, FP8/FP4 kept quantized)")
    p.add_argument("--prompt-ids", default="", help="comma-separated token ids; ';' separates prompts of a batch")
    p.add_argument("--prompt", help="text, tokenized with the tokenizer in --weights")
    p.add_argument("--prompt-len", type=at_least(1), default=24, help="random prompt length when no prompt is given")
    p.add_argument("--batch", type=at_least(1), default=2, help="random prompts when no prompt is given (lengths differ)")
    p.add_argument("--max-new-tokens", type=at_least(1), default=16)
    p.add_argument("--temperature", type=at_least(0.0, float), default=0.0, help="0 = greedy")
    p.add_argument("--top-k", type=at_least(0), default=0, help="0 = all tokens")
    p.add_argument("--top-p", type=_probability, default=1.0, help="in (0, 1]; 1 = all tokens")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--dtype", choices=["float32", "bfloat16"], help="compute dtype (default: the config's)")
    p.add_argument("--backend", help="V4HAL_BACKEND for this run (auto, cpu, cpu_fast, cuda, ascend, mindspore)")
    p.add_argument("--dequantize", action="store_true", help="dequantize FP8/FP4 weights on load")
    launch.add_arguments(p)
    p.add_argument("--compile", action="store_true",
                   help="decode at fixed shapes, each step one torch.compile graph (first step compiles)")
    p.add_argument("--engram-token-map", metavar="FILE",
                   help="V4.1: the Engram compressed token map (a tokenizer.json or an engram_token_map.json); "
                        "default: --weights' tokenizer.json, else its engram_token_map.json")
    p.add_argument("--kv-cache-dtype", choices=["bf16", "fp8", "int8"], default="bf16",
                   help="bf16: the cache in the compute dtype (--dtype); fp8: DeepSeek's FP8 layouts "
                        "(V4: 584 B per row, V3.2: 656 B, indexer keys 132 B; needs the real models' widths); "
                        "int8 (V3.2 / V3): latents as 512 int8 + 64 BF16 RoPE + 4 float32 scales, 656 B, "
                        "what Ascend's int8-KV attention kernel reads; indexer keys in the compute dtype")


def _probability(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = None
    if value is None or not 0 < value <= 1:
        raise argparse.ArgumentTypeError(f"expected a number in (0, 1], got {text!r}")
    return value


def parse_prompt_ids(text: str, vocab_size: int) -> list[list[int]]:
    """'0,42;7' -> [[0, 42], [7]]; ValueError naming --prompt-ids, what it expects and what came."""
    expected = f"comma-separated token ids in [0, {vocab_size}), ';' between prompts"
    prompts = []
    for part in text.split(";"):
        try:
            ids = [int(t) for t in part.split(",") if t.strip()]
        except ValueError:
            raise ValueError(f"--prompt-ids: expected {expected}, got {text!r}") from None
        bad = [t for t in ids if not 0 <= t < vocab_size]
        if not ids or bad:
            raise ValueError(f"--prompt-ids: expected {expected}, got {text!r}"
                             + (f" ({bad[:5]} out of range)" if bad else " (an empty prompt)"))
        prompts.append(ids)
    return prompts


def _prompts(ns: argparse.Namespace, args: ModelArgs) -> tuple[list[list[int]], object]:
    tokenizer = None
    if ns.prompt:
        if not ns.weights:
            raise ValueError("--prompt: needs --weights DIR holding a tokenizer")
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(ns.weights)
        return [tokenizer(ns.prompt)["input_ids"]], tokenizer
    if ns.prompt_ids:
        return parse_prompt_ids(ns.prompt_ids, args.vocab_size), None
    g = torch.Generator().manual_seed(ns.seed)
    return [torch.randint(0, args.vocab_size, (max(1, ns.prompt_len - 3 * i),), generator=g).tolist()
            for i in range(ns.batch)], None


def main(ns: argparse.Namespace) -> int:
    from v4hal.backends import registry
    from v4hal.subcommand import NO_RESOURCES, error
    from v4hal.model.config import ConfigError
    from v4hal.model.model import DTYPES
    from v4hal.model.plan import memory_shortfall

    if ns.backend:
        registry.configure(backend=ns.backend)
    if ns.config and not ns.weights:
        return error("generate", "--config needs --weights DIR (a folder of safetensors shards)")
    if ns.weights and not Path(ns.weights).is_dir():
        return error("generate", f"--weights: expected a folder of safetensors shards, got {ns.weights!r} "
                                 f"({'not a folder' if Path(ns.weights).exists() else 'no such path'})")
    try:
        args = load_args(ns.config, ns.preset)
        prompts, tokenizer = _prompts(ns, args)
    except (ConfigError, ValueError) as exc:
        return error("generate", str(exc))
    dtype = getattr(torch, ns.dtype) if ns.dtype else None
    if not ns.weights:
        shortfall = memory_shortfall(args, (dtype or DTYPES.get(args.torch_dtype, torch.float32)).itemsize)
        if shortfall:
            return error("generate", f"--preset {ns.preset}: {shortfall}", NO_RESOURCES)
    counts = args.parameter_counts()
    t0 = time.perf_counter()
    layout = launch.read_layout(ns)
    if layout.devices > 1 and not ns.weights:
        return error("generate", "--tp / --ep need --weights (random weights are not split consistently)")
    if layout.dp > 1:
        return error("generate", f"--ep {ns.ep} with --tp 1 (data-parallel ranks, each its own sequences) runs in "
                                 f"`v4hal parity` and `v4hal bench`; generate runs --tp N [--ep N]")
    device = registry.backend_module(registry.preferred_backend()).device()
    return launch.run("generate", ns, layout, device,
                      lambda placement: _run(ns, args, prompts, tokenizer, layout, placement, dtype, counts, t0))


def _run(ns, args, prompts, tokenizer, layout, placement: Placement | None, dtype, counts, t0) -> int:
    from v4hal.backends import registry
    from v4hal.subcommand import error
    from v4hal.model.engram import TOKEN_MAP_FILE, TOKENIZER_FILE, random_token_map
    from v4hal.model.loader import LoadError, load_checkpoint
    from v4hal.model.model import build

    device = placement.device if placement else "cpu"
    try:
        model = build(args, dtype, device, layout=layout, timeout_s=ns.dist_timeout,
                      kv_cache_dtype="auto" if ns.kv_cache_dtype == "bf16" else ns.kv_cache_dtype)
    except ValueError as exc:  # LayoutError; an FP8 cache at widths its layouts lack
        return error("generate", str(exc))
    if ns.weights:
        try:
            report = load_checkpoint(model, ns.weights, args, keep_quantized=not ns.dequantize,
                                     engram_token_map=ns.engram_token_map)
        except LoadError as exc:
            return error("generate", f"--weights {ns.weights}: {exc}")
        if args.is_v41 and report.engram_token_map is None:
            return error("generate", f"--weights {ns.weights}: V4.1's Engram needs the compressed token map, and the "
                                     f"folder holds neither a {TOKENIZER_FILE} nor an {TOKEN_MAP_FILE}; "
                                     f"pass --engram-token-map FILE")
        how = f"weights from {ns.weights}: {report.summary()}"
    else:
        model.init_random(ns.seed)
        how = f"random weights (seed {ns.seed})"
        if args.is_v41:
            model.set_engram_token_map(random_token_map(args, ns.seed))
            how += " and a random Engram token map"
    build_s = time.perf_counter() - t0
    kinds = ", ".join(f"{n}x {k}" for k, n in sorted(_count(args.layer_types).items()))
    print(f"model: {ns.preset or ns.config} ({args.model_type}), {human(counts['total'])} parameters, "
          f"{human(counts['active'])} active; {args.num_hidden_layers} layers: {kinds}; "
          f"{args.num_hash_layers} hash-routed; dtype {next(model.parameters()).dtype}")
    print(f"built in {build_s:.2f} s with {how}")
    print(f"backend: {registry.preferred_backend()} (V4HAL_BACKEND={registry.settings().backend})")
    with torch.inference_mode():  # first calls resolve backends and warm kernels: keep them out of the timing
        model(torch.tensor([prompts[0][:1]], device=device), cache=model.new_cache())
    sampling = Sampling(ns.temperature, ns.top_k, ns.top_p, ns.seed)
    if ns.compile:  # otherwise a minute or more passes without a word
        print("compiling the decode step (first step; can take a minute)…", file=sys.stderr, flush=True)
    res = generate(model, prompts, ns.max_new_tokens, sampling, eos_token_id=None if not ns.prompt else _eos(args),
                   compile=ns.compile)
    if layout.devices > 1:
        # as loaded: the checkpoint's own formats, or every matrix in the model's dtype
        fmt = "auto" if not (ns.dequantize or ns.dtype) else "fp32" if dtype == torch.float32 else "bf16"
        print(f"process group: {placement.backend}, {layout.devices} ranks")
        disagreement = _check_ranks_agree(model, res.tokens, lambda rank: planned_bytes(args, layout, fmt, rank),
                                          placement)
        if disagreement:
            return error("generate", disagreement)
    for i, (p, out) in enumerate(zip(prompts, res.tokens)):
        print(f"[{i}] prompt ({len(p)} tokens): {p if len(p) <= 32 else p[:16] + ['...'] + p[-8:]}")
        print(f"[{i}] generated: {out}")
        if tokenizer is not None:
            print(f"[{i}] text: {tokenizer.decode(out)}")
    mode = "greedy" if ns.temperature <= 0 else f"sampled (T={ns.temperature}, top_k={ns.top_k}, top_p={ns.top_p})"
    print(f"{mode}; prefill {res.prefill_tokens} tokens in {res.prefill_seconds * 1e3:.1f} ms "
          f"({res.prefill_tokens_per_s:.0f} tokens/s); decode {res.decode_steps} steps, "
          f"{res.decode_ms_per_step:.2f} ms/step; KV cache {res.cache_bytes / 2**10:.1f} KiB ({ns.kv_cache_dtype})")
    if ns.compile:
        print(f"compiled decode: first steps (compiling) took {res.compile_seconds:.1f} s, not counted above")
    by_backend: dict[str, list[str]] = defaultdict(list)
    for op, choice in sorted(registry.chosen().items()):
        by_backend[choice.backend].append(op)
    print("ops ran on: " + "; ".join(f"{b}: {', '.join(ops)}" for b, ops in by_backend.items()))
    fell = registry.fallbacks()
    if fell:
        print("ops that fell back to cpu: " + ", ".join(f"{op} ({c.reason})" for op, c in fell.items()))
    return 0


def planned_bytes(args: ModelArgs, layout, weights: str, rank: int) -> tuple[float, float]:
    """`v4hal plan`'s (device weight bytes, host bytes of V4.1's Engram tables) for rank `rank`
    of `layout`: the tables are split by hash columns, so ranks hold unequal shares."""
    from v4hal.model.plan import engram_bytes, weight_bytes

    device, host = engram_bytes(args, layout, weights, rank)
    return sum(weight_bytes(args, layout, weights).values()) + device, host


def _check_ranks_agree(model, tokens: list[list[int]], planned, placement: Placement) -> str | None:
    """Prints each rank's device and weight bytes beside `v4hal plan`'s prediction (`planned(rank)`:
    device bytes, host bytes); what differs if not every rank generated the same tokens."""
    mine = model.held_bytes()
    everyone = [None] * dist.get_world_size()
    dist.all_gather_object(everyone, (mine, tokens, placement.device))
    for rank, (held, toks, device) in enumerate(everyone):
        on_device, host = planned(rank)
        split = f" ({on_device:,.0f} device weights + {host:,.0f} Engram tables in host memory)" if host else ""
        print(f"rank {rank} on {device}: weights {held:,} bytes held ({held / 2**20:.2f} MiB), "
              f"plan predicts {on_device + host:,.0f}{split}")
        if toks != tokens:
            return f"rank {rank} generated other tokens than rank {dist.get_rank()}"
    return None


def _count(items: list[str]) -> dict[str, int]:
    out: dict[str, int] = defaultdict(int)
    for x in items:
        out[x] += 1
    return dict(out)


def _eos(args: ModelArgs) -> int | None:
    e = args.eos_token_id
    return e[0] if isinstance(e, list) else e
