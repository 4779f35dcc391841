"""The parity harness judges correctly: metrics on hand-checked values, NaN never passes, a wrong
backend fails (and makes the command exit non-zero), unusable backends are reported, not failed."""

import json
import math
import subprocess
import sys

import pytest
import torch

from v4hal import ops
from v4hal.backends import registry
from v4hal.bench import parity
from v4hal.bench.cases import Case, Tolerance, parity_cases
from v4hal.bench.metrics import judge, metrics


def test_metrics_on_hand_checked_values():
    ref = torch.tensor([1.0, 2.0, 4.0, -8.0], dtype=torch.float64)
    out = torch.tensor([1.0, 2.001, 4.1, -8.0], dtype=torch.float64)
    m = metrics(out, ref)
    assert m["max_abs"] == pytest.approx(0.1)
    assert m["max_rel"] == pytest.approx(0.025)
    assert m["rmse"] == pytest.approx(math.sqrt((0.001**2 + 0.1**2) / 4))
    assert m["within_1e-3"] == pytest.approx(0.75)  # 2.001 is exactly 5e-4 off
    assert m["within_1e-2"] == pytest.approx(0.75)
    xy, xx, yy = float(out @ ref), float(out @ out), float(ref @ ref)
    assert m["cosine"] == pytest.approx(xy / math.sqrt(xx * yy))
    assert m["fp8_diff"] == pytest.approx(1 - 2 * xy / (xx + yy))


def test_nan_never_passes_even_where_the_reference_is_nan():
    ref = torch.tensor([1.0, float("nan")])
    ok, note = judge(torch.tensor([1.0, float("nan")]), ref, Tolerance(atol=1e9, rtol=1e9))
    assert not ok and "NaN" in note


@pytest.mark.parametrize("tol,out,expected", [
    (Tolerance("exact"), [1.0, 2.0], True),
    (Tolerance("exact"), [1.0, 2.0000001], False),
    (Tolerance("close", rtol=1e-3, atol=0.0), [1.0, 2.0019], True),
    (Tolerance("close", rtol=1e-3, atol=0.0), [1.0, 2.0021], False),
    (Tolerance("fp8", diff=1e-3), [1.0, 2.02], True),
    (Tolerance("fp8", diff=1e-6), [1.0, 2.02], False),
])
def test_judge_kinds(tol, out, expected):
    assert judge(torch.tensor(out, dtype=torch.float64), torch.tensor([1.0, 2.0], dtype=torch.float64), tol)[0] is expected


def test_shape_mismatch_fails():
    ok, note = judge(torch.zeros(2, 3), torch.zeros(3, 2), Tolerance())
    assert not ok and "shape" in note


def test_reference_runs_in_float64():
    seen = {}

    def run(x, out_dtype):
        seen.setdefault("dtypes", []).append((x.dtype, out_dtype))
        return x.to(out_dtype)

    case = Case("rms_norm", "probe", run, lambda g: {"x": torch.randn(4, generator=g), "out_dtype": torch.bfloat16})
    parity.run_case(case, ["cpu"])
    assert seen["dtypes"][0] == (torch.float64, torch.float64)
    assert seen["dtypes"][1] == (torch.float32, torch.bfloat16)


def test_a_built_case_is_judged_again_without_building_it_again():
    made, ran = [], []

    def make(g):
        made.append(1)
        return {"x": torch.randn(4, generator=g)}

    def run(x):
        ran.append(x.dtype)
        return x * 2

    case = Case("rms_norm", "probe", run, make, Tolerance("exact"))
    built = parity.build(case)
    assert ran == [torch.float64] and built.reference["out"].dtype == torch.float64
    rows = parity.run_case(case, ["cpu", "cpu_fast"], built=built) + parity.run_case(case, ["cpu"], built=built)
    assert [r["status"] for r in rows] == ["pass"] * 3
    assert len(made) == 1 and ran == [torch.float64] + [torch.float32] * 3  # no second make, no second reference
    wrong = parity.Built(built.inputs, {"out": built.reference["out"] + 1})
    assert parity.run_case(case, ["cpu"], built=wrong)[0]["status"] == "fail"  # the reference given is the one judged


def _with_cpu_fast_fp8_matmul(monkeypatch, fn):
    real = registry.implementation
    monkeypatch.setattr(registry, "implementation",
                        lambda op, b: (fn, "") if (op, b) == ("fp8_matmul", "cpu_fast") else real(op, b))


def test_a_wrong_backend_fails_and_a_crash_is_reported(monkeypatch):
    case = next(c for c in parity_cases(quick=True) if c.op == "fp8_matmul")
    _with_cpu_fast_fp8_matmul(monkeypatch, lambda a, a_s, b, b_s, out: torch.zeros(*a.shape[:-1], b.shape[0], dtype=out))
    rows = {r["backend"]: r for r in parity.run_case(case, ["cpu", "cpu_fast", "cuda"])}
    assert rows["cpu"]["status"] == "pass"
    assert rows["cpu_fast"]["status"] == "fail"
    assert rows["cuda"]["status"] == "unavailable" and "CUDA" in rows["cuda"]["note"].upper()

    def boom(*args):
        raise RuntimeError("kernel exploded")

    _with_cpu_fast_fp8_matmul(monkeypatch, boom)
    row = parity.run_case(case, ["cpu_fast"])[0]
    assert row["status"] == "fail" and "kernel exploded" in row["note"]


def test_cli_writes_reports_and_exit_code_follows_failures(tmp_path):
    cmd = [sys.executable, "-m", "v4hal.cli", "parity", "--quick", "--select", "fp8_matmul/small",
           "--backend", "cpu", "--backend", "cpu_fast", "--out", str(tmp_path)]
    done = subprocess.run(cmd, capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr
    report = json.loads((tmp_path / "parity.json").read_text())
    assert report["passed"] == 2 and report["failed"] == 0 and report["machine"]
    assert "| fp8_matmul/small | cpu_fast | pass |" in (tmp_path / "parity.md").read_text()
    none = subprocess.run(cmd[:-6] + ["--select", "no-such-case", "--out", str(tmp_path)], capture_output=True, text=True)
    assert none.returncode == 2 and "--select 'no-such-case'" in none.stderr, none.stderr


def test_every_registered_op_has_a_quick_parity_case():
    covered = {c.op for c in parity_cases(quick=True)}
    missing = set(registry.ops()) - covered
    assert not missing, f"ops without a quick parity case: {sorted(missing)}"
