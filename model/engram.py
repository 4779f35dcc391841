"""An Engram layer (DeepSeek V4.1-style conditional memory) built from `v4hal.ops`.

Parameter names follow the public `deepseek-ai/Engram` demo, so a state dict written with that
layout loads as is: `multi_head_embedding.embedding.weight` (the shared table, `[sum of table
sizes, embed_per_ngram / heads_per_ngram]`), `value_proj.{weight,bias}`, `key_projs.{s}.{weight,bias}`
(one per mHC stream), `norm1.{s}.weight` (key norms), `norm2.{s}.weight` (query norms),
`short_conv.conv.weight` (depthwise causal conv over time) and `short_conv.norms.{s}.weight`.

Forward (streams `[B, T, n, D]`, token ids `[B, T]`): hash the ids (`engram_hash`), gather the
memory (`engram_lookup`, or take rows an `EngramPrefetcher` fetched earlier), project keys and
value, gate the value into every stream (`engram_gate`), add a SiLU'd depthwise causal
convolution of the gated value (kernel `kernel_size`, dilation `max_ngram`, per-stream RMSNorm
first), and add the result to the streams. The table may stay in host memory
(`keep_table_on_host()`) while everything else runs on an accelerator.

Not covered: the convolution's state for incremental decoding (forward expects whole sequences;
pass `prefix` ids to hash the first new tokens correctly, but the convolution sees only the
given positions).
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from v4hal import ops

LAYER_SEED_STRIDE = 10007  # the demo seeds layer l's multipliers with seed + 10007 * l


def _is_prime(m: int) -> bool:
    if m < 2:
        return False
    if m % 2 == 0:
        return m == 2
    f = 3
    while f * f <= m:
        if m % f == 0:
            return False
        f += 2
    return True


def table_primes(layer_ids: list[int], vocab_per_order: list[int], heads: int) -> dict[int, list[list[int]]]:
    """Every (layer, order, head) table size: for each layer in order, for each n-gram order, the
    next `heads` primes at or above that order's nominal vocabulary size, never reusing a prime
    (across heads or layers), as the demo allots them."""
    seen: set[int] = set()
    out: dict[int, list[list[int]]] = {}
    for layer in layer_ids:
        per_order = []
        for size in vocab_per_order:
            primes, candidate = [], size - 1
            for _ in range(heads):
                candidate += 1
                while not _is_prime(candidate) or candidate in seen:
                    candidate += 1
                seen.add(candidate)
                primes.append(candidate)
            per_order.append(primes)
        out[layer] = per_order
    return out


def layer_multipliers(layer_id: int, compressed_vocab: int, max_ngram: int, seed: int = 0) -> torch.Tensor:
    """The layer's odd hash multipliers, drawn as the demo draws them (numpy's default generator
    seeded with `seed + 10007 * layer_id`, uniform below half of int64_max // compressed_vocab),
    so hashes match tables trained with the demo's hashing."""
    half = max(1, (np.iinfo(np.int64).max // compressed_vocab) // 2)
    draws = np.random.default_rng(seed + LAYER_SEED_STRIDE * layer_id).integers(0, half, size=(max_ngram,), dtype=np.int64)
    return torch.from_numpy(draws * 2 + 1)


class Engram(nn.Module):
    """One Engram layer.

    hidden_size: D; hc_mult: n streams; compress: `[V]` int64 compressed id per token;
    multipliers: `[max_ngram]` int64 (`layer_multipliers`); primes: `[max_ngram - 1][heads]` table
    sizes (`table_primes(...)[layer_id]`); embed_per_ngram: width of one order's memory (512 in the
    demo) split over its heads; pad_id: the tokenizer's pad id; kernel_size: the short conv's
    kernel (4); gate_eps: RMS epsilon of the key/query norms (the demo's nn.RMSNorm default,
    float32 machine epsilon); conv_eps: RMS epsilon before the convolution (1e-5).
    """

    def __init__(self, hidden_size: int, hc_mult: int, compress: torch.Tensor, multipliers: torch.Tensor,
                 primes: list[list[int]], embed_per_ngram: int = 512, pad_id: int = 2, kernel_size: int = 4,
                 gate_eps: float = float(torch.finfo(torch.float32).eps), conv_eps: float = 1e-5):
        super().__init__()
        orders, heads = len(primes), len(primes[0])
        if embed_per_ngram % heads:
            raise ValueError(f"Engram: embed_per_ngram {embed_per_ngram} is not divisible by {heads} heads")
        self.hidden_size, self.hc_mult, self.max_ngram = hidden_size, hc_mult, orders + 1
        self.pad_id, self.gate_eps, self.conv_eps = pad_id, gate_eps, conv_eps
        self.register_buffer("compress", compress.to(torch.int64), persistent=False)
        self.register_buffer("multipliers", multipliers.to(torch.int64), persistent=False)
        sizes = torch.tensor(primes, dtype=torch.int64)
        self.register_buffer("primes", sizes, persistent=False)
        self.register_buffer("offsets", ops.engram_offsets(sizes), persistent=False)
        memory = orders * embed_per_ngram
        self.multi_head_embedding = nn.ModuleDict(
            {"embedding": nn.Embedding(int(sizes.sum()), embed_per_ngram // heads)})
        self.value_proj = nn.Linear(memory, hidden_size)
        self.key_projs = nn.ModuleList(nn.Linear(memory, hidden_size) for _ in range(hc_mult))
        self.norm1 = nn.ModuleList(nn.RMSNorm(hidden_size, eps=gate_eps) for _ in range(hc_mult))
        self.norm2 = nn.ModuleList(nn.RMSNorm(hidden_size, eps=gate_eps) for _ in range(hc_mult))
        channels = hc_mult * hidden_size
        self.short_conv = nn.ModuleDict({
            "conv": nn.Conv1d(channels, channels, kernel_size, groups=channels, bias=False),
            "norms": nn.ModuleList(nn.RMSNorm(hidden_size, eps=conv_eps) for _ in range(hc_mult)),
        })

    @property
    def table(self) -> torch.Tensor:
        return self.multi_head_embedding["embedding"].weight

    def keep_table_on_host(self) -> "Engram":
        """Move the table (and the hashing buffers) back to host memory, e.g. after `.to("cuda")`;
        lookups then gather on the host and copy rows to the streams' device."""
        self.multi_head_embedding.to("cpu")
        for name in ("compress", "multipliers", "primes", "offsets"):
            setattr(self, name, getattr(self, name).cpu())
        return self

    def hashes(self, input_ids: torch.Tensor, prefix: torch.Tensor | None = None) -> torch.Tensor:
        """`[B, T, orders * heads]` hashes of the ids (computed where the hashing buffers live)."""
        dev = self.compress.device
        return ops.engram_hash(input_ids.to(dev), self.compress, self.multipliers, self.primes, self.pad_id,
                               None if prefix is None else prefix.to(dev))

    def lookup(self, hashes: torch.Tensor, device: torch.device | str) -> torch.Tensor:
        return ops.engram_lookup(hashes, self.table, self.offsets, device)

    def prefetch(self, prefetcher: ops.EngramPrefetcher, key: object, input_ids: torch.Tensor,
                 prefix: torch.Tensor | None = None) -> None:
        """Start this layer's lookup in `prefetcher` under `key`; pass `prefetcher.get(key)` to forward."""
        prefetcher.submit(key, self.hashes(input_ids, prefix), self.table, self.offsets)

    def _short_conv(self, gated: torch.Tensor) -> torch.Tensor:
        b, t, n, d = gated.shape
        normed = torch.stack([ops.rms_norm(gated[:, :, s], norm.weight, self.conv_eps)
                              for s, norm in enumerate(self.short_conv["norms"])], 2)
        conv = self.short_conv["conv"]
        pad = (conv.kernel_size[0] - 1) * self.max_ngram  # causal: only past positions
        y = F.conv1d(F.pad(normed.reshape(b, t, n * d).transpose(1, 2), (pad, 0)), conv.weight.to(gated.dtype),
                     groups=n * d, dilation=self.max_ngram)
        return F.silu(y).transpose(1, 2).reshape(b, t, n, d)

    def forward(self, streams: torch.Tensor, input_ids: torch.Tensor | None = None,
                memory: torch.Tensor | None = None, prefix: torch.Tensor | None = None) -> torch.Tensor:
        """streams `[B, T, n, D]`; either input_ids `[B, T]` (hashed and looked up here) or
        memory `[B, T, orders * embed_per_ngram]` (from a prefetcher). Returns the new streams,
        `streams + gated + short_conv(gated)`."""
        if memory is None:
            if input_ids is None:
                raise ValueError("Engram.forward: give input_ids or a prefetched memory")
            memory = self.lookup(self.hashes(input_ids, prefix), streams.device)
        memory = memory.to(streams.dtype)
        keys = torch.stack([ops.linear(memory, p.weight, bias=p.bias) for p in self.key_projs], -2)
        value = ops.linear(memory, self.value_proj.weight, bias=self.value_proj.bias)
        key_norm = torch.stack([n.weight for n in self.norm1])
        query_norm = torch.stack([n.weight for n in self.norm2])
        gated = ops.engram_gate(streams, keys, value, key_norm, query_norm, self.gate_eps)
        return streams + gated + self._short_conv(gated)
