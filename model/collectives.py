"""The collectives the parallel model uses, over one torch.distributed process group.

Model code calls these and never `torch.distributed` itself, so gloo (CPU), nccl (CUDA) and hccl
(Ascend, registered by torch_npu) run the same code. A group of one process (`SOLO`) makes every
collective the identity, which is how the single-process model runs through the same modules.
"""

from __future__ import annotations

import torch
import torch.distributed as dist


class Collectives:
    """`group`: a torch.distributed process group (None = the default one)."""

    def __init__(self, group=None):
        self.group = group
        self.size = dist.get_world_size(group)
        self.rank = dist.get_rank(group)

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        """The sum over the group's processes of each one's `x` (in place, returned)."""
        if self.size > 1:
            dist.all_reduce(x, group=self.group)
        return x

    def all_gather(self, x: torch.Tensor, dim: int) -> torch.Tensor:
        """Every process's `x` (equal shapes), concatenated along `dim` in rank order."""
        if self.size == 1:
            return x
        parts = [torch.empty_like(x) for _ in range(self.size)]
        dist.all_gather(parts, x.contiguous(), group=self.group)
        return torch.cat(parts, dim=dim)

    def all_to_all(self, x: torch.Tensor) -> torch.Tensor:
        """`x` cut into `size` equal pieces along dim 0, piece j sent to process j; returns the
        pieces received, in rank order along dim 0 (x's shape)."""
        if self.size == 1:
            return x
        out = torch.empty_like(x)
        dist.all_to_all_single(out, x.contiguous(), group=self.group)
        return out


class _Solo(Collectives):
    def __init__(self):
        self.group, self.size, self.rank = None, 1, 0


SOLO = _Solo()
