"""Whole-model cases: parity of final logits between backends on tiny V4 / V3.2 configs (quick),
and speed of prefill (4k tokens) and decode (one step at 16k and 60k context; eager, and
compiled at fixed shapes by `model.static.StaticDecoder`) against transformers'
DeepseekV4ForCausalLM holding the same weights, on the small `BENCH_V4` config. The FP8 KV cache
(`kv_cache_dtype="fp8"`) has its own parity cases (tiny models) and decode cases (bench-v4, each
at DeepSeek's attention widths), judged against the float cache.

The models are built once per (config, dtype) from a fixed seed: the parity harness passes only
token ids and the dtype (float64 for the reference), so every backend sees the same weights.

Under torchrun (`distributed`, from `v4hal parity` / `v4hal bench --tp N [--ep N]`) every rank
writes the same seeded checkpoint to its own temporary folder (so each rank holds the whole random
model once, briefly, while saving it: fine at these sizes, and no rank depends on another's
disk) and loads only its layout's slices of it through the loader's per-rank path
(`model.parallel.shard`), as from a real checkpoint.
"""

from __future__ import annotations

import functools

import torch

from v4hal.bench.cases import Case, Distributed, SpeedCase, Tolerance
from v4hal.model.config import ModelArgs, preset

TINY_V32 = ModelArgs(model_type="deepseek_v32", vocab_size=256, hidden_size=64, num_hidden_layers=3,
                     num_attention_heads=4, num_key_value_heads=4, q_lora_rank=32, kv_lora_rank=32,
                     qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=16, intermediate_size=96,
                     moe_intermediate_size=32, n_routed_experts=8, num_experts_per_tok=2, n_group=4, topk_group=2,
                     first_k_dense_replace=1, index_n_heads=8, index_head_dim=16, index_topk=6,
                     max_position_embeddings=1024, torch_dtype="float32")

# Small enough for this 2-core CPU, every V4 feature at realistic ratios: sliding window 128,
# CSA ratio 4 with an indexer keeping 512 entries, HCA ratio 128, a hash layer, 4 mHC streams.
BENCH_V4 = ModelArgs(model_type="deepseek_v4", vocab_size=4096, hidden_size=512, num_hidden_layers=4,
                     num_attention_heads=8, head_dim=128, qk_rope_head_dim=32, q_lora_rank=256, o_groups=2,
                     o_lora_rank=256, moe_intermediate_size=256, intermediate_size=256, n_routed_experts=16,
                     num_experts_per_tok=2, index_n_heads=4, index_head_dim=64, index_topk=512,
                     layer_types=["sliding_attention", "compressed_sparse_attention", "heavily_compressed_attention",
                                  "compressed_sparse_attention"],
                     mlp_layer_types=["hash_moe", "moe", "moe", "moe"], max_position_embeddings=65536,
                     torch_dtype="float32")

# DeepSeek's attention widths, the only ones its FP8 KV cache layouts hold (model/cache_fp8.py):
# the tiny models at those widths, every other size small.
REAL_WIDTHS_V4 = dict(head_dim=512, qk_rope_head_dim=64, index_head_dim=128)
TINY_V4_FP8 = preset("tiny").replace(**REAL_WIDTHS_V4)
TINY_V32_FP8 = TINY_V32.replace(kv_lora_rank=512, qk_rope_head_dim=64, index_head_dim=128)

# bench-v4 at those widths, so its cache can be FP8.
BENCH_V4_FP8 = BENCH_V4.replace(**REAL_WIDTHS_V4)

CONFIGS = {"tiny-v4": preset("tiny"), "tiny-v32": TINY_V32, "bench-v4": BENCH_V4,
           "tiny-v4-fp8": TINY_V4_FP8, "tiny-v32-fp8": TINY_V32_FP8, "bench-v4-fp8": BENCH_V4_FP8}


HF_CLASSES = {"deepseek_v4": ("DeepseekV4Config", "DeepseekV4ForCausalLM"),
              "deepseek_v32": ("DeepseekV32Config", "DeepseekV32ForCausalLM"),
              "deepseek_v3": ("DeepseekV3Config", "DeepseekV3ForCausalLM")}


