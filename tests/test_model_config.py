"""ModelArgs from HF config.json files (transformers-written and DeepSeek-style legacy keys),
presets, parameter counts against the published totals, and `v4hal plan`."""

import json

import pytest
import transformers as T

from v4hal.cli import main as cli
from v4hal.model import plan as planmod
from v4hal.model.config import PRESETS, ConfigError, ModelArgs, preset

HF_CONFIGS = {"deepseek_v4": T.DeepseekV4Config, "deepseek_v32": T.DeepseekV32Config, "deepseek_v3": T.DeepseekV3Config,
              "deepseek_v41": T.DeepseekV4Config}  # V4.1: V4 plus engram_* keys (transformers has no V4.1 yet)


def _roundtrip(hf_config, tmp_path) -> ModelArgs:
    hf_config.save_pretrained(tmp_path)
    return ModelArgs.from_json(tmp_path)


def test_v4_defaults_read_back_from_transformers_config(tmp_path):
    hf = T.DeepseekV4Config()
    a = _roundtrip(hf, tmp_path)
    assert a.model_type == "deepseek_v4" and a.is_v4
    for key in ("hidden_size", "num_hidden_layers", "num_attention_heads", "head_dim", "q_lora_rank", "o_groups",
                "o_lora_rank", "n_routed_experts", "num_experts_per_tok", "moe_intermediate_size", "index_topk",
                "index_n_heads", "index_head_dim", "sliding_window", "hc_mult", "hc_sinkhorn_iters",
                "qk_rope_head_dim", "compress_rates", "layer_types", "mlp_layer_types", "scoring_func",
                "routed_scaling_factor", "swiglu_limit", "compress_rope_theta"):
        assert getattr(a, key) == getattr(hf, key), key
    assert a.rope_parameters["compress"]["rope_theta"] == 160000.0
    assert a.num_hash_layers == 3
    assert a.compress_ratio(0) == 128 and a.compress_ratio(3) == 4


@pytest.mark.parametrize("model_type", ["deepseek_v32", "deepseek_v3"])
def test_mla_configs_read_back(model_type, tmp_path):
    hf = HF_CONFIGS[model_type](num_hidden_layers=5, first_k_dense_replace=2,
                                rope_parameters={"rope_type": "yarn", "rope_theta": 10000.0, "factor": 40.0,
                                                 "original_max_position_embeddings": 4096, "mscale": 1.0,
                                                 "mscale_all_dim": 1.0, "beta_fast": 32, "beta_slow": 1})
    a = _roundtrip(hf, tmp_path)
    assert a.mlp_layer_types == ["dense", "dense", "sparse", "sparse", "sparse"]
    assert (a.n_group, a.topk_group, a.num_experts_per_tok, a.scoring_func) == (8, 4, 8, "sigmoid")
    assert a.rope_parameters["rope_type"] == "yarn" and a.rope_parameters["factor"] == 40.0
    assert a.qk_head_dim == 192 and a.kv_lora_rank == 512
    assert a.is_v32 == (model_type == "deepseek_v32")


def test_deepseek_legacy_keys_fold_like_transformers(tmp_path):
    """DeepSeek's own config.json spells layer kinds as per-layer ratios and ships num_hash_layers."""
    legacy = {"model_type": "deepseek_v4", "num_hidden_layers": 4, "compress_ratios": [0, 4, 128, 4, 0],
              "num_hash_layers": 2, "compress_rate_hca": 64, "qk_rope_head_dim": 64,
              "rope_scaling": {"type": "yarn", "factor": 16, "original_max_position_embeddings": 65536},
              "quantization_config": {"quant_method": "fp8", "weight_block_size": [128, 128]},
              "expert_dtype": "fp4"}
    (tmp_path / "config.json").write_text(json.dumps(legacy))
    a = ModelArgs.from_json(tmp_path)
    ours = [a.compress_ratio(i) for i in range(4)]
    hf = T.DeepseekV4Config(**{k: v for k, v in legacy.items() if k not in ("model_type", "rope_scaling")},
                            rope_parameters={"rope_type": "yarn", "factor": 16, "original_max_position_embeddings": 65536})
    assert a.layer_types == hf.layer_types and a.mlp_layer_types == hf.mlp_layer_types
    assert ours == [0, 4, 64, 4]  # the trailing ratio belongs to the MTP layer
    assert a.rope_parameters["compress"]["rope_type"] == "yarn"
    assert a.rope_parameters["compress"]["attention_factor"] == 1.0
    assert a.weight_quant == "fp8" and a.expert_dtype == "fp4"


def test_to_dict_builds_the_transformers_config():
    for name in PRESETS:
        a = preset(name)
        if a.shares_compressed_caches:  # V4.1's c1 / c2 layers: transformers has no V4.1 (docs/engram.md)
            continue
        hf = HF_CONFIGS[a.model_type](**a.to_dict())
        assert hf.num_hidden_layers == a.num_hidden_layers and hf.hidden_size == a.hidden_size


@pytest.mark.parametrize("name,total,active", [("v4-flash", 284e9, 13e9), ("v4-pro", 1.6e12, 49e9), ("v3.2", 671e9, 37e9)])
def test_preset_parameter_counts_match_published_totals(name, total, active):
    c = preset(name).parameter_counts()
    assert abs(c["total"] - total) / total < 0.03, c["total"]
    assert abs(c["active"] - active) / active < 0.07, c["active"]


def test_released_presets_scale_fp8_activations_in_ue8m0_and_tiny_in_fp32():
    assert {name: preset(name).act_scale_fmt for name in ("v4-flash", "v4-pro", "v3.2", "tiny")} == \
        {"v4-flash": "ue8m0", "v4-pro": "ue8m0", "v3.2": "ue8m0", "tiny": "fp32"}


