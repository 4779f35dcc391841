"""Decode at fixed shapes, compiled into one graph per step.

    cache = model.new_cache()
    logits = model(prompt_ids, cache=cache, last_only=True)         # eager prefill
    decoder = StaticDecoder(model, cache, capacity=len_prompt + 64)  # compile=False: same step, eager
    logits = decoder(next_ids)                                       # [B, 1] -> [B, 1, vocab]

Why: at decode a small model's step is ~1,400 small ops, and their per-op cost, not memory
traffic, sets the time (docs/model.md, "Why eager decode stays near 1.25x"). `torch.compile` fuses them
only if nothing changes shape from one step to the next, so the decoder moves the prefill's cache
into fixed-capacity buffers (`V4Attention.static_cache`, `V32Attention.static_cache`): the
sliding window becomes a ring, compressed entries and indexer keys get a slot each in advance,
compressors keep their open window at full size, and every write happens at a tensor position
(under a `where` when a window may not close). Attention reads the whole buffer; indices mark
unwritten slots -1. The step is the same layers and ops as eager decode, so it runs on every
backend whose ops dynamo can trace (cpu and cpu_fast are tested); the first call compiles
(tens of seconds on this CPU), later calls reuse the graph for any decoder of the same shapes.
"""

from __future__ import annotations

import functools

import torch

from v4hal import ops
from v4hal.model.model import DeepseekForCausalLM, ModelCache


def _step(model: DeepseekForCausalLM, ids: torch.Tensor, positions: torch.Tensor, layers: list,
          engram=None) -> torch.Tensor:
    return model.lm_head(model.model(ids, positions, layers, engram)).float()


@functools.cache
def compiled_step():
    # Shapes are fixed by construction: dynamic=False keeps the graph free of symbolic sizes.
    return torch.compile(_step, dynamic=False)


class StaticDecoder:
    """Decodes after a prefill, one token per sequence per call, at fixed shapes (module doc).
    `capacity`: the most tokens (prompt included) the sequences may reach. The prefill's
    `cache` is copied, not shared: it does not advance with the decoder."""

    def __init__(self, model: DeepseekForCausalLM, cache: ModelCache, capacity: int, compile: bool = True):
        if cache.length < 1:
            raise ValueError("StaticDecoder: the cache is empty; prefill at least one token first")
        if capacity <= cache.length:
            raise ValueError(f"StaticDecoder: capacity must exceed the {cache.length} cached token(s), got {capacity}")
        self.model, self.capacity = model, capacity
        like = model.model.embed_tokens.weight
        with torch.no_grad():
            self.cache = ModelCache([layer.self_attn.static_cache(c, cache.batch, capacity, like)
                                     for layer, c in zip(model.model.layers, cache.layers)])
        self.cache.length, self.cache.batch = cache.length, cache.batch
        self.cache.engram = None if cache.engram is None else cache.engram.clone()  # V4.1's last ids
        self._step = compiled_step() if compile else _step

    @property
    def length(self) -> int:
        """Tokens the sequences hold so far (prompt included)."""
        return self.cache.length

    def __call__(self, ids: torch.Tensor) -> torch.Tensor:
        """ids `[B, 1]` (the batch of the prefill) -> logits `[B, 1, vocab]` float32."""
        if tuple(ids.shape) != (self.cache.batch, 1):
            raise ValueError(f"StaticDecoder: ids must be [{self.cache.batch}, 1] (one token per sequence of the "
                             f"prefill's batch), got shape {tuple(ids.shape)}")
        if self.cache.length >= self.capacity:
            raise ValueError(f"StaticDecoder: the cache is full ({self.capacity} tokens, the capacity it "
                             "was built with); build the decoder with a larger capacity")
        vocab = self.model.args.vocab_size
        if ops.may_read_values(ids):  # checked here: a compiled gather would not
            lo, hi = int(ids.min()), int(ids.max())
            if lo < 0 or hi >= vocab:
                raise ValueError(f"StaticDecoder: token ids must be in [0, {vocab}), got values in [{lo}, {hi}]")
        positions = torch.full_like(ids, self.cache.length)
        with torch.no_grad():
            logits = self._step(self.model, ids, positions, self.cache.layers, self.cache.engram)
        self.cache.length += 1
        return self.model.parallel.tp.all_gather(logits, dim=-1)  # under tp, the vocabulary's slices
