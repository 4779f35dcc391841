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
