"""`v4hal plan`'s weight bytes per device are exactly what each rank of the running model holds:
the model is built on the meta device for every rank of a layout (torch's fake process group
stands in for the other ranks), its state_dict bytes summed and compared with
`plan.weight_bytes` (plus, for V4.1, `plan.engram_bytes`: the Engram projections and this
rank's hash columns of the tables). The loaded-checkpoint version of this check runs under gloo
in tests/test_distributed.py (and, for V4.1, `v4hal generate --tp 2` in tests/test_distributed_v41.py)."""

import pytest
import torch
import torch.distributed as dist
from torch.testing._internal.distributed.fake_pg import FakeStore

from v4hal.model.config import ModelArgs, preset
from v4hal.model.model import build
from v4hal.model.parallel import Layout
from v4hal.model.plan import engram_bytes, weight_bytes

from test_model_v41 import tiny_v41

TINY_MLA = dict(vocab_size=256, hidden_size=64, intermediate_size=96, moe_intermediate_size=32, num_hidden_layers=3,
                num_attention_heads=4, num_key_value_heads=4, q_lora_rank=32, kv_lora_rank=32, qk_nope_head_dim=16,
                qk_rope_head_dim=8, v_head_dim=16, n_routed_experts=8, num_experts_per_tok=2, n_group=4, topk_group=2,
                first_k_dense_replace=1, index_n_heads=8, index_head_dim=16, index_topk=6)
MODELS = {"tiny-v4": preset("tiny").replace(o_groups=4),
          "tiny-v3.2": ModelArgs.from_dict({**TINY_MLA, "model_type": "deepseek_v32"}),
          "tiny-v3-bias": ModelArgs.from_dict({**TINY_MLA, "model_type": "deepseek_v3", "attention_bias": True}),
          "tiny-v4.1": tiny_v41().replace(o_groups=4),
          "v4-flash": preset("v4-flash"), "v4.1-flash": preset("v4.1-flash"), "v4-pro": preset("v4-pro"), "v3.2": preset("v3.2")}
LAYOUTS = [Layout(), Layout(tp=2), Layout(ep=2, dp=2), Layout(tp=2, ep=2), Layout(tp=4), Layout(ep=4, dp=4),
           Layout(tp=4, ep=4)]
BIG_LAYOUTS = [Layout(tp=8, ep=8), Layout(ep=8, dp=8), Layout(tp=8)]


def held_bytes(args: ModelArgs, layout: Layout, rank: int, dtype: torch.dtype) -> int:
    """State-dict bytes of rank `rank`'s model, built on the meta device (nothing allocated)."""
    if layout.devices > 1:
        dist.init_process_group("fake", store=FakeStore(), rank=rank, world_size=layout.devices)
    try:
        model = build(args, dtype, device="meta", layout=layout)
    finally:
        if layout.devices > 1:
            dist.destroy_process_group()
    return sum(t.numel() * t.element_size() for t in model.state_dict().values())


@pytest.mark.parametrize("name", list(MODELS))
@pytest.mark.parametrize("dtype, weights", [(torch.float32, "fp32"), (torch.bfloat16, "bf16")])
def test_plan_predicts_each_ranks_weight_bytes_exactly(name, dtype, weights):
    args = MODELS[name]
    layouts = LAYOUTS if name.startswith("tiny") else BIG_LAYOUTS
    for layout in layouts:
        planned = sum(weight_bytes(args, layout, weights).values())
        ranks = range(layout.devices) if name.startswith("tiny") else (0, layout.devices - 1)
        for rank in ranks:
            engram = sum(engram_bytes(args, layout, weights, rank))  # V4.1: ranks hold unequal hash columns
            assert held_bytes(args, layout, rank, dtype) == planned + engram, f"{name} {layout} rank {rank}"


def test_replicated_tensors_are_not_divided():
    # tp=2 halves the head-split parts only: q_a_proj, the KV head, compressors, norms, router and
    # mHC stay whole, so a rank holds more than half the model
    args = MODELS["tiny-v4"]
    whole, half = (sum(weight_bytes(args, Layout(tp=t), "fp32").values()) for t in (1, 2))
    replicated = sum(n * (8 if kind == "ids" else 4) for _, split, kind, n in args.parameter_groups() if split == "whole")
    assert half == (whole - replicated) / 2 + replicated


def test_auto_weights_follow_the_checkpoint_dtype():
    args = MODELS["tiny-v3.2"]
    assert weight_bytes(args.replace(torch_dtype="float32"), Layout()) == weight_bytes(args, Layout(), "fp32")
    assert weight_bytes(args.replace(torch_dtype="bfloat16"), Layout()) == weight_bytes(args, Layout(), "bf16")


def test_pipeline_stages_hold_only_their_layers_engram_tables():
    """pp splits the layers, so V4.1's Engram modules too: a rank of stage s holds the tables (and
    projections) of the Engram layers among stage s's layers, on its tp rank's hash columns. The
    model runs no pp, so a stage's share is counted in the tp=2 model's state_dict by layer."""
    from v4hal.model.plan import plan, stage_layers

    args = MODELS["tiny-v4.1"]
    assert args.num_hidden_layers == 4 and args.extra["engram_layer_ids"] == [1, 3]
    layout = Layout(tp=2, pp=2)
    assert [list(stage_layers(args, layout, s)) for s in range(2)] == [[0, 1], [2, 3]]
    held = []
    for rank in range(2):
        dist.init_process_group("fake", store=FakeStore(), rank=rank, world_size=2)
        try:
            state = build(args, torch.float32, device="meta", layout=Layout(tp=2)).state_dict()
        finally:
            dist.destroy_process_group()
        for stage in range(2):
            mine = {k: t.numel() * t.element_size() for k, t in state.items()
                    if ".engram." in k and int(k.split(".")[2]) in stage_layers(args, layout, stage)}
            tables = sum(n for k, n in mine.items() if ".engram.embed." in k)
            projections = sum(mine.values()) - tables
            assert tables and projections, (rank, stage)
            assert engram_bytes(args, layout, "fp32", rank, stage) == (projections, tables), (rank, stage)
            held.append(tables)
    assert plan(args, layout, 64, weights="fp32")["host"]["engram tables"] == max(held)
