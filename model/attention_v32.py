"""DeepSeek-V3.2's attention layer (transformers' DeepseekV32Attention: MLA + DSA) in the absorbed
form; built without indexer (index_heads=0) it is V3's MLA. Called as `model.attention`
describes; its caches are in `model.cache`.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from v4hal import ops
from v4hal.model.attention import _check_call, _check_static_call, _chunked, _get, _index_select
from v4hal.model.collectives import SOLO, Collectives
from v4hal.model.cache import StaticV32Cache, V32Cache
from v4hal.model.cache_fp8 import FP8Rows, check_dims, check_dtype
from v4hal.model.cache_int8 import int8_latents
from v4hal.model.layers import LayerNorm, Linear, RMSNorm
from v4hal.model.rope import Rope, softmax_scale


@dataclass(frozen=True)
class V32AttentionConfig:
    hidden: int = 7168
    heads: int = 128
    q_lora: int = 1536
    kv_lora: int = 512
    nope_dim: int = 128
    rope_dim: int = 64
    v_dim: int = 128
    index_heads: int = 64
    index_dim: int = 128
    index_topk: int = 2048
    eps: float = 1e-6
    bias: bool = False
    rope: Rope = field(default_factory=lambda: Rope(64, 10000.0))
    scale: float = 192 ** -0.5

    @classmethod
    def from_hf(cls, cfg, layer_idx: int = 0) -> "V32AttentionConfig":
        rope_dim = _get(cfg, "qk_rope_head_dim")
        nope = _get(cfg, "qk_nope_head_dim")
        rp = _get(cfg, "rope_parameters") or {"rope_type": "default", "rope_theta": _get(cfg, "rope_theta", 10000.0)}
        return cls(hidden=_get(cfg, "hidden_size"), heads=_get(cfg, "num_attention_heads"),
                   q_lora=_get(cfg, "q_lora_rank"), kv_lora=_get(cfg, "kv_lora_rank"), nope_dim=nope,
                   rope_dim=rope_dim, v_dim=_get(cfg, "v_head_dim"), index_heads=_get(cfg, "index_n_heads"),
                   index_dim=_get(cfg, "index_head_dim"), index_topk=_get(cfg, "index_topk"),
                   bias=bool(_get(cfg, "attention_bias", False)),
                   rope=Rope.from_params(rope_dim, rp, _get(cfg, "max_position_embeddings")),
                   scale=softmax_scale(nope + rope_dim, rp))


class V32Indexer(nn.Module):
    """Under tensor parallelism a rank holds `index_heads / tp` heads (the key stays whole); their
    partial scores are summed over `tp` before the top-k."""

    def __init__(self, c: V32AttentionConfig, tp: Collectives = SOLO):
        super().__init__()
        self.heads, self.tp = c.index_heads // tp.size, tp
        self.wq_b = Linear(c.q_lora, self.heads * c.index_dim)
        self.wk = Linear(c.hidden, c.index_dim)
        self.k_norm = LayerNorm(c.index_dim, 1e-6)
        self.weights_proj = Linear(c.hidden, self.heads)


def _rope_head(x, cos, sin, rope_dim):
    """V3.2 indexer layout: RoPE (half-split pairs) on the leading `rope_dim` channels."""
    return torch.cat([ops.apply_rope(x[..., :rope_dim], cos, sin, interleaved=False), x[..., rope_dim:]], dim=-1)


def _fixed(rows, batch: int, capacity: int, width: int, like: torch.Tensor):
    """Rows moved into a fixed-size store for `capacity` tokens: an FP8Rows gets blocks for them
    (the same positions), compute-dtype rows a zeroed `[B, capacity, width]` buffer."""
    if isinstance(rows, FP8Rows):
        return rows.fixed(batch, capacity, like.device)
    out = like.new_zeros(batch, capacity, width)
    if len(rows):
        out[:, :len(rows)] = rows.tensor
    return out


def _put(rows, positions: torch.Tensor, new: torch.Tensor) -> None:
    """Static decode: `new` `[B, 1, D]` into row positions[0] of a buffer or an FP8Rows."""
    if isinstance(rows, FP8Rows):
        rows.write(positions, new)
    else:
        rows.index_copy_(1, positions[0], new)


class V32Attention(nn.Module):
    """transformers' DeepseekV32Attention (MLA + DSA) in the absorbed form: attention runs over the
    cached latents, as DeepSeek's inference and FlashMLA's sparse kernel do. `tp`: tensor
    parallelism; a rank holds `heads / tp` heads (q_b_proj, kv_b_proj rows, o_proj columns), the
    latent stays whole."""

    def __init__(self, c: V32AttentionConfig, prefill_chunk: int = 512, tp: Collectives = SOLO):
        super().__init__()
        self.c, self.prefill_chunk = c, prefill_chunk
        self.heads = c.heads // tp.size
        self.q_a_proj = Linear(c.hidden, c.q_lora, bias=c.bias)
        self.q_a_layernorm = RMSNorm(c.q_lora, 1e-6)
        self.q_b_proj = Linear(c.q_lora, self.heads * (c.nope_dim + c.rope_dim))
        self.kv_a_proj_with_mqa = Linear(c.hidden, c.kv_lora + c.rope_dim, bias=c.bias)
        self.kv_a_layernorm = RMSNorm(c.kv_lora, 1e-6)
        self.kv_b_proj = Linear(c.kv_lora, self.heads * (c.nope_dim + c.v_dim))
        self.o_proj = Linear(self.heads * c.v_dim, c.hidden, bias=c.bias, reduce=tp)
        # index_heads = 0: no DSA, every causal token is attended (V3's MLA).
        self.indexer = V32Indexer(c, tp) if c.index_heads else None

    def new_cache(self, kv_cache_dtype: str = "auto") -> V32Cache:
        """kv_cache_dtype "fp8": latents in DeepSeek's V3.2 FP8 layout, indexer keys in its FP8 key
        layout (`model.cache_fp8`); "int8": latents in the int8 layout (Ascend's int8-KV kernel
        reads it), indexer keys in the compute dtype; "auto": the compute dtype."""
        cache = V32Cache()
        if kv_cache_dtype == "int8":
            cache.latent = int8_latents(self.c)
        elif check_dtype(kv_cache_dtype):
            c = self.c
            check_dims("V32Attention", "v3.2", kv_lora_rank=("nope", c.kv_lora),
                       qk_rope_head_dim=("rope", c.rope_dim))
            cache.latent = FP8Rows("v3.2")
            if self.indexer is not None:
                check_dims("V32Attention indexer", "index", index_head_dim=("dim", c.index_dim))
                cache.index_keys = FP8Rows("index")
        return cache

    def static_cache(self, cache: V32Cache, batch: int, capacity: int, like: torch.Tensor) -> StaticV32Cache:
        """`cache` moved into fixed-size buffers holding up to `capacity` tokens (see V4Attention)."""
        c = self.c
        keys = _fixed(cache.index_keys, batch, capacity, c.index_dim, like) if self.indexer is not None else None
        return StaticV32Cache(_fixed(cache.latent, batch, capacity, c.kv_lora + c.rope_dim, like), keys)

    def forward(self, x: torch.Tensor, positions: torch.Tensor, cache: V32Cache | None = None) -> torch.Tensor:
        cache = cache if cache is not None else V32Cache()
        if isinstance(cache, StaticV32Cache):
            return self._static_step(x, positions, cache)
        _check_call("V32Attention", x, positions, cache)
        return _chunked(self._step, x, positions, cache, self.prefill_chunk)

    def _project(self, x: torch.Tensor, positions: torch.Tensor):
        """((q_nope [B, S, H, nope], roped q_rope [B, S, H, rope]), the query LoRA residual, this
        step's latent rows [B, S, kv_lora + rope], cos, sin)."""
        c = self.c
        b, s, _ = x.shape
        cos, sin = c.rope.cos_sin(positions, x.dtype)
        q_res = self.q_a_layernorm(self.q_a_proj(x))
        q = self.q_b_proj(q_res).view(b, s, self.heads, c.nope_dim + c.rope_dim)
        q_rope = ops.apply_rope(q[..., c.nope_dim:], cos.unsqueeze(2), sin.unsqueeze(2))
        lat = self.kv_a_proj_with_mqa(x)
        k_rope = ops.apply_rope(lat[..., c.kv_lora:], cos, sin)
        return (q[..., :c.nope_dim], q_rope), q_res, torch.cat([self.kv_a_layernorm(lat[..., :c.kv_lora]), k_rope], -1), cos, sin

    def _attend(self, q: tuple[torch.Tensor, torch.Tensor], latent: torch.Tensor, picked: torch.Tensor) -> torch.Tensor:
        # Absorb W_uk into the query and apply W_uv after attention over the latents.
        c, (q_nope, q_rope) = self.c, q
        wkv = self.kv_b_proj.dense_weight(q_nope.dtype).view(self.heads, c.nope_dim + c.v_dim, c.kv_lora)
        q_lat = torch.einsum("bshn,hnc->bshc", q_nope, wkv[:, :c.nope_dim])
        q = torch.cat([q_lat, q_rope], -1)
        if isinstance(latent, FP8Rows):
            o_lat = latent.attend(q, picked, c.scale, v_dim=c.kv_lora)
        else:
            o_lat = ops.sparse_attention(q, latent, picked, c.scale, v_dim=c.kv_lora)
        o = torch.einsum("bshc,hvc->bshv", o_lat, wkv[:, c.nope_dim:])
        return self.o_proj(o.reshape(*o.shape[:2], -1))

    def _step(self, x: torch.Tensor, positions: torch.Tensor, cache: V32Cache) -> torch.Tensor:
        q, q_res, row, cos, sin = self._project(x, positions)
        cache.latent.append(row)
        if self.indexer is None:
            picked = self._causal(positions, len(cache.latent))
        else:
            cache.index_keys.append(self._index_key(x, cos, sin))
            picked = self._select(x, q_res, positions, cos, sin, cache.index_keys.tensor)
        cache.length += x.shape[1]
        return self._attend(q, cache.latent.tensor, picked)

    def _static_step(self, x: torch.Tensor, positions: torch.Tensor, cache: StaticV32Cache) -> torch.Tensor:
        """One decode token per sequence (`S = 1`, the same position in every row) at fixed shapes."""
        _check_static_call("V32Attention", x, positions)
        q, q_res, row, cos, sin = self._project(x, positions)
        _put(cache.latent, positions, row)
        if self.indexer is None:
            fp8 = isinstance(cache.latent, FP8Rows)
            picked = self._causal(positions, cache.latent.span if fp8 else cache.latent.shape[1])
        else:
            _put(cache.index_keys, positions, self._index_key(x, cos, sin))
            picked = self._select(x, q_res, positions, cos, sin, cache.index_keys)
        return self._attend(q, cache.latent, picked)

    @staticmethod
    def _causal(positions: torch.Tensor, t: int) -> torch.Tensor:
        """V3 (no indexer): every cached token up to the query's position."""
        ent = torch.arange(t, device=positions.device).view(1, 1, t)
        return torch.where(ent <= positions.unsqueeze(-1), ent, -1).to(torch.int32)

    def _index_key(self, x, cos, sin) -> torch.Tensor:
        ix = self.indexer
        return _rope_head(ix.k_norm(ix.wk(x)), cos, sin, self.c.rope_dim)

    def _select(self, x, q_res, positions, cos, sin, keys: torch.Tensor) -> torch.Tensor:
        """DSA's picks among `keys` `[B, T, index_dim]` (future and unwritten rows come back -1)."""
        c, ix = self.c, self.indexer
        b, s, _ = x.shape
        qi = _rope_head(ix.wq_b(q_res).view(b, s, ix.heads, c.index_dim), cos.unsqueeze(2), sin.unsqueeze(2),
                        c.rope_dim)
        scale = (c.index_dim * c.index_heads) ** -0.5  # over all heads, wherever they are
        return _index_select(qi, keys, ix.weights_proj(x), scale, c.index_topk, positions, 1, ix.tp)
