"""Tensor/expert-parallel resharding rules, with the semantics of DeepSeek's own convert script:
routed experts go whole to rank `e // (n_experts / mp)`; column-parallel linears (and the
embedding / LM head, by vocabulary, and V4's grouped `wo_a`, its sinks and the indexer's
`weights_proj`, by heads) split along dim 0, row-parallel linears along dim 1; all else (V4's
compressors, KV head and `wq_a` included) is replicated: the layout `v4hal.model.parallel` runs
with tp = ep = mp. A weight's scale splits along the same dim, in whole quantization blocks.
V4.1's Engram tables (and their scales) go by rows, each rank the rows of its hash columns
(`model.engram.ColumnShard`, from the config's `engram_*` fields; uneven), and its Engram
`wkv` / `kv_proj` along dim 0.

Names are recognised in both namings DeepSeek checkpoints use: HF (`q_b_proj`, `o_proj`,
`gate_proj`, ...) and official (`wq_b`, `wo`, `w1`, ...)."""

from __future__ import annotations

import re

from v4hal.conversion.formats import Job

DIM0 = {"embed_tokens", "embed", "lm_head", "head", "q_proj", "q_b_proj", "wq", "wq_b", "kv_b_proj", "wkv_b",
        "gate_proj", "up_proj", "w1", "w3", "o_a_proj", "wo_a", "weights_proj"}
ENGRAM_TABLE = re.compile(r"(^|\.)layers\.(\d+)\.engram\.embed\.(weight|scale)$")
ENGRAM_PROJ = re.compile(r"\.engram\.(wkv|kv_proj)\.")
DIM1 = {"o_proj", "wo", "down_proj", "w2", "o_b_proj", "wo_b"}
SINKS = {"attn_sink", "sinks"}  # V4's per-head attention sinks, split with the heads
EXPERT = re.compile(r"\.experts\.(\d+)\.")


def module_key(name: str) -> str:
    parts = name.split(".")
    return parts[-2] if len(parts) >= 2 else parts[0]


def engram_rows(config: dict | None, mp: int):
    """`layer id -> [(first row, end row) per rank]` of V4.1's Engram tables split by hash columns
    over `mp` ranks (None for a config without Engram)."""
    from v4hal.model.config import ModelArgs
    from v4hal.model.engram import ColumnShard, EngramArgs

    text = (config or {}).get("text_config") or config or {}
    if "engram_layer_ids" not in text:  # only a V4.1 config is parsed: resharding needs no other
        return None
    ea = EngramArgs(ModelArgs.from_dict(config))
    return {layer: [(s.row_start, s.row_stop) for s in (ColumnShard.of(ea, i, mp, r) for r in range(mp))]
            for i, layer in enumerate(ea.layer_ids)}


def assign(jobs: list[Job], mp: int, n_experts: int | None, engram: dict | None = None) -> None:
    """Set `job.split` for every job: ("expert", rank), ("dim", d, block), ("rows", [(lo, hi) per
    rank]) or ("all",). `engram`: `engram_rows` of the checkpoint's config."""
    experts = [int(m.group(1)) for j in jobs if (m := EXPERT.search(j.source))]
    n_experts = n_experts or (max(experts) + 1 if experts else 0)
    if experts and n_experts % mp:
        raise ValueError(f"reshard: {n_experts} routed experts do not divide over {mp} ranks")
    for j in jobs:
        m = EXPERT.search(j.source)
        key = module_key(j.source)
        if table := ENGRAM_TABLE.search(j.source):
            if engram is None or int(table.group(2)) not in engram:
                raise ValueError(f"reshard: {j.source} is a V4.1 Engram table, but the checkpoint's config.json "
                                 f"lists no such Engram layer (engram_layer_ids) to split its hash columns by")
            j.split = ("rows", engram[int(table.group(2))])
        elif ENGRAM_PROJ.search(j.source):  # column parallel, as the model runs it
            _check_divisible(j, 0, mp, block_of(j, 0))
            j.split = ("dim", 0, block_of(j, 0))
        elif ".compressor." in j.source:  # V4's compressors stay whole (their gate_proj is no MLP's)
            j.split = ("all",)
        elif j.source.rsplit(".", 1)[-1] in SINKS:
            _check_divisible(j, 0, mp, 1)
            j.split = ("dim", 0, 1)
        elif m:
            j.split = ("expert", int(m.group(1)) // (n_experts // mp))
        elif key in DIM0 or key in DIM1 and len(j.outputs[0].shape) > 1:  # a row-parallel bias is whole
            d = 0 if key in DIM0 else 1
            block = block_of(j, d)
            _check_divisible(j, d, mp, block)
            j.split = ("dim", d, block)
        else:
            j.split = ("all",)


def block_of(j: Job, d: int) -> int:
    """Quantization block of the job's main output along dim d (a rank must hold whole blocks)."""
    main = j.outputs[0]
    if len(j.outputs) == 1:
        return 1
    scale = j.outputs[1].shape
    if len(scale) != 2 or len(main.shape) != 2:
        return 1
    if scale[d] == 1:
        return 1
    return next((b for b in (1, 16, 32, 128) if -(-main.shape[d] // b) == scale[d]), 1)


def _check_divisible(j: Job, d: int, mp: int, block: int) -> None:
    size = j.outputs[0].shape[d]
    if size % mp or (size // mp) % block and block > 1:
        raise ValueError(f"reshard: {j.outputs[0].name} has {size} along dim {d}; a rank's share must be a "
                         f"multiple of the {block}-wide quantization block for {mp} ranks")


def pieces(j: Job, out_index: int, t, mp: int, row0: int = 0):
    """Split one piece of output `out_index` (rows row0.. of it for the main output, the whole
    tensor for a side output) into per-rank pieces: yields (rank, tensor)."""
    kind = j.split[0]
    if kind == "all":
        for r in range(mp):
            yield r, t
        return
    if kind == "expert":
        yield j.split[1], t
        return
    if kind == "rows":
        for r, (lo, hi) in enumerate(j.split[1]):
            lo, hi = max(lo, row0), min(hi, row0 + t.shape[0])
            if lo < hi:
                yield r, t[lo - row0: hi - row0]
        return
    _, d, _ = j.split
    full = j.outputs[out_index].shape
    if full[d] == 1 and out_index > 0:  # a per-row scale of a column-split weight is shared
        for r in range(mp):
            yield r, t
        return
    share = full[d] // mp
    if d == 1:
        for r in range(mp):
            yield r, t[:, r * share:(r + 1) * share]
        return
    for r in range(mp):
        lo, hi = max(r * share, row0), min((r + 1) * share, row0 + t.shape[0])
        if lo < hi:
            yield r, t[lo - row0: hi - row0]


def rank_shape(j: Job, out_index: int, mp: int, rank: int) -> tuple[int, ...] | None:
    """Shape of output `out_index` on `rank`, or None when the rank does not hold it."""
    shape = j.outputs[out_index].shape
    kind = j.split[0]
    if kind == "all":
        return shape
    if kind == "expert":
        return shape if j.split[1] == rank else None
    if kind == "rows":
        lo, hi = j.split[1][rank]
        return (hi - lo, *shape[1:])
    _, d, _ = j.split
    if shape[d] == 1 and out_index > 0:
        return shape
    shape = list(shape)
    shape[d] //= mp
    return tuple(shape)
