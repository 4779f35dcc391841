"""The Ascend dry run's distributed case: rank 0 of V4-Flash at tp=8 x ep=8 (8 x 910B), built on
the meta device beside a fake process group, runs a prefill and a decode step through the ascend
backend: every vendor op accepts the per-rank shapes, and the decode step's collectives are, in
order, those bench.distributed computes for docs/distributed.md."""

import re

import pytest

from v4hal.bench.distributed import collectives
from v4hal.model.config import preset
from v4hal.model.parallel import Layout
from v4hal.tools.ascend import dryrun_parallel


def _shapes(call) -> list[list[int]]:
    return [[int(n) for n in m.split(", ")] for m in re.findall(r"\[(\d+(?:, \d+)*)\]", " ".join(call.args))]


@pytest.fixture(scope="module")
def flash_tp8():
    return dryrun_parallel.run_parallel_model("v4-flash", "A2", Layout(tp=8, ep=8))


def test_one_rank_of_v4_flash_at_tp8_ep8_passes_on_meta(flash_tp8):
    r, args = flash_tp8, preset("v4-flash")
    assert r.status == "pass", r.note
    assert {"npu_rms_norm", "npu_moe_gating_top_k", "npu_grouped_matmul", "npu_sparse_flash_attention"} <= set(r.vendor_ops)
    attention = [c for c in r.calls if c.op == "npu_sparse_flash_attention"]
    assert {_shapes(c)[0][2] for c in attention} == {args.num_attention_heads // 8}  # query [B, S, heads, D]
    experts = [c for c in r.calls if c.op == "npu_grouped_matmul"]
    assert {_shapes(c)[1][0] for c in experts} == {args.n_routed_experts // 8}  # this rank's experts
    assert dryrun_parallel.HOST_READ in r.warnings


def test_the_decode_collectives_are_the_computed_ones(flash_tp8):
    made = collectives(preset("v4-flash"), Layout(tp=8, ep=8), context=17)
    assert flash_tp8.note == f"decode step: {len(made)} collectives, {sum(b for _, b in made):,} bytes of messages"
    assert len(made) == 108 and made[-1] == ("all_gather", 129280 * 4)  # docs/distributed.md's table


def test_a_wrong_computation_fails_the_case(monkeypatch):
    import v4hal.bench.distributed as bench

    real = bench.collectives
    monkeypatch.setattr(bench, "collectives", lambda *a, **kw: real(*a, **kw)[1:])  # forgets the embedding
    r = dryrun_parallel.run_parallel_model("tiny-v4", "A2", Layout(tp=2, ep=2))
    assert r.status == "fail" and "decode collectives:" in r.note and "12 made, 11 computed" in r.note, r.note


def test_layouts_with_data_dependent_exchanges_are_refused():
    with pytest.raises(ValueError, match="needs tp > 1 and ep 1 or tp"):
        dryrun_parallel.run_parallel_model("tiny-v4", "A2", Layout(ep=2, dp=2))
