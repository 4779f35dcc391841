"""The whole model under each backend usable here and under per-op overrides, against the cpu
reference; the mindspore backend end to end (issue 3); and the model's parity cases."""

import pytest
import torch

from v4hal.backends import registry
from v4hal.bench import cases_model
from v4hal.bench.parity import run_case

NAMES = ["tiny-v4", "tiny-v32"]
TOL = dict(rtol=1e-4, atol=1e-4)


def _ids(name, n=29):
    return torch.randint(0, cases_model.CONFIGS[name].vocab_size, (2, n), generator=torch.Generator().manual_seed(7))


def _logits(name, cache_steps=0, n=29):
    """One-shot logits, or a cached prefill followed by `cache_steps` single-token decodes."""
    model, ids = cases_model.model_for(name), _ids(name, n)
    with torch.no_grad():
        if not cache_steps:
            return model(ids)
        cache = model.new_cache()
        first = ids.shape[1] - cache_steps
        out = [model(ids[:, :first], cache=cache)]
        out += [model(ids[:, i:i + 1], cache=cache) for i in range(first, ids.shape[1])]
        return torch.cat(out, dim=1)


def _used_backends():
    return {c.backend for c in registry.chosen().values()}


@pytest.fixture(scope="module")
def reference():
    with registry.forced("cpu"):
        out = {(n, k): _logits(n, k) for n in NAMES for k in (0, 5)}
        out.update({(n, "ms"): _logits(n, 2, 17) for n in NAMES})
        return out


def test_cpu_fast_is_usable_here():
    assert registry.probe("cpu_fast")[0] and registry.probe("mindspore")[0]


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("steps", [0, 5])
def test_cpu_fast_matches_cpu(name, steps, reference):
    with registry.forced("cpu_fast"):
        got = _logits(name, steps)
        assert "cpu_fast" in _used_backends()
    torch.testing.assert_close(got, reference[(name, steps)], **TOL)


@pytest.mark.parametrize("name", NAMES)
def test_shape_only_checks_give_the_same_logits(name, monkeypatch):
    """V4HAL_CHECKS=shapes only drops host reads: prefill + decode logits are bit-identical."""
    full = _logits(name, 5)
    monkeypatch.setenv("V4HAL_CHECKS", "shapes")
    registry.reset()
    torch.testing.assert_close(_logits(name, 5), full, rtol=0, atol=0)


@pytest.mark.parametrize("name", NAMES)
def test_mindspore_end_to_end_matches_cpu(name, reference):
    """Every op mindspore implements runs there; the rest fall back to the cpu reference, and the
    fallback is recorded (never silent). Short (17 tokens, 2 decode steps): mindspore on CPU is slow."""
    registry.configure(backend="mindspore", fallback="cpu")
    got = _logits(name, 2, 17)
    ran_on_ms = {op for op, c in registry.chosen().items() if c.backend == "mindspore"}
    fell_back = set(registry.fallbacks())
    assert ran_on_ms, "no op of the model ran on mindspore"
    assert fell_back == {op for op, c in registry.chosen().items() if c.backend == "cpu"}
    torch.testing.assert_close(got, reference[(name, "ms")], **TOL)


def test_per_op_overrides(reference):
    """auto everywhere, but the linear layers and the attention on the cpu reference."""
    registry.configure(backend="cpu_fast", op_backends={"linear": "cpu", "sparse_attention": "cpu"})
    got = _logits("tiny-v4", 5)
    assert registry.choose("linear").backend == "cpu" and registry.choose("sparse_attention").backend == "cpu"
    assert "cpu_fast" in _used_backends()
    torch.testing.assert_close(got, reference[("tiny-v4", 5)], **TOL)


def test_unavailable_backend_is_an_error_naming_why():
    registry.configure(backend="cuda")
    with pytest.raises(registry.BackendError, match="cuda"):
        _logits("tiny-v4")


@pytest.mark.parametrize("case", [c for c in cases_model.PARITY], ids=lambda c: c.id)
def test_model_parity_cases_pass_on_cpu_fast(case):
    rows = {r["backend"]: r for r in run_case(case, ["cpu", "cpu_fast"])}
    assert rows["cpu"]["status"] == "pass", rows["cpu"]["note"]
    assert rows["cpu_fast"]["status"] == "pass", rows["cpu_fast"]["note"]


def test_decode_ceiling_step_runs_and_writes_its_caches_at_the_position():
    """`python -m v4hal.bench.decode_ceiling` (an estimate, not the model): its static step runs on
    bench-v4's weights, gives vocabulary logits, and writes one row of each cache, at the step's
    position."""
    from v4hal.bench import decode_ceiling
    from v4hal.bench.cases_model import BENCH_V4, model_for

    step = decode_ceiling.StaticStep(model_for("bench-v4"), 1024)
    keys = step.layers[1][1]["keys"]
    before = keys.clone()
    with torch.no_grad():
        logits = step(torch.tensor(7), torch.tensor(1029))
    assert logits.shape == (BENCH_V4.vocab_size,) and bool(torch.isfinite(logits).all())
    assert (keys != before).any(-1).nonzero().flatten().tolist() == [1029 // 4 % keys.shape[0]]
