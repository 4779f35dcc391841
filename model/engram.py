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

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from v4hal import ops
from v4hal.model.collectives import SOLO
from v4hal.model.layers import Linear

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
    that decodes to a partial UTF-8 sequence is keyed by its raw token string. Takes a fast
    (`tokenizers`-backed) transformers tokenizer or a `tokenizers.Tokenizer` (added tokens counted)."""
    from tokenizers import Regex, normalizers

    lone_space = "\ue000"  # private use: survives Strip, so " " stays apart from ""
    normalize = normalizers.Sequence([
        normalizers.NFKC(), normalizers.NFD(), normalizers.StripAccents(), normalizers.Lowercase(),
        normalizers.Replace(Regex(r"[ \t\r\n]+"), " "), normalizers.Replace(Regex(r"^ $"), lone_space),
        normalizers.Strip(), normalizers.Replace(lone_space, " ")]).normalize_str
    backend = getattr(tokenizer, "backend_tokenizer", tokenizer)
    count = len(tokenizer) if backend is not tokenizer else backend.get_vocab_size(with_added_tokens=True)
    ids: dict[str, int] = {}
    out = []
    for token in range(count):
        text = backend.decode([token], skip_special_tokens=False)
        key = backend.id_to_token(token) if "\ufffd" in text else (normalize(text) or text)
        out.append(ids.setdefault(key, len(ids)))
    return torch.tensor(out, dtype=torch.int64), len(ids)


TOKEN_MAP_FILE = "engram_token_map.json"  # beside the shards, when no tokenizer travels with them
TOKENIZER_FILE = "tokenizer.json"


def save_token_map(token_map: torch.Tensor, path: str | Path) -> None:
    """Write a `[vocab_size]` compressed token map (DEAD, -1, allowed) as `{"token_map": [...]}`."""
    Path(path).write_text(json.dumps({"token_map": token_map.tolist()}, separators=(",", ":")))


def read_token_map(path: str | Path) -> torch.Tensor:
    """The map `save_token_map` wrote; ValueError naming the file when it holds anything else."""
    try:
        ids = json.loads(Path(path).read_text())["token_map"]
        return torch.tensor(ids, dtype=torch.int64)
    except (OSError, ValueError, KeyError, TypeError, RuntimeError) as exc:
        raise ValueError(f"{path}: expected {{\"token_map\": [one integer compressed id per token]}} "
                         f"({type(exc).__name__}: {exc})") from None


def random_token_map(args, seed: int) -> torch.Tensor:
    """A V4.1 model with random weights has no tokenizer: a seeded random `[vocab_size]` map into
    `engram_compressed_vocab_size` ids (`v4hal generate --preset` / `v4hal checkpoint`, demos only)."""
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, int(args.extra["engram_compressed_vocab_size"]), (args.vocab_size,), generator=g)


def token_map_file(directory: str | Path) -> str | None:
    """The file a checkpoint folder's compressed token map comes from: its tokenizer
    (`tokenizer.json`, what the released model builds the map from) first, else a saved map
    (`engram_token_map.json`); None when it has neither."""
    return next((name for name in (TOKENIZER_FILE, TOKEN_MAP_FILE) if (Path(directory) / name).is_file()), None)


def token_map_source(path: str | Path):
    """What `token_map_file` named, opened: a `tokenizers.Tokenizer` or the saved map's tensor."""
    if Path(path).name != TOKENIZER_FILE:
        return read_token_map(path)
    from tokenizers import Tokenizer

    try:
        return Tokenizer.from_file(str(path))
    except Exception as exc:  # tokenizers raises a bare Exception on a malformed file
        raise ValueError(f"{path}: not a tokenizers file ({exc})") from None


