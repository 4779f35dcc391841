"""DeepSeek-V4.1's Engram module, built from `v4hal.ops` (semantics: docs/engram.md).

Parameters under DeepSeek's names inside `layers.{i}.engram`: `embed.weight` (the layer's table,
`[engram_num_embeddings, engram_head_dim]`, float8 e4m3 with `embed.scale` ue8m0 per 32 columns
as DeepSeek ships it, or BF16), `wkv.weight` (`[(hc_mult + 1) * D, columns * head_dim]`: one key
per mHC stream, then the shared value; `wkv.weight_scale_inv` for FP8), `q_weight` / `k_weight`
(`[hc_mult, D]`, the gate's query / key norms).

Layout helpers derive what the checkpoint does not store, the way the released model derives it:
`table_primes` (each (layer, order, head) the next unused prime above `engram_vocab_size - 1`),
`layer_multipliers` (odd, from numpy's default generator seeded `10007 * layer_id`) and
`token_map_from_tokenizer` (the compressed vocabulary from the tokenizer's normalisation).
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from v4hal import ops
from v4hal.model.layers import Linear
from v4hal.ops._check import OpInputError

LAYER_SEED_STRIDE = 10007


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


def table_primes(vocab_size: int, layers: int, max_ngram: int, heads: int) -> list[list[list[int]]]:
    """`[layer][order][head]` row counts: walking layers, then orders 2..max_ngram, then heads,
    each is the smallest prime above `vocab_size - 1` not handed out before (so the ranges differ
    across heads, orders and layers)."""
    seen: set[int] = set()
    out = []
    for _ in range(layers):
        per_order = []
        for _ in range(max_ngram - 1):
            sizes, candidate = [], vocab_size - 1
            for _ in range(heads):
                candidate += 1
                while not _is_prime(candidate) or candidate in seen:
                    candidate += 1
                seen.add(candidate)
                sizes.append(candidate)
            per_order.append(sizes)
        out.append(per_order)
    return out


def layer_multipliers(layer_id: int, compressed_vocab: int, max_ngram: int) -> torch.Tensor:
    """The layer's `[max_ngram]` odd multipliers: numpy's default generator seeded with
    `10007 * layer_id` draws below `(int64 max // compressed_vocab) // 2`, times 2 plus 1, so no
    compressed id times a multiplier overflows int64."""
    bound = max(1, (np.iinfo(np.int64).max // compressed_vocab) // 2)
    draws = np.random.default_rng(LAYER_SEED_STRIDE * layer_id).integers(0, bound, size=(max_ngram,), dtype=np.int64)
    return torch.from_numpy(draws * 2 + 1)


def token_map_from_tokenizer(tokenizer) -> tuple[torch.Tensor, int]:
    """`([len(tokenizer)] int64 compressed ids, compressed vocabulary size)`: each token's decoded
    text normalised (NFKC, NFD, accents stripped, lower case, whitespace runs folded to one space,
    then stripped, a lone space kept), tokens with equal keys sharing the id of the first; a token
    that decodes to a partial UTF-8 sequence is keyed by its raw token string. Needs a fast
    (`tokenizers`-backed) tokenizer."""
    from tokenizers import Regex, normalizers

    lone_space = "\ue000"  # private use: survives Strip, so " " stays apart from ""
    normalize = normalizers.Sequence([
        normalizers.NFKC(), normalizers.NFD(), normalizers.StripAccents(), normalizers.Lowercase(),
        normalizers.Replace(Regex(r"[ \t\r\n]+"), " "), normalizers.Replace(Regex(r"^ $"), lone_space),
        normalizers.Strip(), normalizers.Replace(lone_space, " ")]).normalize_str
    backend = tokenizer.backend_tokenizer
    ids: dict[str, int] = {}
    out = []
    for token in range(len(tokenizer)):
        text = backend.decode([token], skip_special_tokens=False)
        key = backend.id_to_token(token) if "\ufffd" in text else (normalize(text) or text)
        out.append(ids.setdefault(key, len(ids)))
    return torch.tensor(out, dtype=torch.int64), len(ids)
