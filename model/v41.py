"""DeepSeek-V4.1's backbone on top of V4's layers: Engram on `engram_layer_ids` and the delayed
mHC pre-mix (docs/engram.md, "Semantics").

V4.1 collapses each sub-layer's input with the pre-mix weights its *previous* sub-layer computed
(the first attention takes stream 0, the embedding), and the final collapse before the norm uses
the last FFN site's pre-mix: there is no `hc_head`. Post and comb mixes are V4's. Engram adds its
gated memory to the full streams between one layer's FFN post and the next layer's attention pre.

The hashes need only token ids, so `EngramHashing.prepare` hashes every Engram layer at once, and
with `prefetch` (eager only) starts every lookup in an `ops.EngramPrefetcher` before layer 0 runs:
the gathers from host-resident tables overlap the layers before each Engram layer. A cache keeps
the last `max_ngram - 1` ids (`EngramState`) so a decode step hashes like the prefill.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.compiler import is_compiling

from v4hal import ops
from v4hal.model.engram import Engram, EngramArgs, gather_tokens, token_map_from_tokenizer


class EngramState:
    """The ids before the next chunk, `[B, max_ngram - 1]` (-1 before the sequence start)."""

    def __init__(self, ids: torch.Tensor | None = None):
        self.ids = ids

    def clone(self) -> "EngramState":
        return EngramState(None if self.ids is None else self.ids.clone())


class EngramHashing(nn.Module):
    """What the Engram layers share: the compressed token map (set it with `set_token_map`), the
    pad, every layer's multipliers and primes."""

    def __init__(self, args):
        super().__init__()
        self.ea = ea = EngramArgs(args)
        self.vocab_size = args.vocab_size
        from v4hal.model.engram import layer_multipliers

        self.register_buffer("multipliers", torch.stack([layer_multipliers(i, ea.compressed_vocab, ea.max_ngram)
                                                         for i in ea.layer_ids]), persistent=False)
        self.register_buffer("primes", torch.tensor(ea.primes, dtype=torch.int64), persistent=False)
        self.register_buffer("token_map", torch.empty(0, dtype=torch.int64), persistent=False)
        self.pad_id = -1
        self.prefetch = True
        self._prefetcher: ops.EngramPrefetcher | None = None
        self._calls = 0

    def set_token_map(self, source) -> None:
        """`source`: a `[vocab_size]` int tensor of compressed ids (DEAD, -1, allowed: e.g. as a
        saved map holds it), or a tokenizer to build it from (`token_map_from_tokenizer`; ids past
        a tokenizer shorter than the padded vocabulary are DEAD: no text produces them). Its
        compressed vocabulary must be the config's `engram_compressed_vocab_size` (every multiplier
        derives from it); the pad must not be dead; the dead tokens are marked."""
        op, ea = "Engram", self.ea
        from_tokenizer = not isinstance(source, torch.Tensor)
        if from_tokenizer:
            token_map, size = token_map_from_tokenizer(source)
            if token_map.shape[0] < self.vocab_size:
                token_map = torch.cat([token_map, torch.full((self.vocab_size - token_map.shape[0],), ops.DEAD)])
        else:
            token_map = source.to(torch.int64).cpu()
            size = int(token_map.max()) + 1 if token_map.numel() else 0
        what = "tokenizer" if from_tokenizer else "token_map"
        if token_map.dim() != 1 or token_map.shape[0] != self.vocab_size:
            raise ops.OpInputError(op, what, f"one compressed id per token of the vocabulary "
                                   f"({self.vocab_size})", f"shape {tuple(token_map.shape)}")
        if from_tokenizer and size != ea.compressed_vocab:
            raise ops.OpInputError(op, what, f"{ea.compressed_vocab} compressed ids "
                                   "(engram_compressed_vocab_size)", size)
        if int(token_map.min()) < ops.DEAD or size > ea.compressed_vocab:
            raise ops.OpInputError(op, what, f"compressed ids in [0, {ea.compressed_vocab}) "
                                   f"(engram_compressed_vocab_size) or {ops.DEAD} (dead)",
                                   f"{size} compressed ids, min {int(token_map.min())}")
        self.pad_id = int(token_map[ea.pad_token_id])
        if self.pad_id < 0:
            raise ops.OpInputError(op, what, f"a compressed id for engram_pad_token_id {ea.pad_token_id}", "a dead token")
        token_map = token_map.clone()
        token_map[ea.dead_token_ids] = ops.DEAD
        self.token_map = token_map.to(self.multipliers.device)

    def prepare(self, input_ids: torch.Tensor, state: EngramState | None, device: torch.device,
                dtype: torch.dtype, tables: list) -> tuple[list, torch.Tensor]:
        """Hash every Engram layer's rows, start (or do) the lookups; returns per layer either the
        memory or a prefetch key, and the keep mask (False at dead tokens). Advances `state`."""
        if self.token_map.numel() == 0:
            raise RuntimeError("Engram: no compressed token map; call model.set_engram_token_map(tokenizer or tensor)")
        span = self.ea.max_ngram - 1
        ids = input_ids.to(self.token_map.device)
        lookback = None if state is None else state.ids
        if state is not None and lookback is None:
            lookback = torch.full((ids.shape[0], span), -1, dtype=torch.int64, device=ids.device)
        rows = [ops.engram_hash(ids, self.token_map, self.multipliers[i], self.primes[i], self.pad_id, lookback)
                for i in range(len(tables))]
        if tables and tables[0].own_tokens:  # data parallelism: every rank looks up its columns for all tokens
            rows = gather_tokens(tables[0].group, rows)
        rows = [table.local_rows(r) for r, table in zip(rows, tables)]
        if state is not None:  # in place, so a compiled decode step advances it too
            tail = torch.cat([lookback, ids.long()], 1)[:, -span:]
            if state.ids is None:
                state.ids = tail
            else:
                state.ids.copy_(tail)
        keep = (self.token_map[ids] >= 0).to(device)
        if self.prefetch and not is_compiling():
            if self._prefetcher is None or self._prefetcher.device != device:
                self._prefetcher = ops.EngramPrefetcher(device)
            self._calls += 1  # fresh keys: a forward that failed midway leaves its lookups behind
            keys = [(self._calls, i) for i in range(len(tables))]
            for key, r, table in zip(keys, rows, tables):
                self._prefetcher.submit(key, r, table.weight, table.scale, dtype)
            return keys, keep
        return [t.lookup(r, device, dtype) for r, t in zip(rows, tables)], keep

    def memory(self, slot, table, tokens: torch.Size) -> torch.Tensor:
        """A layer's memory for this rank's `tokens` (`[B, T]`) from `prepare`'s slot: this rank's
        columns completed from every rank's (in the forward's own thread, when `table` is split
        over tensor- or data-parallel ranks)."""
        return table.complete(self._prefetcher.get(slot) if isinstance(slot, tuple) else slot, tokens)


