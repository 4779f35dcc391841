"""Backend selection: env vars, per-op overrides, explicit errors, recorded fallbacks, lazy imports."""

import subprocess
import sys

import pytest
import torch

from v4hal import ops
from v4hal.backends import registry
from v4hal.ops._check import OpInputError


def test_auto_prefers_fast_cpu_path_on_a_bare_machine():
    choice = registry.choose("fp8_matmul")
    assert choice.backend == "cpu_fast"
    assert "cuda:" in choice.reason and "ascend:" in choice.reason  # why the devices were skipped


def test_backend_env_var_selects_the_reference(monkeypatch):
    monkeypatch.setenv("V4HAL_BACKEND", "cpu")
    assert registry.choose("fp8_matmul").backend == "cpu"
    assert registry.choose("fp8_matmul").fn.__module__ == "v4hal.backends.cpu.quant"


def test_per_op_override_beats_the_global_backend(monkeypatch):
    monkeypatch.setenv("V4HAL_BACKEND", "cpu")
    monkeypatch.setenv("V4HAL_OP_BACKENDS", "quantize_fp8=cpu_fast, rms_norm = cpu")
    assert registry.choose("quantize_fp8").backend == "cpu_fast"
    assert registry.choose("fp8_matmul").backend == "cpu"


@pytest.mark.parametrize("var,value,needle", [
    ("V4HAL_BACKEND", "tpu", "unknown backend 'tpu'; valid: auto, cpu, cpu_fast, cuda, ascend, mindspore"),
    ("V4HAL_OP_BACKENDS", "fp9_matmul=cpu", "unknown op 'fp9_matmul'; valid:"),
    ("V4HAL_OP_BACKENDS", "fp8_matmul", "expected op=backend, got 'fp8_matmul'"),
    ("V4HAL_OP_BACKENDS", "fp8_matmul=gpu", "unknown backend 'gpu'"),
    ("V4HAL_FALLBACK", "mindspore", "V4HAL_FALLBACK: expected one of cpu, got 'mindspore'"),
    ("V4HAL_CHECKS", "none", "V4HAL_CHECKS: expected one of full, shapes, got 'none'"),
])
def test_bad_settings_list_the_valid_names(monkeypatch, var, value, needle):
    monkeypatch.setenv(var, value)
    with pytest.raises(registry.BackendError) as err:
        registry.choose("fp8_matmul")
    assert needle in str(err.value)


def test_unusable_backend_is_an_error_that_says_why(monkeypatch):
    args = _fp8_args()
    monkeypatch.setenv("V4HAL_BACKEND", "cuda")
    registry.reset()
    with pytest.raises(registry.BackendError, match=r"fp8_matmul: backend 'cuda' cannot run it: .*(CUDA|cuda)"):
        ops.fp8_matmul(*args)
    monkeypatch.setenv("V4HAL_BACKEND", "ascend")
    registry.reset()
    with pytest.raises(registry.BackendError, match="torch_npu"):
        registry.choose("fp8_matmul")


def test_fallback_only_when_asked_and_always_recorded(monkeypatch):
    args = _fp8_args()
    monkeypatch.setenv("V4HAL_BACKEND", "cuda")
    monkeypatch.setenv("V4HAL_FALLBACK", "cpu")
    registry.reset()
    y = ops.fp8_matmul(*args)
    assert y.shape == (2, 128)
    fell = registry.fallbacks()
    assert set(fell) == {"fp8_matmul"} and "CUDA" in fell["fp8_matmul"].reason.upper()
    assert fell["fp8_matmul"].backend == "cpu" and fell["fp8_matmul"].requested == "cuda"


def test_forced_pins_every_op_and_restores_settings(monkeypatch):
    monkeypatch.setenv("V4HAL_BACKEND", "cpu")
    with registry.forced("cpu_fast"):
        assert registry.choose("fp8_matmul").backend == "cpu_fast"
    assert registry.choose("fp8_matmul").backend == "cpu"


def test_configure_is_the_programmatic_twin_of_the_env_vars():
    registry.configure(backend="cpu", op_backends={"linear": "cpu_fast"})
    assert registry.choose("linear").backend == "cpu_fast"
    assert registry.choose("rms_norm").backend == "cpu"
    with pytest.raises(registry.BackendError, match="unknown op"):
        registry.configure(op_backends={"nope": "cpu"})
    with pytest.raises(registry.BackendError, match=r"configure\(fallback\): expected one of cpu, got 'mindspore'"):
        registry.configure(fallback="mindspore")
    registry.configure(fallback="cpu")
    assert registry.settings().fallback == "cpu"


def test_lineages_end_at_the_reference():
    assert registry.lineage("cpu") == ("cpu",)
    assert registry.lineage("cpu_fast") == ("cpu_fast", "cpu")
    assert registry.lineage("cuda") == ("cuda", "cpu_fast", "cpu")
    assert registry.lineage("ascend") == ("ascend", "cpu_fast", "cpu")
    assert registry.lineage("mindspore") == ("mindspore", "cpu")


def test_lookup_names_the_backend_whose_code_runs():
    assert registry.lookup("fp8_matmul", "cuda") == "cuda"  # cuda's own scaled_mm path
    assert registry.lookup("rms_norm", "cuda") == "cpu_fast"  # no cuda override: cpu_fast's fused kernel
    assert registry.lookup("rms_norm", "cpu_fast") == "cpu_fast"
    assert registry.lookup("kv_compress", "cuda") == "cpu"  # nobody on the way overrides it


