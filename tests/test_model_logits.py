"""The whole model against transformers' DeepseekV4ForCausalLM / DeepseekV32ForCausalLM /
DeepseekV3ForCausalLM: tiny random weights saved with `save_pretrained`, loaded through our loader,
logits compared for a one-shot prefill and for every step of a cached prefill + decode, and greedy
tokens compared with transformers' own `generate`.

Configs cover: all three V4 layer kinds mixed and all-CSA, hash-routed layers, V3.2/V3 group
routing and dense first layers, YaRN, sequences longer than the sliding window and than several
compression windows, and index_topk smaller than the number of candidates (so the indexer drops
entries)."""

import pytest
import torch
from transformers import DynamicCache

from v4hal.bench.cases_model import hf_model
from v4hal.model.config import ModelArgs, preset
from v4hal.model.generate import Sampling, generate
from v4hal.model.loader import load_checkpoint
from v4hal.model.model import build

V4_MIXED = preset("tiny").to_dict()
V4_ALL_CSA = {**V4_MIXED, "num_hidden_layers": 3, "layer_types": ["compressed_sparse_attention"] * 3,
              "mlp_layer_types": ["hash_moe", "hash_moe", "moe"], "sliding_window": 4, "index_topk": 2,
              "compress_rates": {"compressed_sparse_attention": 4, "heavily_compressed_attention": 16}}
MLA = dict(model_type="deepseek_v3", vocab_size=256, hidden_size=64, intermediate_size=96, moe_intermediate_size=32, num_hidden_layers=3,
           num_attention_heads=4, num_key_value_heads=4, q_lora_rank=32, kv_lora_rank=32, qk_nope_head_dim=16,
           qk_rope_head_dim=8, v_head_dim=16, n_routed_experts=8, num_experts_per_tok=2, n_group=4, topk_group=2,
           first_k_dense_replace=1, routed_scaling_factor=2.5, max_position_embeddings=1024, torch_dtype="float32",
           rope_parameters={"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0, "beta_fast": 32,
                            "beta_slow": 1, "original_max_position_embeddings": 256, "mscale": 1.0,
                            "mscale_all_dim": 1.0})
V32 = {**MLA, "index_n_heads": 8, "index_head_dim": 16, "index_topk": 6}
V3_WIDE = {**MLA, "hidden_size": 128, "moe_intermediate_size": 128, "intermediate_size": 128}  # whole FP8 blocks

CONFIGS = {
    "v4-mixed": ("deepseek_v4", V4_MIXED),
    "v4-all-csa-hash": ("deepseek_v4", V4_ALL_CSA),
    "v32-groups-dsa": ("deepseek_v32", V32),
    "v3-groups": ("deepseek_v3", MLA),
    "v3-wide": ("deepseek_v3", V3_WIDE),
}
TOL = dict(rtol=1e-4, atol=1e-4)


def make_pair(name: str, tmp_path, seed: int = 0):
    """(transformers model, our model loaded from its save_pretrained directory)."""
    model_type, cfg = CONFIGS[name]
    hf = hf_model(ModelArgs.from_dict({**cfg, "model_type": model_type}), seed)
    hf.save_pretrained(tmp_path)
    args = ModelArgs.from_json(tmp_path)
    ours = build(args)
    load_checkpoint(ours, tmp_path, args)
    return hf, ours


@pytest.mark.parametrize("name", list(CONFIGS))
def test_prefill_and_every_decode_step_match_transformers(name, tmp_path):
    hf, ours = make_pair(name, tmp_path)
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, ours.args.vocab_size, (2, 37), generator=g)  # > window, > 4 CSA / 2 HCA windows
    with torch.no_grad():
        torch.testing.assert_close(ours(ids), hf(ids).logits, **TOL)
        prompt = 13  # not a multiple of any compression ratio: decode crosses window boundaries
        cache, pkv = ours.new_cache(), DynamicCache(config=hf.config)
        torch.testing.assert_close(ours(ids[:, :prompt], cache=cache),
                                   hf(ids[:, :prompt], past_key_values=pkv, use_cache=True).logits, **TOL)
        for i in range(prompt, ids.shape[1]):
            step = ids[:, i:i + 1]
            torch.testing.assert_close(ours(step, cache=cache), hf(step, past_key_values=pkv, use_cache=True).logits,
                                       **TOL, msg=lambda m: f"decode step at position {i}: {m}")
        assert cache.length == ids.shape[1]


@pytest.mark.parametrize("name", ["v4-mixed", "v32-groups-dsa"])
def test_greedy_tokens_identical_to_transformers_generate(name, tmp_path):
    hf, ours = make_pair(name, tmp_path, seed=3)
    prompt = torch.randint(0, ours.args.vocab_size, (1, 11), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        ref = hf.generate(prompt, max_new_tokens=12, do_sample=False, eos_token_id=None, pad_token_id=0)
    got = generate(ours, prompt.tolist(), 12, Sampling(temperature=0.0))
    assert got.tokens[0] == ref[0, prompt.shape[1]:].tolist()


def test_mtp_layer_in_checkpoint_is_skipped(tmp_path):
    """DeepSeek checkpoints carry the MTP module as layer `num_hidden_layers`; it loads and is skipped."""
    hf, _ = make_pair("v32-groups-dsa", tmp_path)
    from safetensors.torch import load_file, save_file

    path = next(tmp_path.glob("*.safetensors"))
    tensors = load_file(path)
    extra = {k.replace("model.layers.2.", "model.layers.3."): v.clone() for k, v in tensors.items() if k.startswith("model.layers.2.")}
    save_file({**tensors, **extra}, path)
    args = ModelArgs.from_json(tmp_path)
    ours = build(args)
    report = load_checkpoint(ours, tmp_path, args)
    assert len(report.skipped) == len(extra)
    ids = torch.randint(0, args.vocab_size, (1, 9))
    with torch.no_grad():
        torch.testing.assert_close(ours(ids), hf(ids).logits, **TOL)