class EngramArgs:
    """The `engram_*` fields of a V4.1 config (`ModelArgs.extra`), checked, with what derives from
    them: the primes of every Engram layer and its multipliers. ConfigError names a bad field."""

    FIELDS = ("engram_layer_ids", "engram_num_embeddings", "engram_max_ngram_size", "engram_n_heads",
              "engram_head_dim", "engram_vocab_size", "engram_compressed_vocab_size", "engram_pad_token_id")

    def __init__(self, args):
        from v4hal.model.config import ConfigError

        missing = [f for f in self.FIELDS if f not in args.extra]
        if missing:
            raise ConfigError(f"{missing[0]}: a deepseek_v41 config needs {', '.join(missing)}")
        e = args.extra
        self.layer_ids = [int(i) for i in e["engram_layer_ids"]]
        self.num_embeddings = [int(n) for n in e["engram_num_embeddings"]]
        self.max_ngram, self.heads = int(e["engram_max_ngram_size"]), int(e["engram_n_heads"])
        self.head_dim, self.vocab_size = int(e["engram_head_dim"]), int(e["engram_vocab_size"])
        self.compressed_vocab, self.pad_token_id = int(e["engram_compressed_vocab_size"]), int(e["engram_pad_token_id"])
        # V4.1's image placeholder (the config's image_token_id) blocks n-grams and shuts its gate
        self.dead_token_ids = [int(e["image_token_id"])] if e.get("image_token_id") is not None else []
        if len(self.num_embeddings) != len(self.layer_ids):
            raise ConfigError(f"engram_num_embeddings: one per engram_layer_ids entry ({len(self.layer_ids)}), "
                              f"got {len(self.num_embeddings)}")
        if sorted(set(self.layer_ids)) != self.layer_ids or not all(0 <= i < args.num_hidden_layers for i in self.layer_ids):
            raise ConfigError(f"engram_layer_ids: increasing layer ids in [0, {args.num_hidden_layers}), got {self.layer_ids}")
        if self.max_ngram < 2 or self.heads < 1 or self.head_dim < 1 or self.compressed_vocab < 1:
            raise ConfigError("engram_max_ngram_size >= 2, engram_n_heads, engram_head_dim and "
                              "engram_compressed_vocab_size >= 1 expected")
        self.primes = table_primes(self.vocab_size, len(self.layer_ids), self.max_ngram, self.heads)
        for n, primes in zip(self.num_embeddings, self.primes):
            if n < sum(map(sum, primes)):
                raise ConfigError(f"engram_num_embeddings: {n} rows cannot hold the {sum(map(sum, primes))} "
                                  f"of {self.heads} heads x {self.max_ngram - 1} orders from engram_vocab_size")
        self.table_dtype = torch.float8_e4m3fn if args.quantization_config else None  # None: the model's

    @property
    def columns(self) -> int:
        """Rows looked up per token and layer: (max_ngram - 1) * heads."""
        return (self.max_ngram - 1) * self.heads

    def table_rows(self, shards: int = 1, rank: int = 0, layers: range | None = None) -> int:
        """Rows of every layer's table (of the Engram layers among `layers`, None: all) a rank
        holds when the tables are split by hash columns over `shards` (tensor- or data-parallel)
        ranks (`ColumnShard`; all of them for one)."""
        held = [i for i, layer in enumerate(self.layer_ids) if layers is None or layer in layers]
        if shards == 1:
            return sum(self.num_embeddings[i] for i in held)
        return sum(s.row_stop - s.row_start for s in (ColumnShard.of(self, i, shards, rank) for i in held))

    def table_bytes(self, shards: int = 1, rank: int | None = None, float_bytes: float = 2,
                    layers: range | None = None) -> int:
        """Bytes of every layer's table (of the Engram layers among `layers`, None: all) as built
        (float8 plus one ue8m0 byte per 32 columns, or rows of `float_bytes` per value: the
        model's dtype) on `rank` of `shards`, or on the rank holding the most (None)."""
        per_row = self.head_dim + self.head_dim // ops.SCALE_BLOCK if self.table_dtype else float_bytes * self.head_dim
        ranks = range(shards) if rank is None else (rank,)
        return int(max(self.table_rows(shards, r, layers) for r in ranks) * per_row)