def hf_model(args: ModelArgs, seed: int = 0):
    """transformers' causal LM for `args`, random weights (`randomize` on top of its own init)."""
    import transformers as T

    config_cls, model_cls = (getattr(T, n) for n in HF_CLASSES[args.model_type])
    torch.manual_seed(seed)
    hf = model_cls(config_cls(**args.to_dict())).eval()
    randomize(hf, args, seed)
    return hf


def randomize(hf, args: ModelArgs, seed: int) -> None:
    """transformers initialises sinks, position biases, mHC bases, router biases and hash tables to
    zero / constants, and norms to one; give them values so a comparison can see them."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in hf.named_parameters():
            if any(k in name for k in ("sinks", "position_bias", ".base", "hc_base")):
                p.copy_(torch.randn(p.shape, generator=g) * 0.5)
            elif name.endswith("norm.weight") or name.endswith("layernorm.weight"):
                p.copy_(1 + 0.2 * torch.randn(p.shape, generator=g))
        for name, b in hf.named_buffers():
            if name.endswith("tid2eid"):
                b.copy_(torch.rand(b.shape[0], args.n_routed_experts, generator=g).argsort(-1)[:, : b.shape[1]])
            elif name.endswith("e_score_correction_bias"):
                b.copy_(torch.randn(b.shape, generator=g) * 0.1)


@functools.lru_cache(maxsize=4)
def checkpoint(name: str) -> str:
    """A directory holding transformers' save_pretrained of config `name` (random weights),
    kept for the life of the process."""
    import atexit
    import shutil
    import tempfile

    d = tempfile.mkdtemp(prefix=f"v4hal-{name}-")
    atexit.register(shutil.rmtree, d, True)
    hf_model(CONFIGS[name]).save_pretrained(d)
    return d


def model_for(name: str, dtype: torch.dtype = torch.float32, device: str = "cpu",
              distributed: Distributed | None = None):
    """Our model on `checkpoint(name)`'s weights, computing in `dtype` on `device`; under
    `distributed` (every rank calls this, in the same order), this rank's slices of them. Built
    once per distinct request however it is spelled (keywords or not)."""
    return _model(name, dtype, device, distributed)


@functools.lru_cache(maxsize=8)
def _model(name: str, dtype: torch.dtype, device: str, distributed: Distributed | None):
    from v4hal.model.loader import load_checkpoint
    from v4hal.model.model import build

    args = ModelArgs.from_json(checkpoint(name))
    if distributed is None:
        model = build(args, dtype)
    else:
        model = build(args, dtype, layout=distributed.layout, timeout_s=distributed.timeout_s)
    load_checkpoint(model, checkpoint(name), args)
    return model.to(device)


def hf_for(name: str, device: str = "cpu"):
    import transformers as T

    hf_cls = getattr(T, HF_CLASSES[CONFIGS[name].model_type][1])
    return hf_cls.from_pretrained(checkpoint(name), dtype=torch.float32).eval().to(device)


def _logits(name: str):
    def run(ids: torch.Tensor, dtype: torch.dtype, distributed: Distributed | None = None) -> torch.Tensor:
        model = model_for(name, dtype, str(ids.device), distributed)
        dp = 1 if distributed is None else distributed.layout.dp
        with torch.no_grad():
            if dp == 1:  # every rank runs every sequence; the model gathers the vocabulary's slices
                return model(ids)
            return _data_parallel(model, ids, dp)

    return run


def _data_parallel(logits_of, ids: torch.Tensor, dp: int) -> torch.Tensor:
    """`logits_of(ids)` with each of `dp` ranks (tp = 1: `Layout.check_runnable`) running its own
    share of the sequences, gathered in order on every rank."""
    import torch.distributed as dist

    from v4hal.model.collectives import Collectives

    if ids.shape[0] % dp:
        raise ValueError(f"model_logits: dp={dp} must divide the batch of {ids.shape[0]} sequences")
    per = ids.shape[0] // dp
    rank = dist.get_rank()
    return Collectives().all_gather(logits_of(ids[rank * per:(rank + 1) * per]), dim=0)


def _ids(name: str, length: int):
    def make(g: torch.Generator) -> dict:
        return dict(ids=torch.randint(0, CONFIGS[name].vocab_size, (2, length), generator=g), dtype=torch.float32)

    return make


def _reference(inputs: dict) -> dict:
    return {**inputs, "dtype": torch.float64}


def logits_case(name: str, length: int, quick: bool = False) -> Case:
    """Final logits of config `name` on 2 random sequences of `length` tokens, against float64."""
    return Case("model_logits", f"{name}/S{length}", _logits(name), _ids(name, length), Tolerance("close", 1e-4, 1e-4),
                quick=quick, reference_inputs=_reference, distributed=True, prepare=lambda: checkpoint(name))


def _cached_logits(name: str, prompt: int, kv_cache_dtype: str):
    """Logits `[B, S, vocab]` of a `prompt`-token prefill into a new cache of `kv_cache_dtype`,
    then one decode step per remaining token of ids (teacher forced)."""
    def run(ids: torch.Tensor, dtype: torch.dtype, distributed: Distributed | None = None) -> torch.Tensor:
        model = model_for(name, dtype, str(ids.device), distributed)

        def through_the_cache(ids: torch.Tensor) -> torch.Tensor:
            cache = model.new_cache(kv_cache_dtype)
            out = [model(ids[:, :prompt], cache=cache)]
            out += [model(ids[:, i:i + 1], cache=cache) for i in range(prompt, ids.shape[1])]
            return torch.cat(out, 1)

        dp = 1 if distributed is None else distributed.layout.dp
        with torch.no_grad():
            return through_the_cache(ids) if dp == 1 else _data_parallel(through_the_cache, ids, dp)

    return run


# The FP8 cache's logits against the float64 model's with the float cache, relative RMS per
# position: (median, worst) allowed. Measured 2026-12-07 (docs/attention.md, "Parity"): medians
# 0.04 (V4) and 0.035 (V3.2), the e4m3 rounding of the rows; worst 0.16 and 0.43, at positions
# where the FP8 keys move the indexer's top-k among near-tied scores (top-4 / top-6 here).
FP8_CACHE_BUDGET = {"tiny-v4-fp8": (0.06, 0.25), "tiny-v32-fp8": (0.06, 0.6)}


def _within_budget_of_the_float_cache(name: str, prompt: int):
    def check(ref: dict, out: dict, inputs: dict) -> tuple[bool, str]:
        exact = _cached_logits(name, prompt, "auto")(inputs["ids"], torch.float64)
        rms = (out["out"].double() - exact).pow(2).mean(-1).sqrt() / exact.pow(2).mean(-1).sqrt()
        got, budget = (float(rms.median()), float(rms.max())), FP8_CACHE_BUDGET[name]
        ok = got[0] <= budget[0] and got[1] <= budget[1]
        return ok, (f"vs the float cache: relative RMS per position median {got[0]:.3f}, worst {got[1]:.3f} "
                    f"(budget {budget[0]}, {budget[1]})")

    return check


def fp8_cache_case(name: str, prompt: int, length: int) -> Case:
    """Logits through the FP8 cache (a `prompt`-token prefill, then decode steps up to `length`)
    against the cpu reference's through its own FP8 cache in float64, and within a budget of the
    float cache's logits. The rows are rounded to BF16 then e4m3 on every backend, so a value at
    a rounding boundary may land one step apart from the reference's; hence the FP8 tolerance."""
    return Case("model_logits", f"{name}/fp8-cache/S{prompt}+{length - prompt}", _cached_logits(name, prompt, "fp8"),
                _ids(name, length), Tolerance("fp8", diff=1e-5), quick=True, reference_inputs=_reference,
                check=_within_budget_of_the_float_cache(name, prompt), distributed=True,
                prepare=lambda: checkpoint(name))


