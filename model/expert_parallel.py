"""Expert parallelism: each process holds `E / world` consecutive routed experts; tokens travel to
the process owning their expert and back with two all-to-alls (`torch.distributed`).

Works with any process-group backend that implements `all_to_all_single` with uneven splits:
`gloo` on CPU (what the tests launch), `nccl` on NVIDIA GPUs, `hccl` on Ascend (torch_npu
registers it). On Ascend A2/A3 the same exchange exists fused into one kernel each way,
`torch_npu.npu_moe_distribute_dispatch` / `npu_moe_distribute_combine` (their `_v2` variants
take the layout `npu_moe_init_routing_v2` produces); they need HCCL's communication domain name
(`group_ep`) and fixed per-rank token budgets, which is why this module keeps the portable
collective version and the fused one is left to a deployment that owns its HCCL groups.

The gate (router) and the shared experts are replicated; every process routes its own tokens.
Each expert sees its rows ordered by source rank, then token, then choice: for a global batch
made of the ranks' batches in rank order that is exactly the single-process `moe_dispatch`
order, so results differ from one process's only by how a GEMM's blocking depends on its row
count.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from v4hal import ops
from v4hal.backends.cpu.moe import shared_expert
from v4hal.ops.moe import ExpertWeights, SharedExpertWeights

DEVICE_BACKENDS = {"cpu": "gloo", "cuda": "nccl", "npu": "hccl"}


def process_group_backend(device: torch.device | str) -> str:
    """The torch.distributed backend for expert parallelism on `device`'s type."""
    # A plain string is split by hand: "npu" only parses as a torch.device once torch_npu is loaded.
    kind = device.type if isinstance(device, torch.device) else str(device).split(":")[0]
    if kind not in DEVICE_BACKENDS:
        raise ValueError(f"expert parallelism: no process-group backend known for device type {kind!r}; "
                         f"known: {DEVICE_BACKENDS}")
    return DEVICE_BACKENDS[kind]


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


def _exchange(rows: torch.Tensor, send_splits: list[int], recv_splits: list[int], group) -> torch.Tensor:
    out = rows.new_empty(sum(recv_splits), *rows.shape[1:])
    dist.all_to_all_single(out, rows.contiguous(), recv_splits, send_splits, group=group)
    return out


def moe_forward_ep(hidden: torch.Tensor, gate_weight: torch.Tensor, local_experts: ExpertWeights, topk: int,
                   scoring: str = "softmax", bias: torch.Tensor | None = None, n_group: int = 1,
                   topk_group: int = 1, renormalize: bool = True, routed_scaling_factor: float = 1.0,
                   input_ids: torch.Tensor | None = None, tid2eid: torch.Tensor | None = None,
                   swiglu_limit: float | None = None, shared: SharedExpertWeights | None = None,
                   group=None) -> torch.Tensor:
    """`ops.moe_forward` with the routed experts spread over the processes of `group`.

    local_experts: this rank's `E / world` experts (`shard_experts`); every other argument is
    `ops.moe_forward`'s, for this rank's own tokens. Returns this rank's output, hidden's shape.
    """
    world = dist.get_world_size(group)
    e_local = local_experts.gate_up.shape[0]
    n_experts = e_local * world
    h = hidden.shape[-1]
    x = hidden.reshape(-1, h)
    weights, ids = ops.moe_route(hidden, gate_weight, topk, scoring, bias, n_group, topk_group, renormalize,
                                 routed_scaling_factor, input_ids, tid2eid)
    # Sorted by global expert = sorted by owning rank, then by that rank's local expert.
    state = ops.moe_dispatch(x, ids, n_experts)
    send_counts = state.counts.view(world, e_local)
    recv_counts = torch.empty_like(send_counts)
    dist.all_to_all_single(recv_counts, send_counts, group=group)
    send_splits, recv_splits = send_counts.sum(1).tolist(), recv_counts.sum(1).tolist()
    received = _exchange(state.permuted, send_splits, recv_splits, group)

    # Arrivals are ordered (source rank, local expert); a stable sort by local expert makes each
    # expert's rows contiguous, in source-rank order.
    local_expert = torch.arange(e_local, device=x.device).repeat(world)
    row_expert = torch.repeat_interleave(local_expert, recv_counts.reshape(-1))
    order = torch.argsort(row_expert, stable=True)
    counts = recv_counts.sum(0)
    offsets = torch.cat([counts.new_zeros(1), counts.cumsum(0)])
    fmt = local_experts.act_scale_fmt
    up = ops.grouped_matmul(received[order], local_experts.gate_up, offsets, local_experts.gate_up_scale, fmt)
    down = ops.grouped_matmul(ops.swiglu(up, swiglu_limit), local_experts.down, offsets, local_experts.down_scale, fmt)
    results = torch.empty_like(down)
    results[order] = down

    returned = _exchange(results, recv_splits, send_splits, group)
    out = ops.moe_combine(returned, weights, state)
    if shared is not None:
        out = out + shared_expert(x, shared, swiglu_limit)
    return out.reshape(hidden.shape)
