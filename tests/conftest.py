import os

import pytest

# The cuda backend's Triton kernels are tested in Triton's interpreter (tests/test_cuda_triton.py).
# triton reads TRITON_INTERPRET when it is imported (mindspore imports it too, so any test file may
# be first) and when a kernel runs, so it is set here, before any test module is imported.
os.environ.setdefault("TRITON_INTERPRET", "1")

from v4hal.backends import ascend, registry  # noqa: E402


@pytest.fixture(autouse=True)
def _fresh_registry(monkeypatch):
    """Every test starts from the environment's defaults, with no cached backend choice."""
    for var in ("V4HAL_BACKEND", "V4HAL_OP_BACKENDS", "V4HAL_FALLBACK", "V4HAL_ASCEND_CHIP", "V4HAL_CHECKS"):
        monkeypatch.delenv(var, raising=False)
    registry.reset()
    yield
    registry.reset()


@pytest.fixture
def fp8_scale_fmts(monkeypatch):
    """The `scale_fmt` of every activation quantization (`quantize_fp8`) the FP8 `linear`
    composite dispatches while the test runs (the path every torch backend's FP8 linear takes);
    clear it before the calls judged."""
    from v4hal.ops import basic

    asked, dispatch = [], basic.dispatch

    def spying_dispatch(op):
        fn = dispatch(op)
        if op != "quantize_fp8":
            return fn

        def spy(x, block, scale_fmt):
            asked.append(scale_fmt)
            return fn(x, block, scale_fmt)
        return spy

    monkeypatch.setattr(basic, "dispatch", spying_dispatch)
    return asked


@pytest.fixture
def emulate(monkeypatch):
    """emulate("A3"): the ascend backend answers from the emulated A3, counts cleared."""
    def use(chip):
        monkeypatch.setenv("V4HAL_ASCEND_EMULATE", chip)
        registry.reset()
        ascend.npu().calls.clear()
    yield use
    monkeypatch.delenv("V4HAL_ASCEND_EMULATE", raising=False)
    registry.reset()
