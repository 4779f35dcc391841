"""transformers' DeepseekV4Attention / DeepseekV32Attention next to v4hal's layers on the SAME
weights (shared storage), for the layer tests, the speed cases and docs/attention.md.

Importing this module imports transformers (slow): only tests and benchmarks do.
"""

from __future__ import annotations

import torch
from transformers import DeepseekV4Config, DeepseekV32Config
from transformers.cache_utils import DynamicCache
from transformers.masking_utils import create_causal_mask, create_sliding_window_causal_mask
from transformers.models.deepseek_v4.modeling_deepseek_v4 import DeepseekV4Attention, DeepseekV4RotaryEmbedding
from transformers.models.deepseek_v32.modeling_deepseek_v32 import DeepseekV32Attention, DeepseekV32RotaryEmbedding

from v4hal.model.attention_v4 import V4Attention, V4AttentionConfig
from v4hal.model.attention_v32 import V32Attention, V32AttentionConfig

# Small but complete: every branch (window wraps, CSA overlap, HCA, YaRN) is reached in a few
# dozen tokens. Index heads are many enough that exact score ties (all heads relu'd to 0) are rare,
# since transformers breaks ties arbitrarily.
TINY_V4 = dict(hidden_size=64, num_attention_heads=4, head_dim=32, partial_rotary_factor=8 / 32, q_lora_rank=24,
               o_groups=2, o_lora_rank=16, sliding_window=8, index_n_heads=16, index_head_dim=16, index_topk=3,
               compress_rates={"compressed_sparse_attention": 4, "heavily_compressed_attention": 8},
               rope_parameters={"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64,
                                "beta_fast": 32, "beta_slow": 1},
               max_position_embeddings=256)
TINY_V32 = dict(hidden_size=64, num_attention_heads=4, num_key_value_heads=4, q_lora_rank=24, kv_lora_rank=32,
                qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=12, index_n_heads=16, index_head_dim=16,
                index_topk=5, rope_parameters={"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0,
                                               "original_max_position_embeddings": 64, "mscale": 1.0,
                                               "mscale_all_dim": 1.0, "beta_fast": 32, "beta_slow": 1},
                max_position_embeddings=256)


def _randomise(module: torch.nn.Module, seed: int, std: float) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            noise = torch.randn(p.shape, generator=g)
            p.copy_(1 + 0.1 * noise if "norm" in name else noise * std)


def v4_config(layer_type: str, **overrides) -> DeepseekV4Config:
    """A one-layer V4 config of `layer_type`; no overrides = transformers' defaults (V4-Flash)."""
    cfg = DeepseekV4Config(num_hidden_layers=1, layer_types=[layer_type], **overrides)
    cfg._attn_implementation = "eager"
    return cfg


def v4_pair(layer_type: str, cfg: DeepseekV4Config | None = None, device="cpu", dtype=torch.float32,
            seed: int = 0, std: float | None = None):
    """(ours, ref, run_ref): run_ref(x, cache=None, start=0) runs transformers' layer as its model
    does (rotary tables, sliding-window mask, its own cache when given one from `ref_cache`)."""
    cfg = cfg or v4_config(layer_type)
    ref = DeepseekV4Attention(cfg, 0)
    _randomise(ref, seed, std if std is not None else cfg.hidden_size ** -0.5)
    ref = ref.to(device=device, dtype=dtype)
    ours = V4Attention(V4AttentionConfig.from_hf(cfg, 0)).to(device)
    ours.load_state_dict(ref.state_dict(), strict=True, assign=True)
    rot = DeepseekV4RotaryEmbedding(cfg).to(device)

    @torch.no_grad()
    def run_ref(x, cache=None, start=0):
        pos = (start + torch.arange(x.shape[1], device=x.device)).unsqueeze(0).expand(x.shape[0], -1)
        pe = {k: rot(x, pos, layer_type=k) for k in ("main", "compress")}
        mask = create_sliding_window_causal_mask(config=cfg, inputs_embeds=x, attention_mask=None,
                                                 past_key_values=cache, position_ids=pos)
        return ref(x, pe, pos, mask, past_key_values=cache)[0]

    return ours, ref, run_ref


def v32_pair(cfg: DeepseekV32Config | None = None, device="cpu", dtype=torch.float32, seed: int = 0):
    cfg = cfg or DeepseekV32Config(num_hidden_layers=1)
    cfg._attn_implementation = "eager"
    ref = DeepseekV32Attention(cfg, 0)
    _randomise(ref, seed, cfg.hidden_size ** -0.5 * 2)
    ref = ref.to(device=device, dtype=dtype)
    ours = V32Attention(V32AttentionConfig.from_hf(cfg)).to(device)
    ours.load_state_dict(ref.state_dict(), strict=True, assign=True)
    rot = DeepseekV32RotaryEmbedding(cfg).to(device)

    @torch.no_grad()
    def run_ref(x, cache=None, start=0):
        pos = (start + torch.arange(x.shape[1], device=x.device)).unsqueeze(0).expand(x.shape[0], -1)
        mask = create_causal_mask(config=cfg, inputs_embeds=x, attention_mask=None, past_key_values=cache,
                                  position_ids=pos)
        if mask is None:
            mask = torch.zeros(x.shape[0], 1, x.shape[1], start + x.shape[1], dtype=x.dtype, device=x.device)
        return ref(x, rot(x, pos), mask, past_key_values=cache, position_ids=pos)[0]

    return ours, ref, run_ref


def ref_cache(cfg) -> DynamicCache:
    return DynamicCache(config=cfg)
