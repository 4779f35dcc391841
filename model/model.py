"""DeepSeek-V4 / V3.2 / V3 causal LM built from v4hal modules, under transformers' tensor names.

    args = ModelArgs.from_json("ckpt/config.json")        # or config.preset("tiny")
    model = DeepseekForCausalLM(args)                      # device="meta" builds shapes only
    load_checkpoint(model, "ckpt", args)                   # model.loader
    cache = model.new_cache()                              # kv_cache_dtype="fp8": DeepSeek's FP8 cache
    logits = model(input_ids, cache=cache)                 # prefill [B, S] -> [B, S, vocab]
    logits = model(next_ids, cache=cache)                  # decode, positions continue the cache

V4 keeps `hc_mult` residual streams per token, mixed around every sub-layer by mHC
(`model.hyper`) and collapsed by `hc_head` before the final norm; V3 / V3.2 keep one residual.
The first V3 / V3.2 layers (`mlp_layer_types == "dense"`) have a plain SwiGLU MLP; the rest, and
every V4 layer, a routed MoE with shared experts (`model.moe`), hash-routed in V4's `hash_moe`
layers. The MTP layer of a checkpoint is not built (the loader skips its tensors).
"""

from __future__ import annotations

import dataclasses

import torch
from torch import nn

from v4hal.model import attention_v41
from v4hal.model.attention_v4 import V4Attention, V4AttentionConfig
from v4hal.model.attention_v32 import V32Attention, V32AttentionConfig
from v4hal.model import v41
from v4hal.model.config import ModelArgs
from v4hal.model.engram import EngramTable
from v4hal.model.hyper import HyperConnection, HyperHead, expand_streams
from v4hal.model.layers import Linear, RMSNorm
from v4hal.model.moe import MLP, MoE, set_act_scale_fmt
from v4hal.model.parallel import SOLO_PARALLEL, Layout, Parallel

DTYPES = {"bfloat16": torch.bfloat16, "float32": torch.float32, "float16": torch.float16, "float64": torch.float64}


class ModelCache:
    """Everything decode needs: one attention cache per layer (sliding rows, compressed entries,
    compressor and indexer state for V4; latents and indexer keys for V3.2) and the token count."""

    def __init__(self, layers: list):
        self.layers = layers
        attention_v41.link(layers)  # V4.1's layers read their sources' caches
        self.engram = None  # V4.1: the ids the next chunk's n-grams reach back to (model.v41.EngramState)
        self.length = 0
        self.batch = 0   # sequences, set by the first call

    def nbytes(self) -> int:
        def size(obj) -> int:
            if isinstance(obj, torch.Tensor):
                return obj.numel() * obj.element_size()
            return sum(size(v) for v in vars(obj).values()) if hasattr(obj, "__dict__") else 0

        return sum(size(layer) for layer in self.layers)


