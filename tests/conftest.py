import pytest

from v4hal.backends import registry


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
    """The `scale_fmt` of every `v4hal.ops.quant.quantize_fp8` call while the test runs (the path
    every backend's FP8 linear takes to quantize activations); clear it before the calls judged."""
    from v4hal import ops

    asked, quantize = [], ops.quant.quantize_fp8

    def spy(x, block=ops.ACT_BLOCK, scale_fmt="fp32"):
        asked.append(scale_fmt)
        return quantize(x, block, scale_fmt)

    monkeypatch.setattr(ops.quant, "quantize_fp8", spy)
    return asked