PARITY = [logits_case(name, length, quick=True) for name, length in (("tiny-v4", 37), ("tiny-v32", 21))] + [
    fp8_cache_case(name, 11, 24) for name in ("tiny-v4-fp8", "tiny-v32-fp8")]


def _prefill(tokens: int):
    def make(device: torch.device, distributed: Distributed | None = None):
        ours = model_for("bench-v4", device=str(device), distributed=distributed)
        hf = hf_for("bench-v4", str(device))
        ids = torch.randint(0, BENCH_V4.vocab_size, (1, tokens), generator=torch.Generator().manual_seed(0)).to(device)

        def run_ours():
            with torch.no_grad():
                return ours(ids, cache=ours.new_cache(), last_only=True)

        def run_hf():
            from transformers import DynamicCache

            with torch.no_grad():
                return hf(ids, past_key_values=DynamicCache(config=hf.config), use_cache=True, logits_to_keep=1).logits

        return run_ours, {"transformers eager": run_hf}

    return make


def _our_step(model, ids: torch.Tensor, kv_cache_dtype: str, compiled: bool, device: torch.device, chunk: int):
    """(our decode step of ids' last token, the eager step) after a prefill of ids in `chunk`s into
    a new cache of `kv_cache_dtype`; compiled: the step is `StaticDecoder`'s (its first call, in
    the warm-up, compiles; uncompiled on meta), with room for every timed call."""
    from v4hal.model.static import StaticDecoder

    cache = model.new_cache(kv_cache_dtype)
    with torch.no_grad():
        for i in range(0, ids.shape[1], chunk):
            model(ids[:, i:i + chunk], cache=cache, last_only=True)
    step = ids[:, -1:]

    def run_eager():
        with torch.no_grad():
            return model(step, cache=cache)

    if not compiled:
        return run_eager, run_eager
    decoder = StaticDecoder(model, cache, capacity=ids.shape[1] + 2048, compile=device.type != "meta")
    return (lambda: decoder(step)), run_eager


