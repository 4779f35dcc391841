"""For the tests that run the ascend backend on the vendor-op emulator (V4HAL_ASCEND_EMULATE; the
`emulate` fixture in conftest.py switches it on): answering the backend's `npu()` with a wrapped
emulator whose one op is called (or read) the way a wrong backend would."""

import importlib

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