def test_projection_preset_is_about_a_trillion_with_top16():
    a = preset("v4-1t")
    assert a.num_experts_per_tok == 16
    assert 0.9e12 < a.parameter_counts()["total"] < 1.2e12


@pytest.mark.parametrize("bad,msg", [({"model_type": "llama"}, "model_type"),
                                     ({"model_type": "deepseek_v4", "num_hidden_layers": 2, "layer_types": ["full"] * 2}, "layer_types"),
                                     ({"model_type": "deepseek_v4", "num_hidden_layers": 3, "mlp_layer_types": ["moe"]}, "mlp_layer_types"),
                                     ({"model_type": "deepseek_v4", "num_hidden_layers": 2, "compress_ratios": [0, 7]}, "compress_ratios"),
                                     ({"model_type": "deepseek_v32", "n_routed_experts": 10, "n_group": 3}, "n_group"),
                                     ({"model_type": "deepseek_v32", "quantization_config": {"scale_fmt": "e8m0"}},
                                      "quantization_config.scale_fmt"),
                                     ({"model_type": "deepseek_v4", "hc_sinkhorn_iters": 1e9},
                                      r"hc_sinkhorn_iters: expected an int in \[1, 100\], got 1000000000.0"),
                                     ({"model_type": "deepseek_v4", "hc_sinkhorn_iters": 101}, "hc_sinkhorn_iters"),
                                     ({"model_type": "deepseek_v4", "hidden_size": 0}, "hidden_size"),
                                     ({"model_type": "deepseek_v4", "vocab_size": 1 << 40}, "vocab_size"),
                                     ({"model_type": "deepseek_v4", "num_hidden_layers": "4"}, "num_hidden_layers"),
                                     ({"model_type": "deepseek_v4", "rms_norm_eps": 0}, r"rms_norm_eps: expected a float in \(0, 1\)"),
                                     ({"model_type": "deepseek_v4", "hc_eps": float("nan")}, "hc_eps"),
                                     ({"model_type": "deepseek_v4", "rope_theta": float("inf")}, "rope_theta"),
                                     ({"model_type": "deepseek_v3", "routed_scaling_factor": -2.5}, "routed_scaling_factor")])
def test_bad_configs_name_the_key(bad, msg, tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(bad))
    with pytest.raises(ConfigError, match=msg):
        ModelArgs.from_json(tmp_path)


def test_missing_config_file(tmp_path):
    with pytest.raises(ConfigError, match="no such file"):
        ModelArgs.from_json(tmp_path / "nope.json")


def test_plan_memory_scales_with_layout_and_context():
    a = preset("v4-pro")
    one = planmod.plan(a, planmod.Layout(tp=8, ep=8), context=2 ** 20)
    two = planmod.plan(a, planmod.Layout(tp=8, ep=8, pp=2, dp=1), context=2 ** 20)
    assert sum(two["weights"].values()) < sum(one["weights"].values())
    assert sum(two["kv_cache"].values()) == pytest.approx(sum(one["kv_cache"].values()) / 2)
    short = planmod.plan(a, planmod.Layout(tp=8, ep=8), context=2 ** 14)
    assert sum(short["kv_cache"].values()) < sum(one["kv_cache"].values()) / 30
    # FP4 experts: V4-Pro's routed experts are about 1.55T parameters -> ~0.53 bytes each over 8 devices
    assert one["weights"]["routed experts"] == pytest.approx(1.55e12 * (0.5 + 1 / 32) / 8, rel=0.03)


def test_plan_kv_cache_by_hand():
    """V3.2 at 1000 tokens: per layer (512 + 64) latent + 128 indexer values per token, bf16."""
    a = preset("v3.2")
    kv = planmod.kv_bytes_per_sequence(a, 1000)
    assert kv["latent (MLA)"] == 61 * 1000 * 576 * 2
    assert kv["indexer keys"] == 61 * 1000 * 128 * 2
    fp8 = planmod.kv_bytes_per_sequence(a, 1000, "fp8")  # 656-byte rows, e4m3 keys + a float32 scale
    assert fp8["latent (MLA)"] == 61 * 1000 * 656
    assert fp8["indexer keys"] == 61 * 1000 * (128 + 4)


def test_plan_fp8_kv_cache_uses_the_v4_layout():
    """V4-Flash: every compressed or window row is 584 bytes in fp8 against 1024 in bf16."""
    a = preset("v4-flash")
    bf16, fp8 = (planmod.kv_bytes_per_sequence(a, 2 ** 20, kv) for kv in ("bf16", "fp8"))
    assert fp8["compressed"] / bf16["compressed"] == pytest.approx(584 / 1024)
    assert fp8["sliding window"] / bf16["sliding window"] == pytest.approx(584 / 1024)
    assert fp8["compressor state"] == bf16["compressor state"]  # float32 either way


def test_plan_rejects_layouts_that_do_not_divide():
    with pytest.raises(ValueError, match="ep=7"):
        planmod.plan(preset("v4-pro"), planmod.Layout(tp=8, ep=7), 4096)


def test_plan_cli(capsys):
    assert cli(["plan", "--preset", "v4-pro", "--context", "1M", "--tp", "8", "--ep", "8"]) == 0
    out = capsys.readouterr().out
    assert "1.57T parameters" in out and "tp=8 ep=8" in out and "kv cache" in out and "GiB" in out
    assert cli(["plan", "--preset", "v4-pro", "--context", "1M", "--kv-cache-dtype", "fp8"]) == 0
    assert "fp8: one 1M-token sequence holds" in capsys.readouterr().out
    assert cli(["plan", "--preset", "v4-1t", "--context", "128k"]) == 0
    assert "PROJECTION" in capsys.readouterr().out
