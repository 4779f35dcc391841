"""Our model against transformers on configs the tests do not use (wider heads, more experts and
layers, sigmoid scoring, unnormalised top-k, no expert groups, other windows and compression rates,
bench-v4's realistic ratios): logits of a one-shot prefill and of every step of a cached prefill +
decode, from the same random weights (transformers' `save_pretrained`, read by our loader).

    OMP_NUM_THREADS=1 python -m v4hal.bench.logits_configs [--only NAME] [--seq 64] [--decode 8]

Prints one line per config (max abs error and cosine over all logits compared) and exits 1 when
any logit is outside the tests' tolerance (rtol = atol = 1e-4; a NaN never passes).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time

import torch

from v4hal.bench.cases_model import BENCH_V4, hf_model
from v4hal.model.config import ModelArgs, preset

TOL = dict(rtol=1e-4, atol=1e-4)
V4 = preset("tiny").to_dict()
V3 = dict(model_type="deepseek_v3", vocab_size=384, hidden_size=128, intermediate_size=160, moe_intermediate_size=48,
          num_hidden_layers=5, num_attention_heads=8, num_key_value_heads=8, q_lora_rank=64, kv_lora_rank=48,
          qk_nope_head_dim=24, qk_rope_head_dim=16, v_head_dim=32, n_routed_experts=16, num_experts_per_tok=4,
          n_group=4, topk_group=2, first_k_dense_replace=2, routed_scaling_factor=2.5, max_position_embeddings=2048,
          torch_dtype="float32")
CONFIGS = {
    # every V4 layer kind, twice as many heads / experts / layers as the tests, sigmoid scoring,
    # top-4 not renormalised, 8 o-groups, 2 mHC streams, window 16, compression 4 / 16
    "v4-wide-sigmoid": {**V4, "hidden_size": 128, "num_hidden_layers": 6, "num_attention_heads": 8, "head_dim": 64,
                        "q_lora_rank": 64, "o_groups": 8, "o_lora_rank": 16, "n_routed_experts": 16,
                        "num_experts_per_tok": 4, "scoring_func": "sigmoid", "norm_topk_prob": False,
                        "routed_scaling_factor": 2.0, "hc_mult": 2, "sliding_window": 16, "index_topk": 8,
                        "compress_rates": {"compressed_sparse_attention": 4, "heavily_compressed_attention": 16},
                        "layer_types": ["heavily_compressed_attention", "compressed_sparse_attention",
                                        "sliding_attention", "compressed_sparse_attention",
                                        "heavily_compressed_attention", "sliding_attention"],
                        "mlp_layer_types": ["hash_moe", "hash_moe", "moe", "moe", "moe", "moe"]},
    # top-1 routing, compression 2 / 4, index_topk above the candidates early on. (V4's scorers are
    # sigmoid and sqrtsoftplus only: transformers has no softmax router for V4. Its shared expert is
    # moe_intermediate_size wide whatever n_shared_experts says, ours n_shared_experts times that:
    # the same only for n_shared_experts = 1, as in every published V4 config.)
    "v4-top1": {**V4, "num_hidden_layers": 3, "num_experts_per_tok": 1, "index_topk": 12,
                        "compress_rates": {"compressed_sparse_attention": 2, "heavily_compressed_attention": 4},
                        "layer_types": ["compressed_sparse_attention", "heavily_compressed_attention",
                                        "compressed_sparse_attention"],
                        "mlp_layer_types": ["moe", "moe", "moe"]},
    "v32-wide": {**V3, "model_type": "deepseek_v32", "index_n_heads": 4, "index_head_dim": 32, "index_topk": 16},
    "v3-no-groups-unnormalised": {**V3, "n_group": 1, "topk_group": 1, "norm_topk_prob": False,
                                  "first_k_dense_replace": 0, "num_experts_per_tok": 3},
    "bench-v4": BENCH_V4.to_dict(),
}


def compare(name: str, seq: int, decode: int) -> tuple[bool, float, float]:
    """(within TOL everywhere, max abs error, cosine) of our logits against transformers' over a one-shot prefill of `seq`
    tokens and a cached prefill of `seq - decode` tokens followed by `decode` single-token steps."""
    from transformers import DynamicCache

    from v4hal.model.loader import load_checkpoint
    from v4hal.model.model import build

    hf = hf_model(ModelArgs.from_dict(CONFIGS[name]), seed=0)
    with tempfile.TemporaryDirectory() as tmp:
        hf.save_pretrained(tmp)
        args = ModelArgs.from_json(tmp)
        ours = build(args)
        load_checkpoint(ours, tmp, args)
    ids = torch.randint(0, args.vocab_size, (2, seq), generator=torch.Generator().manual_seed(1))
    pairs = []
    with torch.no_grad():
        pairs.append((ours(ids), hf(ids).logits))
        prompt = seq - decode
        cache, pkv = ours.new_cache(), DynamicCache(config=hf.config)
        pairs.append((ours(ids[:, :prompt], cache=cache), hf(ids[:, :prompt], past_key_values=pkv, use_cache=True).logits))
        for i in range(prompt, seq):
            step = ids[:, i:i + 1]
            pairs.append((ours(step, cache=cache), hf(step, past_key_values=pkv, use_cache=True).logits))
    got, want = (torch.cat([p[k].flatten() for p in pairs]).double() for k in (0, 1))
    ok = bool(torch.isclose(got, want, **TOL).all())  # a NaN is never close
    return ok, float((got - want).abs().max()), float(torch.nn.functional.cosine_similarity(got, want, dim=0))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--only", choices=list(CONFIGS), action="append")
    p.add_argument("--seq", type=int, default=64, help="tokens of the one-shot prefill (default 64)")
    p.add_argument("--decode", type=int, default=8, help="of which decoded one by one after a cached prefill")
    a = p.parse_args(argv)
    torch.set_num_threads(1)
    failed = 0
    for name in a.only or CONFIGS:
        start = time.perf_counter()
        ok, err, cos = compare(name, a.seq, a.decode)
        failed += not ok
        print(f"{name}: {'ok' if ok else 'FAILS (rtol = atol = 1e-4)'}, max abs err {err:.2e}, cosine {cos:.9f} "
              f"({time.perf_counter() - start:.0f} s)", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