def _mix_dtype(streams: torch.Tensor) -> torch.dtype:
    """float32 mixes, float64 for a float64 model (as ops.hc_pre)."""
    return torch.float64 if streams.dtype == torch.float64 else torch.float32


def keep_tables_on_host(backbone) -> None:
    """Move every Engram table back to host memory (pinned where a GPU can copy from it without
    staging), e.g. after `model.to("cuda")`: lookups then gather on the host and copy the rows to
    the streams' device, prefetched behind the layers before each Engram layer."""
    pin = torch.cuda.is_available()
    for layer in backbone.layers:
        table = getattr(layer, "engram", None) and layer.engram.embed
        for name in ("weight", "scale") if table else ():
            t = getattr(table, name)
            if t is not None:
                host = t.detach().cpu()
                setattr(table, name, nn.Parameter(host.pin_memory() if pin else host, requires_grad=False))


def pre_weights(hc, streams: torch.Tensor) -> torch.Tensor:
    """This mHC site's pre-mix `[..., n]` (float32, float64 for a float64 model): `sigmoid(mix[:n] * scale[0] + base[:n]) + hc_eps`,
    `mix = rms_normalised(flat(streams)) @ fn[:n].T`."""
    n = hc.hc_mult
    flat = streams.flatten(-2).to(_mix_dtype(streams))
    unit = torch.ones(flat.shape[-1], dtype=flat.dtype, device=flat.device)
    mix = ops.linear(ops.rms_norm(flat, unit, hc.norm_eps), hc.fn[:n].to(flat.dtype))
    return torch.sigmoid(mix * hc.scale[0].to(flat.dtype) + hc.base[:n].to(flat.dtype)) + hc.hc_eps


def collapse(streams: torch.Tensor, pre: torch.Tensor | None) -> torch.Tensor:
    """`sum_i pre_i * streams_i` in float32, cast back; stream 0 without a pre-mix (the first site)."""
    if pre is None:
        return streams[..., 0, :]
    return (pre.unsqueeze(-1) * streams.to(pre.dtype)).sum(-2).to(streams.dtype)


def layer_forward(layer, h, pre, positions, input_ids, cache, memory=None, keep=None):
    """One V4.1 decoder layer: (Engram,) attention and FFN with delayed pre-mixes."""
    if memory is not None:
        h = layer.engram(h, memory, keep)
    for hc, run in ((layer.attn_hc, lambda x: layer.self_attn(layer.input_layernorm(x), positions, cache)),
                    (layer.ffn_hc, lambda x: layer._mlp(layer.post_attention_layernorm(x), input_ids))):
        _, post, comb = hc(h)
        x, pre = collapse(h, pre), pre_weights(hc, h)
        h = hc.expand(run(x), h, post, comb)
    return h, pre


def attach(backbone, args, par) -> None:
    """Give a V4 backbone V4.1's parts: the shared hashing and an Engram module per listed layer
    (its table split over the tensor- or data-parallel group of `par`, its projection over tp)."""
    backbone.engram_hashing = EngramHashing(args)
    for index, layer_id in enumerate(backbone.engram_hashing.ea.layer_ids):
        backbone.layers[layer_id].engram = Engram(backbone.engram_hashing.ea, index, args.hidden_size, args.hc_mult,
                                                  args.rms_norm_eps, par.tp, par.dp)


def forward(backbone, h, positions, input_ids, caches, state: EngramState | None) -> torch.Tensor:
    """V4.1's layers on the streams `h`; returns the collapsed hidden state before the final norm."""
    hashing = backbone.engram_hashing
    engram_layers = [layer for layer in backbone.layers if getattr(layer, "engram", None) is not None]
    slots, keep = hashing.prepare(input_ids, state, h.device, h.dtype, [layer.engram.embed for layer in engram_layers])
    memories = {id(layer): slot for layer, slot in zip(engram_layers, slots)}
    pre = None
    for layer, cache in zip(backbone.layers, caches):
        slot = memories.get(id(layer))
        memory = None if slot is None else hashing.memory(slot, layer.engram.embed, input_ids.shape)
        h, pre = layer_forward(layer, h, pre, positions, input_ids, cache, memory, keep)
    return collapse(h, pre)