def decode(context: int, compiled: bool = False, chunk: int = 1024, kv_cache_dtype: str = "auto"):
    """One decode step after a `context`-token prefill, against transformers' (compiled: ours is
    `StaticDecoder`'s, and our eager step is a peer too). kv_cache_dtype "fp8": bench-v4 at
    DeepSeek's attention widths (what the FP8 layouts hold) with the FP8 cache, against the same
    model's step with the float cache (transformers is not run)."""
    def make(device: torch.device, distributed: Distributed | None = None):
        from transformers import DynamicCache

        fp8 = kv_cache_dtype == "fp8"
        ours = model_for("bench-v4-fp8" if fp8 else "bench-v4", device=str(device), distributed=distributed)
        ids = torch.randint(0, BENCH_V4.vocab_size, (1, context), generator=torch.Generator().manual_seed(0)).to(device)
        run, run_eager = _our_step(ours, ids, kv_cache_dtype, compiled, device, chunk)
        # The Ascend dry run builds cases on the meta device and never runs peers; transformers'
        # float32 grouped-GEMM experts have no meta kernel, so its cache is not filled there.
        if device.type == "meta":
            return run, {}
        peers = {"v4hal eager": run_eager} if compiled else {}
        if fp8:
            peers["v4hal float cache"] = _our_step(ours, ids, "auto", compiled, device, chunk)[0]
            return run, peers
        hf, step = hf_for("bench-v4", str(device)), ids[:, -1:]
        pkv = DynamicCache(config=hf.config)
        with torch.no_grad():
            for i in range(0, context, chunk):  # chunked prefill keeps transformers' masks small
                hf(ids[:, i:i + chunk], past_key_values=pkv, use_cache=True, logits_to_keep=1)

        def run_hf():
            with torch.no_grad():
                return hf(step, past_key_values=pkv, use_cache=True).logits

        return run, {"transformers eager": run_hf, **peers}

    return make


def _model_case(op: str, config: str, name: str, make, quick: bool = False) -> SpeedCase:
    return SpeedCase(op, f"{config}/{name}", make, quick=quick, distributed=True, prepare=lambda: checkpoint(config))


SPEED = [
    _model_case("model_prefill", "bench-v4", "4k", _prefill(4096)),
    _model_case("model_decode", "bench-v4", "16k-context", decode(16384)),
    _model_case("model_decode", "bench-v4", "16k-context/compiled", decode(16384, compiled=True)),
    # Near the config's 64k position limit: where attending only the selected entries pays off.
    _model_case("model_decode", "bench-v4", "60k-context", decode(61440)),
    _model_case("model_decode", "bench-v4", "60k-context/compiled", decode(61440, compiled=True)),
    # The FP8 KV cache (bench-v4 at DeepSeek's attention widths) against the float cache.
    *[_model_case("model_decode", "bench-v4-fp8", f"{k}-context/fp8-cache{'/compiled' if compiled else ''}",
                  decode(n, compiled=compiled, kv_cache_dtype="fp8"))
      for k, n in (("16k", 16384), ("60k", 61440)) for compiled in (False, True)],
    _model_case("model_prefill", "bench-v4", "256", _prefill(256), quick=True),
]
