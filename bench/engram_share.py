"""What Engram's table lookups add to a V4.1 decode step and a 4k-token prefill, prefetched
(every layer's lookup started in a background thread before layer 0) against inline (each Engram
layer gathers its rows when it runs), with tables far larger than the last-level cache.

The share of a variant is `(t_variant - t_no_lookup) / t_variant`, where `t_no_lookup` runs the
same model with every layer's memory handed over ready (projections and gate still run; no hashing, no gather):
what hashing and lookups cost on the critical path. A small V4.1 (hidden 512, 4 layers, Engram
on layers 1 and 3, float8 tables with ue8m0 scales) keeps a 4k prefill within seconds on a CPU.

    python -m v4hal.bench.engram_share [--table-mib 512] [--repeats 3]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from v4hal.model.config import ModelArgs, preset
from v4hal.model.model import build


def bench_args(table_rows: int) -> ModelArgs:
    base = {k: v for k, v in preset("tiny").to_dict().items() if k not in ("model_type", "quantization_config")}
    base.update(vocab_size=8192, hidden_size=512, num_attention_heads=8, head_dim=64, q_lora_rank=256,
                o_lora_rank=256, moe_intermediate_size=256, n_routed_experts=8, sliding_window=128,
                compress_rates={"compressed_sparse_attention": 4, "heavily_compressed_attention": 128},
                index_topk=256, torch_dtype="float32")
    per_head = table_rows // 16
    base.update(engram_layer_ids=[1, 3], engram_num_embeddings=[table_rows + 65536] * 2, engram_max_ngram_size=3,
                engram_n_heads=8, engram_head_dim=64, engram_vocab_size=per_head, engram_compressed_vocab_size=6000,
                engram_pad_token_id=2,
                quantization_config={"quant_method": "fp8", "fmt": "e4m3", "weight_block_size": [128, 128]})
    return ModelArgs.from_dict({"model_type": "deepseek_v41", "text_config": base})


def _interleaved_ms(variants: dict, run, repeats: int) -> dict[str, float]:
    """Median ms of `run()` under each variant (a setup callable), the variants interleaved
    repeat by repeat so the load of this shared machine falls on all of them alike."""
    times: dict[str, list[float]] = {name: [] for name in variants}
    for setup in variants.values():  # warm every path once
        setup()
        run()
    for _ in range(repeats):
        for name, setup in variants.items():
            setup()
            start = time.perf_counter()
            run()
            times[name].append((time.perf_counter() - start) * 1e3)
    return {name: statistics.median(t) for name, t in times.items()}


def measure(table_mib: int = 512, repeats: int = 5, prefill: int = 4096) -> dict:
    rows = table_mib * 2**20 // 66  # float8 rows of 64 plus 2 scale bytes
    model = build(bench_args(rows), dtype=torch.float32).init_random(0)
    model.set_engram_token_map(torch.randint(0, 6000, (8192,), generator=torch.Generator().manual_seed(1)))
    hashing = model.model.engram_hashing
    ids = torch.randint(0, 8192, (1, prefill + 16 * (repeats + 1)), generator=torch.Generator().manual_seed(2))
    real_prepare = hashing.prepare

    def ready(input_ids, state, device, dtype, tables):  # memories precomputed: no lookup on the path
        key = (input_ids.shape[1], state is not None)
        if key not in cache_of:
            prefetch, hashing.prefetch = hashing.prefetch, False
            cache_of[key] = real_prepare(input_ids, None, device, dtype, tables)
            hashing.prefetch = prefetch
        return cache_of[key]

    cache_of: dict = {}

    def variant(prefetch: bool, prepare):
        def setup():
            hashing.prefetch, hashing.prepare = prefetch, prepare
        return setup

    variants = {"inline": variant(False, real_prepare), "prefetched": variant(True, real_prepare),
                "no lookup": variant(False, ready)}
    out = {}
    with torch.no_grad():
        out["prefill"] = _interleaved_ms(variants, lambda: model(ids[:, :prefill], last_only=True), repeats)
        cache = model.new_cache()
        model(ids[:, :prefill], cache=cache, last_only=True)
        # the next decode step each time (the context grows by a few tokens over the run)
        out["decode"] = _interleaved_ms(variants, lambda: model(ids[:, cache.length:cache.length + 1], cache=cache),
                                        4 * repeats)
    hashing.prepare = real_prepare
    out["table_bytes_per_layer"] = rows * 66
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--table-mib", type=int, default=512, help="each Engram layer's table, MiB")
    p.add_argument("--repeats", type=int, default=3, help="prefill repeats per variant (decode: 4x)")
    p.add_argument("--prefill", type=int, default=4096)
    ns = p.parse_args()
    r = measure(ns.table_mib, ns.repeats, ns.prefill)
    print(f"tables: 2 x {r['table_bytes_per_layer'] / 2**20:.0f} MiB (float8 + ue8m0)")
    for phase in ("decode", "prefill"):
        t = r[phase]
        base = t["no lookup"]
        shares = ", ".join(f"{v} {t[v]:.1f} ms ({(t[v] - base) / t[v]:+.1%})" for v in ("inline", "prefetched"))
        print(f"{phase}: no lookup {base:.1f} ms; {shares}")


if __name__ == "__main__":
    main()
