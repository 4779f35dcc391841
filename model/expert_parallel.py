"""Expert parallelism: each process holds `E / world` consecutive routed experts; tokens travel to
the process owning their expert and back with two all-to-alls (`model.collectives`).

Works with any process-group backend that implements `all_to_all_single` with uneven splits:
`gloo` on CPU (what the tests launch), `nccl` on NVIDIA GPUs, `hccl` on Ascend (torch_npu
registers it). On Ascend A2/A3 the same exchange exists fused into one kernel each way,
`torch_npu.npu_moe_distribute_dispatch` / `npu_moe_distribute_combine` (their `_v2` variants
take the layout `npu_moe_init_routing_v2` produces); they need HCCL's communication domain name
(`group_ep`) and fixed per-rank token budgets, which is why this module keeps the portable
collective version and the fused one is left to a deployment that owns its HCCL groups.

The layer is `ops.moe_forward` itself with `AllToAll` as its exchange step (the composite's
transport of routed rows to their experts and back). The gate (router) and the shared experts are
replicated; every process routes its own tokens. Each expert sees its rows ordered by source
rank, then token, then choice: for a global batch made of the ranks' batches in rank order that
is exactly the single-process `moe_dispatch` order, so results differ from one process's only by
how a GEMM's blocking depends on its row count.
"""

from __future__ import annotations

import torch

from v4hal import ops
from v4hal.model.collectives import Collectives
from v4hal.model.parallel import DEVICE_BACKENDS, process_group_backend  # noqa: F401 (this module's API)
from v4hal.ops.moe import ExpertExchange, ExpertWeights, MoeDispatch


def expert_range(n_experts: int, world: int, rank: int) -> tuple[int, int]:
    """[start, end) of the experts `rank` owns; the experts must split evenly."""
    if n_experts % world:
        raise ValueError(f"expert parallelism: {n_experts} experts do not split evenly over {world} processes")
    per = n_experts // world
    return rank * per, (rank + 1) * per


def shard_experts(experts: ExpertWeights, world: int, rank: int) -> ExpertWeights:
    """This rank's slice of the stacked expert weights (and their scales)."""
    start, end = expert_range(experts.gate_up.shape[0], world, rank)
    return ExpertWeights(*(t[start:end] if isinstance(t, torch.Tensor) else t for t in experts))


class AllToAll(ExpertExchange):
    """The MoE composite's exchange over the processes of `group` (a torch.distributed process
    group, None = the default one), each holding `E / world` consecutive experts: rows travel to
    their expert's owner and back by all-to-all (`Collectives.all_to_all`, uneven splits)."""

    def __init__(self, group=None):
        self.collectives = Collectives(group)
        self.shards, self.rank = self.collectives.size, self.collectives.rank

    def first_expert(self, held: int) -> int:
        return self.rank * held

    def send(self, state: MoeDispatch):
        # Rows are sorted by global expert = by owning rank, then by that rank's local expert.
        e_local = state.counts.shape[0] // self.shards
        send_counts = state.counts.view(self.shards, e_local)
        recv_counts = self.collectives.all_to_all(send_counts)
        send_splits, recv_splits = send_counts.sum(1).tolist(), recv_counts.sum(1).tolist()
        received = self.collectives.all_to_all(state.permuted, send_splits, recv_splits)
        # Arrivals are ordered (source rank, local expert); a stable sort by local expert makes
        # each expert's rows contiguous, in source-rank order.
        local_expert = torch.arange(e_local, device=received.device).repeat(self.shards)
        order = torch.argsort(torch.repeat_interleave(local_expert, recv_counts.reshape(-1)), stable=True)
        counts = recv_counts.sum(0)
        offsets = torch.cat([counts.new_zeros(1), counts.cumsum(0)])
        return received[order], offsets, (order, send_splits, recv_splits)

    def receive(self, results: torch.Tensor, sent) -> torch.Tensor:
        order, send_splits, recv_splits = sent
        unsorted = torch.empty_like(results)
        unsorted[order] = results
        return self.collectives.all_to_all(unsorted, recv_splits, send_splits)


class LocalExperts(ExpertExchange):
    """The exchange for tokens every process of a group holds alike (tensor parallelism), each
    process holding `E / shards` consecutive experts: a process runs only its experts' rows and
    leaves zeros for the rest; the caller's all-reduce over the group completes every token (as
    DeepSeek's own inference code runs its experts)."""

    def __init__(self, shards: int, rank: int):
        self.shards, self.rank = shards, rank

    def first_expert(self, held: int) -> int:
        return self.rank * held

    def send(self, state: MoeDispatch):
        held = state.counts.shape[0] // self.shards
        first = self.rank * held
        offsets = state.offsets[first:first + held + 1]
        if offsets.device.type == "meta":  # the Ascend dry run: no values; every row stands in (shapes only)
            lo, hi = 0, state.permuted.shape[0]
        else:  # a host read per MoE layer (a sync on a device): the row range of this rank's experts
            lo, hi = int(offsets[0]), int(offsets[-1])
        return state.permuted[lo:hi], offsets - lo, (state.permuted.shape[0], lo, hi)

    def receive(self, results: torch.Tensor, sent) -> torch.Tensor:
        rows, lo, hi = sent
        out = results.new_zeros(rows, *results.shape[1:])
        out[lo:hi] = results
        return out


def moe_forward_ep(hidden: torch.Tensor, gate_weight: torch.Tensor, local_experts: ExpertWeights, topk: int,
                   group=None, **kw) -> torch.Tensor:
    """`ops.moe_forward` with the routed experts spread over the processes of `group`.

    local_experts: this rank's `E / world` experts (`shard_experts`); every other argument is
    `ops.moe_forward`'s, for this rank's own tokens. Returns this rank's output, hidden's shape.
    """
    return ops.moe_forward(hidden, gate_weight, local_experts, topk, exchange=AllToAll(group), **kw)
