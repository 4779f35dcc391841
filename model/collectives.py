"""The collectives the parallel model uses, over one torch.distributed process group.

Model code calls these and never `torch.distributed` itself, so gloo (CPU), nccl (CUDA) and hccl
(Ascend, registered by torch_npu) run the same code. A group of one process (`SOLO`) makes every
collective the identity, which is how the single-process model runs through the same modules.
`recording()` lists the collectives made (what bench.distributed computes, and what the Ascend
dry run and the tests compare with it).
"""

from __future__ import annotations

import contextlib

import torch
import torch.distributed as dist

_recorders: list[list[tuple[str, int]]] = []


@contextlib.contextmanager
def recording():
    """The collectives every group of more than one process makes in this process while the block
    runs, in order, as (kind, bytes): an all-reduce's message, an all-gather's gathered result, the
    rows an all-to-all sends (all of them, this process's own piece included)."""
    calls: list[tuple[str, int]] = []
    _recorders.append(calls)
    try:
        yield calls
    finally:
        _recorders.remove(calls)


def _record(kind: str, x: torch.Tensor, copies: int = 1) -> None:
    for calls in _recorders:
        calls.append((kind, copies * x.numel() * x.element_size()))


class Collectives:
    """`group`: a torch.distributed process group (None = the default one)."""

    def __init__(self, group=None):
        self.group = group
        self.size = dist.get_world_size(group)
        self.rank = dist.get_rank(group)

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        """The sum over the group's processes of each one's `x` (in place, returned)."""
        if self.size > 1:
            _record("all_reduce", x)
            dist.all_reduce(x, group=self.group)
        return x

    def all_gather(self, x: torch.Tensor, dim: int) -> torch.Tensor:
        """Every process's `x` (equal shapes), concatenated along `dim` in rank order."""
        if self.size == 1:
            return x
        _record("all_gather", x, self.size)
        parts = [torch.empty_like(x) for _ in range(self.size)]
        dist.all_gather(parts, x.contiguous(), group=self.group)
        return torch.cat(parts, dim=dim)

    def all_to_all(self, x: torch.Tensor, send_splits: list[int] | None = None,
                   recv_splits: list[int] | None = None) -> torch.Tensor:
        """`x` cut along dim 0 into `size` pieces, piece j sent to process j: equal pieces, or
        `send_splits[j]` rows each (then `recv_splits[j]` rows arrive from process j); returns the
        pieces received, in rank order along dim 0."""
        if self.size == 1:
            return x
        _record("all_to_all", x)
        rows = x.shape[0] if recv_splits is None else sum(recv_splits)
        out = x.new_empty(rows, *x.shape[1:])
        dist.all_to_all_single(out, x.contiguous(), recv_splits, send_splits, group=self.group)
        return out


class _Solo(Collectives):
    def __init__(self):
        self.group, self.size, self.rank = None, 1, 0


SOLO = _Solo()