@dataclass(frozen=True)
class ColumnShard:
    """A tensor-parallel rank's share of one Engram table, split as vLLM splits it: the layer's
    hash columns ((order, head) pairs, order-major) cut into pieces of `per = ceil(columns / tp)`
    (the last rank's may be shorter), each rank holding hash columns `[start, stop)` and the rows
    they address, `[row_start, row_stop)` (contiguous: the column offsets are the cumulative sum of
    their primes). Rows past every column's prime are held by no rank."""

    columns: int
    start: int
    stop: int
    per: int
    row_start: int
    row_stop: int

    @classmethod
    def of(cls, ea: "EngramArgs", index: int, tp_size: int, tp_rank: int) -> "ColumnShard":
        per = -(-ea.columns // tp_size)
        start, stop = min(tp_rank * per, ea.columns), min((tp_rank + 1) * per, ea.columns)
        primes = [p for order in ea.primes[index] for p in order]
        return cls(ea.columns, start, stop, per, sum(primes[:start]), sum(primes[:stop]))


class EngramTable(nn.Module):
    """`embed.weight` `[rows, head_dim]` and, for a float8 table, `embed.scale` (float8_e8m0fnu,
    one per 32 columns), in the dtypes DeepSeek ships (float32 scales load as stored). Split over the ranks of `group` (its rank's
    `shard`), it holds only the shard's rows: `lookup` gathers this rank's hash columns and
    `complete` brings every rank's columns together. Under tensor parallelism every rank has the
    same tokens (an all-gather of the columns); under data parallelism (`own_tokens`) each has
    its own: `gather_tokens` first brings every rank's hashed rows to every rank, and `complete`
    sends each rank its tokens' columns back (an all-to-all)."""

    def __init__(self, rows: int, head_dim: int, dtype: torch.dtype | None, shard: ColumnShard | None = None,
                 group=SOLO, own_tokens: bool = False):
        super().__init__()
        self.shard, self.group, self.own_tokens, self.head_dim = shard, group, own_tokens, head_dim
        if shard is not None:
            rows = shard.row_stop - shard.row_start
        self.weight = nn.Parameter(torch.empty(rows, head_dim, dtype=dtype), requires_grad=False)
        quantized = self.weight.dtype == torch.float8_e4m3fn
        self.scale = (nn.Parameter(torch.empty(rows, head_dim // ops.SCALE_BLOCK, dtype=torch.float8_e8m0fnu),
                                   requires_grad=False) if quantized else None)

    def init_random(self, g: torch.Generator) -> None:
        with torch.no_grad():
            self.weight.copy_(torch.randn(self.weight.shape, generator=g).to(self.weight.dtype))
            if self.scale is not None:  # factors 2^-3 .. 2^-1
                self.scale.view(torch.uint8).copy_(torch.randint(124, 127, self.scale.shape, generator=g, dtype=torch.uint8))

    def adopt(self, weight: torch.Tensor, scale: torch.Tensor | None) -> None:
        """Take a table in the other encoding than built, as stored: float8 with its scales into a
        table built float (e.g. from a config whose quantization_config a conversion dropped), or
        a float one, without scales, into a table built float8 (`convert run --engram-tables bf16`
        of a checkpoint that keeps its quantization_config)."""
        float8 = scale is not None
        if tuple(weight.shape) != tuple(self.weight.shape) or (weight.dtype == torch.float8_e4m3fn) != float8 \
                or not weight.dtype.is_floating_point:
            want = "a float8_e4m3fn table with its scale" if float8 else "a float table"
            raise ops.OpInputError("EngramTable", "weight", f"{want} of shape {tuple(self.weight.shape)}",
                                   f"{weight.dtype} {tuple(weight.shape)}")
        self.weight = nn.Parameter(weight, requires_grad=False)
        self.scale = None if scale is None else nn.Parameter(scale, requires_grad=False)  # float32: factors as stored

    def local_rows(self, rows: torch.Tensor) -> torch.Tensor:
        """The layer's table rows `[..., columns]` (under data parallelism `gather_tokens`' output,
        -1 in its padding) -> this rank's columns, as rows of its shard (padding: row 0, discarded
        by `complete`)."""
        if self.shard is None:
            return rows
        local = rows[..., self.shard.start:self.shard.stop] - self.shard.row_start
        return local.clamp_min(0) if self.own_tokens else local

    def lookup(self, rows: torch.Tensor, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
        """`local_rows` looked up: `[..., this rank's columns * head_dim]`."""
        return ops.engram_lookup(rows, self.weight, self.scale, device, dtype)

    def complete(self, memory: torch.Tensor, tokens: torch.Size) -> torch.Tensor:
        """This rank's looked-up columns -> every column's, in column order, for this rank's
        `tokens` (the `[B, T]` shape of its ids): an all-gather of the columns, or under data
        parallelism an all-to-all returning each rank's tokens from every rank's columns."""
        if self.shard is None:
            return memory
        s, d = self.shard, self.head_dim
        pad = (s.per - (s.stop - s.start)) * d  # the last rank's missing columns: zeros
        if pad:
            memory = torch.nn.functional.pad(memory, (0, pad))
        if not self.own_tokens:
            return self.group.all_gather(memory, -1)[..., : s.columns * d]
        # memory: [size * slot, per * d], rank j's tokens at [j * slot, ...); back: my tokens from rank j
        size, count = self.group.size, tokens.numel()
        back = self.group.all_to_all(memory).unflatten(0, (size, -1))[:, :count]
        return back.transpose(0, 1).flatten(1)[:, : s.columns * d].unflatten(0, tokens)


def gather_tokens(group, rows: list[torch.Tensor]) -> list[torch.Tensor]:
    """Data parallelism: every Engram layer's hashed rows `[B, T, columns]` of this rank's tokens
    (counts may differ between ranks) -> per layer `[size * slot, columns]`, every rank's tokens,
    rank j's at `[j * slot, j * slot + its count)`, -1 after them (`slot`: the largest count;
    the counts are gathered first, one host read)."""
    flat = torch.stack([r.flatten(0, -2) for r in rows])
    counts = group.all_gather(torch.tensor([flat.shape[1]], device=flat.device), 0)
    slot = int(counts.max())
    padded = torch.nn.functional.pad(flat, (0, 0, 0, slot - flat.shape[1]), value=-1)
    return list(group.all_gather(padded, 1).unbind(0))


class Engram(nn.Module):
    """One V4.1 Engram module (`layers.{i}.engram`): the table, `kv_proj` (DeepSeek: `wkv`), the
    gate's `q_weight` / `k_weight`. `forward(streams, memory, keep)` -> the streams with the gated
    value added (`keep`: False for dead tokens). Under tensor parallelism (`tp`) the table holds
    this rank's hash columns (`ColumnShard`) and `kv_proj` this rank's output columns (column
    parallel, gathered), as vLLM splits them; under data parallelism (`dp`, tp = 1) the table
    holds this rank's hash columns and `kv_proj` is whole."""

    def __init__(self, ea: EngramArgs, index: int, hidden_size: int, hc_mult: int, eps: float, tp=SOLO, dp=SOLO):
        super().__init__()
        self.hc_mult, self.hidden_size, self.eps, self.tp = hc_mult, hidden_size, eps, tp
        split = tp if tp.size > 1 else dp  # the model runs tp > 1 or dp > 1, not both
        shard = ColumnShard.of(ea, index, split.size, split.rank) if split.size > 1 else None
        self.embed = EngramTable(ea.num_embeddings[index], ea.head_dim, ea.table_dtype, shard, split,
                                 own_tokens=split is dp and dp.size > 1)
        self.kv_proj = Linear(ea.columns * ea.head_dim, (hc_mult + 1) * hidden_size // tp.size)
        self.q_weight = nn.Parameter(torch.ones(hc_mult, hidden_size), requires_grad=False)
        self.k_weight = nn.Parameter(torch.ones(hc_mult, hidden_size), requires_grad=False)

    def forward(self, streams: torch.Tensor, memory: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
        kv = self.tp.all_gather(self.kv_proj(memory.to(streams.dtype)), -1)
        keys = kv[..., : self.hc_mult * self.hidden_size].unflatten(-1, (self.hc_mult, self.hidden_size))
        value = kv[..., self.hc_mult * self.hidden_size:]
        return streams + ops.engram_gate(streams, keys, value, self.k_weight, self.q_weight, self.eps, keep)


def plan_bytes(args, matrix_bytes: float, float_bytes: float, tp: int = 1, dp: int = 1,
               rank: int | None = None, layers: range | None = None) -> tuple[float, float]:
    """(device bytes of every Engram module's projections (`kv_proj`, split over `tp` ranks, at
    `matrix_bytes` per weight) and gate weights (whole, at `float_bytes`), host bytes of its tables
    as built (`table_bytes`), split by hash columns over the tp * dp ranks: on rank `rank` of
    them, or on the rank holding the most (None)) for `v4hal plan`, counting the Engram layers
    among `layers` (a pipeline stage's; None: all); (0, 0) without Engram."""
    if not args.is_v41:
        return 0.0, 0.0
    ea = EngramArgs(args)
    proj = ea.columns * ea.head_dim * (args.hc_mult + 1) * args.hidden_size // tp * matrix_bytes
    gate = 2 * args.hc_mult * args.hidden_size * float_bytes
    modules = sum(layers is None or layer in layers for layer in ea.layer_ids)
    return modules * (proj + gate), float(ea.table_bytes(tp * dp, rank, float_bytes, layers))