def test_an_op_no_backend_implements_names_the_whole_lineage():
    registry.register_op("_inherit_probe", "no_such_family")
    try:
        fn, why = registry.implementation("_inherit_probe", "cpu_fast")
        assert fn is None and "not implemented by the cpu_fast -> cpu backend" in why
        assert registry.lookup("_inherit_probe", "cuda") is None
    finally:
        registry._OPS.pop("_inherit_probe")


def test_a_choice_records_where_its_code_comes_from(monkeypatch):
    monkeypatch.setenv("V4HAL_BACKEND", "cpu_fast")
    assert registry.choose("kv_compress").source == "cpu"
    assert registry.choose("fp8_matmul").source == "cpu_fast"
    assert registry.choose("kv_compress").fn is registry.family_module("cpu", "attention").kv_compress
    assert set(registry.chosen()) == {"kv_compress", "fp8_matmul"}


def test_parent_family_walks_the_lineage_and_sees_patches(monkeypatch):
    cuda_quant = registry.parent_family("v4hal.backends.cuda.quant")
    fast = registry.family_module("cpu_fast", "quant")
    assert cuda_quant.fp8_matmul is fast.fp8_matmul  # the nearest ancestor's version
    assert cuda_quant.fp4_scale_values is registry.family_module("cpu", "quant").fp4_scale_values
    monkeypatch.setattr(fast, "fp8_matmul", len)
    assert cuda_quant.fp8_matmul is len
    with pytest.raises(AttributeError, match="no backend in cpu_fast -> cpu has quant.no_such_helper"):
        cuda_quant.no_such_helper
    with pytest.raises(registry.BackendError, match="cpu backend declares no PARENT"):
        registry.parent_family("v4hal.backends.cpu.quant")


def test_explain_covers_every_op_and_every_backend():
    rows = registry.explain()
    assert {r["op"] for r in rows} == set(registry.ops())
    for row in rows:
        assert set(row["backends"]) == set(registry.backends())
        assert row["backends"]["cpu"] == "ok"
        assert row["backends"]["cuda"] != "ok"  # no GPU on the CI machine


def test_importing_v4hal_imports_no_vendor_package():
    # explain() probes mindspore on purpose (the plain import must not); it is blocked here because
    # importing mindspore imports triton itself wherever triton is installed (the test extra's).
    code = ("import sys; sys.modules['mindspore'] = None; import v4hal, v4hal.ops, v4hal.backends.registry as r; "
            "r.explain(); print([m for m in ('torch_npu', 'triton', 'deep_gemm') if m in sys.modules])")
    plain = subprocess.run([sys.executable, "-c", "import sys, v4hal, v4hal.ops; "
                            "print([m for m in ('torch_npu', 'mindspore', 'triton', 'deep_gemm') if m in sys.modules])"],
                           capture_output=True, text=True, check=True)
    assert plain.stdout.strip() == "[]"
    probed = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert probed.stdout.strip() == "[]"


def test_info_command_prints_choice_and_reasons():
    out = subprocess.run([sys.executable, "-m", "v4hal.cli", "info"], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert "fp8_matmul" in out.stdout and "-> cpu_fast" in out.stdout
    assert "torch_npu is not installed" in out.stdout
    bad = subprocess.run([sys.executable, "-m", "v4hal.cli", "info"], capture_output=True, text=True,
                         env={**__import__("os").environ, "V4HAL_BACKEND": "nope"})
    assert bad.returncode == 2 and "unknown backend 'nope'" in bad.stderr


def _fp8_args():
    g = torch.Generator().manual_seed(0)
    a, a_s = ops.quantize_fp8(torch.randn(2, 256, generator=g))
    b, b_s = ops.quantize_fp8(torch.randn(128, 256, generator=g), (128, 128))
    return a, a_s, b, b_s


def test_checks_shapes_skips_only_the_checks_that_read_values(monkeypatch):
    """V4HAL_CHECKS=shapes: a NaN mix or an out-of-range expert id is no longer looked for (no host
    read), while dtype and shape errors still are; `full` (the default) refuses both values."""
    x, post, comb = torch.ones(1, 2, 3), torch.tensor([[float("nan"), 1.0]]), torch.eye(2).unsqueeze(0)
    ids = torch.tensor([[0, 9]])
    with pytest.raises(OpInputError, match="'post' expected finite values"):
        ops.hc_post(torch.ones(1, 3), x, post, comb)
    with pytest.raises(OpInputError, match="topk_ids"):
        ops.moe_dispatch(torch.ones(1, 4), ids, 4)
    monkeypatch.setenv("V4HAL_CHECKS", "shapes")
    registry.reset()
    assert registry.settings().checks == "shapes"
    assert torch.isnan(ops.hc_post(torch.ones(1, 3), x, post, comb)).any()
    with pytest.raises(OpInputError, match="'comb' expected shape"):
        ops.hc_post(torch.ones(1, 3), x, post, comb[:, :1])
    with pytest.raises(OpInputError, match="dtype"):
        ops.hc_post(torch.ones(1, 3), x, post.long(), comb)
    registry.configure(checks="full")
    with pytest.raises(OpInputError, match="finite values"):
        ops.hc_post(torch.ones(1, 3), x, post, comb)
    with pytest.raises(registry.BackendError, match="configure\\(checks\\)"):
        registry.configure(checks="off")