def _mlp(args: ModelArgs, idx: int, dtype: torch.dtype, par: Parallel) -> nn.Module:
    """V3/V3.2's first layers: a dense SwiGLU MLP; every other layer: the MoE layer its config
    describes (`MoE.from_config`, the one builder of a model's MoE layer)."""
    if not args.is_moe_layer(idx):
        return MLP(args.hidden_size, args.intermediate_size // par.tp.size, None, dtype=dtype, reduce=par.tp)
    return MoE.from_config(args, idx, dtype=dtype, parallel=par)


class DecoderLayer(nn.Module):
    def __init__(self, args: ModelArgs, idx: int, par: Parallel = SOLO_PARALLEL):
        super().__init__()
        self.v4 = args.is_v4
        if self.v4 and args.kv_source(idx) is not None:  # V4.1: a compressed cache shared between layers
            self.self_attn = attention_v41.V41Attention(V4AttentionConfig.from_hf(args, idx), args, idx, tp=par.tp)
        elif self.v4:
            self.self_attn = V4Attention(V4AttentionConfig.from_hf(args, idx), tp=par.tp)
        else:  # V3 is V3.2 without DSA: no indexer, every causal token attended
            c = V32AttentionConfig.from_hf(args, idx)
            self.self_attn = V32Attention(c if args.is_v32 else dataclasses.replace(c, index_heads=0), tp=par.tp)
        self.mlp = _mlp(args, idx, torch.get_default_dtype(), par)
        self.input_layernorm = RMSNorm(args.hidden_size, args.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(args.hidden_size, args.rms_norm_eps)
        if self.v4:
            hc = dict(hidden_size=args.hidden_size, hc_mult=args.hc_mult, sinkhorn_iters=args.hc_sinkhorn_iters,
                      hc_eps=args.hc_eps, norm_eps=args.rms_norm_eps)
            self.attn_hc = HyperConnection(**hc)
            self.ffn_hc = HyperConnection(**hc)

    def _mlp(self, x: torch.Tensor, input_ids: torch.Tensor) -> torch.Tensor:
        return self.mlp(x, input_ids) if isinstance(self.mlp, MoE) else self.mlp(x)

    def forward(self, h: torch.Tensor, positions: torch.Tensor, input_ids: torch.Tensor, cache) -> torch.Tensor:
        if not self.v4:
            h = h + self.self_attn(self.input_layernorm(h), positions, cache)
            return h + self._mlp(self.post_attention_layernorm(h), input_ids)
        x, post, comb = self.attn_hc(h)
        h = self.attn_hc.expand(self.self_attn(self.input_layernorm(x), positions, cache), h, post, comb)
        x, post, comb = self.ffn_hc(h)
        return self.ffn_hc.expand(self._mlp(self.post_attention_layernorm(x), input_ids), h, post, comb)


class VocabEmbedding(nn.Module):
    """`nn.Embedding` over this rank's `1 / tp` of the vocabulary (rows [first, first + n)): ids
    held elsewhere embed to zero here, and the sum over `tp` completes every token."""

    def __init__(self, vocab_size: int, hidden_size: int, tp):
        super().__init__()
        rows = vocab_size // tp.size
        self.weight = nn.Parameter(torch.empty(rows, hidden_size), requires_grad=False)
        self.first, self.tp = tp.rank * rows, tp

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        if self.tp.size == 1:
            return nn.functional.embedding(input_ids, self.weight)
        local = input_ids - self.first
        here = (local >= 0) & (local < self.weight.shape[0])
        h = nn.functional.embedding(torch.where(here, local, 0), self.weight) * here.unsqueeze(-1)
        return self.tp.all_reduce(h)


class Backbone(nn.Module):
    """transformers' `Deepseek*Model`: embeddings, decoder layers, (hc_head,) final norm."""

    def __init__(self, args: ModelArgs, par: Parallel = SOLO_PARALLEL):
        super().__init__()
        self.args = args
        self.embed_tokens = VocabEmbedding(args.vocab_size, args.hidden_size, par.tp)
        self.layers = nn.ModuleList(DecoderLayer(args, i, par) for i in range(args.num_hidden_layers))
        self.norm = RMSNorm(args.hidden_size, args.rms_norm_eps)
        if args.is_v41:  # Engram modules and their hashing; no hc_head
            v41.attach(self, args, par)
        elif args.is_v4:
            self.hc_head = HyperHead(args.hidden_size, args.hc_mult, args.hc_eps, args.rms_norm_eps)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, caches: list, engram=None) -> torch.Tensor:
        h = self.embed_tokens(input_ids)
        if self.args.is_v4:
            h = expand_streams(h, self.args.hc_mult)
        if self.args.is_v41:
            return self.norm(v41.forward(self, h, positions, input_ids, caches, engram))
        for layer, cache in zip(self.layers, caches):
            h = layer(h, positions, input_ids, cache)
        if self.args.is_v4:
            h = self.hc_head(h)
        return self.norm(h)


class DeepseekForCausalLM(nn.Module):
    """The whole model; state_dict keys are those of transformers' `Deepseek{V4,V32,V3}ForCausalLM`.
    `parallel`: this rank's place in a tensor / expert parallel layout (`model.parallel`); its
    tensors are then this rank's slices (`parallel.shard`), and every rank returns whole logits."""

    def __init__(self, args: ModelArgs, dtype: torch.dtype | None = None, device: str | torch.device | None = None,
                 parallel: Parallel = SOLO_PARALLEL, kv_cache_dtype: str = "auto"):
        super().__init__()
        self.args, self.parallel, self.kv_cache_dtype = args, parallel, kv_cache_dtype
        # Built directly in the compute dtype: a real-size model never exists in float32 first.
        previous = torch.get_default_dtype()
        torch.set_default_dtype(dtype or DTYPES.get(args.torch_dtype, torch.float32))
        try:
            with torch.device(device or "cpu"):
                self.model = Backbone(args, parallel)
                self.lm_head = Linear(args.hidden_size, args.vocab_size // parallel.tp.size)
        finally:
            torch.set_default_dtype(previous)
        self._keep_float32()
        set_act_scale_fmt(self, args.act_scale_fmt)
        self.new_cache()  # an unknown kv_cache_dtype, or FP8 at widths its layouts lack, fails here

    def _keep_float32(self) -> None:
        """Parameters transformers keeps in float32 whatever the model dtype (mHC, sinks, position
        biases, router bias)."""
        for name, p in self.named_parameters():
            if any(k in name for k in ("_hc.", "hc_head.", "sinks", "position_bias")):
                p.data = p.data.float()
        for name, b in self.named_buffers():
            if "e_score_correction_bias" in name:
                b.data = b.data.float()

    def new_cache(self, kv_cache_dtype: str | None = None) -> ModelCache:
        """kv_cache_dtype: "auto" (rows in the compute dtype), "fp8" (DeepSeek's FP8 layouts,
        `model.cache_fp8`) or "int8" (V3.2 / V3's latents in the int8 layout, `model.cache_int8`);
        None: the model's `kv_cache_dtype`."""
        kind = self.kv_cache_dtype if kv_cache_dtype is None else kv_cache_dtype
        cache = ModelCache([layer.self_attn.new_cache(kind) for layer in self.model.layers])
        if self.args.is_v41:
            cache.engram = v41.EngramState()
        return cache

    def set_engram_token_map(self, source) -> None:
        """V4.1: the compressed vocabulary, from a tokenizer or a `[vocab]` tensor (model.v41)."""
        self.model.engram_hashing.set_token_map(source)

    def keep_engram_tables_on_host(self) -> "DeepseekForCausalLM":
        """V4.1: Engram tables back in host memory after `.to(device)` (model.v41)."""
        v41.keep_tables_on_host(self.model)
        return self

    def forward(self, input_ids: torch.Tensor, cache: ModelCache | None = None,
                last_only: bool = False) -> torch.Tensor:
        """input_ids `[B, S]` -> logits `[B, S, vocab]` (`[B, 1, vocab]` with last_only), float32.
        With a cache, the tokens continue it (positions cache.length ...); without, a one-shot
        forward from position 0."""
        start = 0 if cache is None else cache.length
        b, s = input_ids.shape
        positions = torch.arange(start, start + s, device=input_ids.device).unsqueeze(0).expand(b, s)
        if cache is not None:
            caches = cache.layers
        elif self.args.shares_compressed_caches:  # V4.1's layers talk through their caches: a scratch one
            caches = self.new_cache().layers
        else:
            caches = [None] * len(self.model.layers)
        h = self.model(input_ids, positions, caches, None if cache is None else cache.engram)
        if cache is not None:
            cache.length += s
            cache.batch = b
        if last_only:
            h = h[:, -1:]
        return self.parallel.tp.all_gather(self.lm_head(h).float(), dim=-1)

    def held_bytes(self) -> int:
        """Bytes of the weights this process holds: its state dict (quantization scales included)."""
        return sum(t.numel() * t.element_size() for t in self.state_dict().values())

    def init_random(self, seed: int = 0, std: float = 0.02) -> "DeepseekForCausalLM":
        """transformers' initialisation (normal weights, unit norms, zero biases / sinks / position
        biases, unit mHC scales), for demos and tests without a checkpoint."""
        g = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for name, p in sorted(self.named_parameters()):
                leaf = name.rsplit(".", 1)[-1]
                if "norm" in name.rsplit(".", 2)[-2] or leaf in ("scale", "hc_scale"):
                    p.fill_(1.0)
                elif leaf in ("sinks", "position_bias", "bias", "base", "hc_base"):
                    p.zero_()
                else:
                    p.copy_(torch.randn(p.shape, generator=g, dtype=torch.float32) * std)
            for name, buf in self.named_buffers():
                if name.endswith("tid2eid"):  # k distinct experts per token id
                    order = torch.rand(buf.shape[0], self.args.n_routed_experts, generator=g).argsort(-1)
                    buf.copy_(order[:, : buf.shape[1]])
            for module in self.modules():
                if isinstance(module, EngramTable):  # float8 values with their exponent bytes
                    module.init_random(g)
        return self


def build(args: ModelArgs, dtype: torch.dtype | None = None, device: str | torch.device | None = None,
          layout: Layout | None = None, timeout_s: float | None = None,
          kv_cache_dtype: str = "auto") -> DeepseekForCausalLM:
    """The model, whole, or (`layout`, under torch.distributed with `layout.devices` processes)
    this rank's part of it; every rank must call it (the layout's process groups are created,
    their collectives bounded by `timeout_s`)."""
    par = SOLO_PARALLEL if layout is None else Parallel.create(layout, args, timeout_s)
    return DeepseekForCausalLM(args, dtype, device, par, kv_cache_dtype).eval()

