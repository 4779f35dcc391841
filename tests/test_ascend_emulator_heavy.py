"""Full parity at real shapes on the emulated A2, A3 and A5 for the expert-sized quantized cases
(`HEAVY`, tests/ascend_util.py): V4-Flash / V4-Pro MXFP4 experts, V3.2 FP8 experts, V4-Pro int8
and FP4 weights. Their inputs and float64 reference cost far more to build than the emulated
backend takes to run, so each case is built once and judged on the three chips in turn (a file of
its own, beside test_ascend_emulator.py's full parity of every other case, for CI's per-file
time limit)."""

import pytest

from v4hal.bench.cases import parity_cases

from ascend_util import CHIPS, HEAVY, judged_on_every_chip


def test_heavy_cases_are_full_parity_cases():
    full = {c.id for c in parity_cases() if not c.quick}
    assert set(HEAVY) <= full, set(HEAVY) - full


@pytest.mark.slow
@pytest.mark.parametrize("case_id", HEAVY)
def test_heavy_full_case_passes_on_every_emulated_chip(emulate, case_id):
    (case,) = [c for c in parity_cases() if c.id == case_id]
    rows = [row for row, _ in judged_on_every_chip(case, emulate)]
    assert [r["backend"] for r in rows] == [f"ascend (emulated {chip})" for chip in CHIPS]
    failed = [(r["backend"], r["note"]) for r in rows if r["status"] != "pass"]
    assert not failed
