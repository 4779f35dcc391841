"""For the tests that run the ascend backend on the vendor-op emulator (V4HAL_ASCEND_EMULATE; the
`emulate` fixture in conftest.py switches it on): answering the backend's `npu()` with a wrapped
emulator whose one op is called (or read) the way a wrong backend would."""

import importlib

from v4hal.backends import ascend
from v4hal.bench import parity

FAMILIES = ("attention", "moe", "quant", "basic", "mhc", "kv_cache")  # each did `from v4hal.backends.ascend import npu`


class Flipped:
    """Wraps the emulator so one vendor call goes in (or comes back) the way a wrong backend would
    pass (or read) it: what a numeric check on the emulator must catch."""

    def __init__(self, inner, op_name, change):
        self.inner, self.op_name, self.change = inner, op_name, change

    def __getattr__(self, name):
        fn = getattr(self.inner, name)
        return (lambda *a, **kw: self.change(fn, *a, **kw)) if name == self.op_name else fn


def answer_npu_with(monkeypatch, stand_in) -> None:
    """Every ascend family module's `npu()` returns `stand_in` for the rest of the test."""
    for family in FAMILIES:
        monkeypatch.setattr(importlib.import_module(f"v4hal.backends.ascend.{family}"), "npu", lambda: stand_in)


CHIPS = ("A2", "A3", "A5")

# The expert-sized quantized full cases: building their inputs and float64 reference costs far more
# than the emulated backend's run. test_ascend_emulator_heavy.py runs them, test_ascend_emulator.py
# every other full case (two files for CI's per-file time limit).
HEAVY = ("moe_forward/v3.2/E16-fp8", "moe_forward/v4-flash/E8-fp4", "grouped_matmul/v4-flash/up-fp4",
         "grouped_matmul/v4-pro/up-fp4", "dequantize_fp4/v4-pro/expert-float32", "dequantize_fp4/v4-pro/expert-uint8",
         "dequantize_fp4/v4-pro/expert-float8_e8m0fnu", "quantize_fp4/v4-flash/expert", "quantize_int8/v4-pro/weight")


def judged_on_every_chip(case, emulate) -> list[tuple[dict, int]]:
    """`case` built once (inputs and float64 reference) and judged on the emulated A2, A3 and A5:
    per chip, its parity row and how many vendor ops the chip's emulator answered."""
    built, judged = parity.build(case), []
    for chip in CHIPS:
        emulate(chip)
        (row,) = parity.run_case(case, ["ascend"], built=built)
        judged.append((row, sum(ascend.npu().calls.values())))
    return judged
