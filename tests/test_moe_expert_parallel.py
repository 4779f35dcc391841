"""Expert parallelism on CPU: 2 and 4 processes over gloo, each owning E / world experts and its own
tokens, must reproduce the single-process layer (functional API and the `MoE` module), and the
exchange goes through model/collectives.py (its recording sees the dispatch: the split counts, the
rows out and the rows back)."""

import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from v4hal import ops
from v4hal.model import expert_parallel as ep
from v4hal.model.collectives import recording
from v4hal.model.moe import MoE

H, I, E, TOPK = 32, 16, 8, 3


def _tokens(rank):
    return 3 + 2 * rank  # uneven batches, so the all-to-all splits differ per rank


def _setup():
    """Weights and every rank's tokens, identical in every process (fixed seeds)."""
    g = torch.Generator().manual_seed(0)
    experts = ops.ExpertWeights(torch.randn(E, 2 * I, H, generator=g) * 0.3, torch.randn(E, H, I, generator=g) * 0.3)
    shared = ops.SharedExpertWeights(torch.randn(I, H, generator=g) * 0.3, torch.randn(I, H, generator=g) * 0.3,
                                     torch.randn(H, I, generator=g) * 0.3)
    kw = dict(scoring="sigmoid", bias=torch.randn(E, generator=g) * 0.1, n_group=2, topk_group=1,
              routed_scaling_factor=2.5, swiglu_limit=1.0, shared=shared)
    gate = torch.randn(E, H, generator=g)
    xs = [torch.randn(_tokens(r), H, generator=g) for r in range(4)]
    return gate, experts, kw, xs


def _module(ep_group=None):
    gate, experts, kw, _ = _setup()
    moe = MoE(H, I, E, 1, TOPK, scoring_func="sigmoid", n_group=2, topk_group=1, routed_scaling_factor=2.5,
              swiglu_limit=1.0, dtype=torch.float32, ep_group=ep_group)
    world, rank = (1, 0) if ep_group is None else (dist.get_world_size(ep_group), dist.get_rank(ep_group))
    local = ep.shard_experts(experts, world, rank)
    state = {"gate.weight": gate, "gate.e_score_correction_bias": kw["bias"],
             "experts.gate_up_proj": local.gate_up, "experts.down_proj": local.down,
             "shared_experts.gate_proj.weight": kw["shared"].gate, "shared_experts.up_proj.weight": kw["shared"].up,
             "shared_experts.down_proj.weight": kw["shared"].down}
    moe.load_state_dict(state, strict=True)
    return moe


def _worker(rank, world, init_file, out_dir):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        gate, experts, kw, xs = _setup()
        local = ep.shard_experts(experts, world, rank)
        with recording() as made:
            functional = ep.moe_forward_ep(xs[rank], gate, local, TOPK, group=dist.group.WORLD, **kw)
        module = _module(dist.group.WORLD)(xs[rank].unsqueeze(0)).squeeze(0)
        torch.save({"functional": functional, "module": module, "made": made}, os.path.join(out_dir, f"{rank}.pt"))
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("world", [2, 4])
def test_expert_parallel_equals_single_process(world, tmp_path):
    mp.spawn(_worker, args=(world, str(tmp_path / "init"), str(tmp_path)), nprocs=world, join=True)
    gate, experts, kw, xs = _setup()
    x_all = torch.cat(xs[:world])
    reference = ops.moe_forward(x_all, gate, experts, TOPK, **kw)
    route = {k: kw[k] for k in ("scoring", "bias", "n_group", "topk_group")}
    owner = ops.moe_route(x_all, gate, TOPK, **route)[1] // (E // world)  # the rank holding each choice's expert
    module_reference = _module()(x_all)
    torch.testing.assert_close(module_reference, reference)
    start = 0
    for rank in range(world):
        got = torch.load(tmp_path / f"{rank}.pt")
        rows = slice(start, start + _tokens(rank))
        torch.testing.assert_close(got["functional"], reference[rows], rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(got["module"], reference[rows], rtol=1e-5, atol=1e-6)
        # every expert's row count (int64) to its owner, this rank's rows out, the rows its experts ran back
        row = H * 4
        assert got["made"] == [("all_to_all", E * 8), ("all_to_all", _tokens(rank) * TOPK * row),
                               ("all_to_all", int((owner == rank).sum()) * row)], f"rank {rank}"
        start += _tokens(rank)


def test_helpers():
    assert ep.expert_range(8, 4, 2) == (4, 6)
    with pytest.raises(ValueError, match="split evenly"):
        ep.expert_range(10, 4, 0)
    assert [ep.process_group_backend(d) for d in ("cpu", "cuda", "npu")] == ["gloo", "nccl", "hccl"]
    with pytest.raises(ValueError, match="device type"):
        ep.process_group_backend("meta")
    _, experts, _, _ = _setup()
    shard = ep.shard_experts(experts, 4, 3)
    assert torch.equal(shard.gate_up, experts.gate_up[6:8]) and shard.gate_up_scale is None
