"""`v4hal selfcheck` (bench/selfcheck.py) on CPU at its small size: every section present and
judged, a broken op reported as a failure with exit code 1, a spent budget cut and stated."""

import json
import time

import pytest
import torch

from v4hal.backends import registry
from v4hal.bench import parity, selfcheck
from v4hal.cli import main


@pytest.fixture(scope="module")
def small_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("selfcheck")
    code = main(["selfcheck", "--out", str(out), "--size", "small", "--repeats", "2", "--budget-s", "900"])
    return code, out, json.loads((out / "selfcheck.json").read_text())


def test_small_run_passes_and_writes_every_section(small_run):
    code, out, result = small_run
    assert code == 0, result["failed"]
    assert result["device_backends"] == ["cpu_fast", "cpu"]
    assert list(result["sections"]) == list(selfcheck.SECTIONS)
    assert {n: s["status"] for n, s in result["sections"].items()} == dict.fromkeys(selfcheck.SECTIONS, "pass")
    assert not result["cut"] and not result["failed"]
    assert (out / "selfcheck.md").read_text().startswith("# Device check")
    assert (out / "selfcheck.png").stat().st_size > 0


def test_backend_report_is_v4hal_info(small_run):
    report = small_run[2]["sections"]["backends"]["report"]
    assert set(report) >= {"backends", "ops", "versions"} and report["backends"]["cpu_fast"]["usable"]


def test_every_op_and_model_is_judged_on_both_cpu_backends(small_run):
    sections = small_run[2]["sections"]
    rows = sections["parity"]["rows"]
    ops = {c.op for c in parity.parity_cases(quick=True)} - {"model_logits"}
    assert {r["op"] for r in rows} == ops
    assert all(r["status"] == "pass" for r in rows + sections["models"]["rows"])
    assert {(r["case"], r["backend"]) for r in sections["models"]["rows"]} == {
        (c.id, b) for c in selfcheck.model_cases(selfcheck.SIZES["small"]) for b in ("cpu_fast", "cpu")}
    assert any(r["case"].startswith("model_logits/bench-v4") for r in sections["models"]["rows"])


def test_decode_and_speed_rows_carry_their_figures(small_run):
    sections = small_run[2]["sections"]
    (decode,) = sections["decode"]["rows"]
    assert decode["status"] == "pass" and decode["eager_ms"] > 0 and decode["static_ms"] > 0
    speed = {r["case"]: r for r in sections["speed"]["rows"]}
    assert set(speed) == {c.id for c in selfcheck.speed_list(selfcheck.SIZES["small"], [], torch.device("cpu"))}
    assert all(r["status"] == "ok" and r["peers"] for r in speed.values())
    assert "transformers eager" in speed["model_decode/bench-v4/512-context"]["peers"]
    assert "dense SDPA over all rows" in speed["sparse_attention/v4-flash/decode-N8192"]["peers"]


def test_a_broken_op_is_a_failure_and_exit_1(monkeypatch, tmp_path):
    from v4hal.backends.cpu_fast import basic

    honest = basic.rms_norm
    monkeypatch.setattr(basic, "rms_norm", lambda x, weight, eps: honest(x, weight, eps) * 1.01)
    registry.reset()
    try:
        code = main(["selfcheck", "--out", str(tmp_path), "--size", "small", "--only", "parity",
                     "--select", "rms_norm"])
    finally:
        monkeypatch.undo()
        registry.reset()
    result = json.loads((tmp_path / "selfcheck.json").read_text())
    assert code == 1 and result["failed"] == ["parity"]
    rows = result["sections"]["parity"]["rows"]
    assert rows and {r["status"] for r in rows if r["backend"] == "cpu_fast"} == {"fail"}
    assert {r["status"] for r in rows if r["backend"] == "cpu"} == {"pass"}


def test_a_spent_budget_cuts_the_section_and_says_so(monkeypatch, tmp_path):
    slow = parity.run_case
    monkeypatch.setattr(parity, "run_case", lambda case, backends: (time.sleep(0.3), slow(case, backends))[1])
    code = main(["selfcheck", "--out", str(tmp_path), "--size", "small", "--only", "parity", "--budget-s", "1"])
    result = json.loads((tmp_path / "selfcheck.json").read_text())
    parity_section = result["sections"]["parity"]
    assert code == 0 and parity_section["status"] == "cut" and "not finished" in result["cut"]["parity"]
    assert len(parity_section["rows"]) < 2 * len(parity.parity_cases(quick=True))
    assert "**cut** parity" in (tmp_path / "selfcheck.md").read_text()


def test_the_time_box_interrupts_a_running_item():
    start = time.monotonic()
    rows, cut = selfcheck.run_items([0.0, 30.0, 0.0], lambda s: (time.sleep(s), [s])[1], start + 0.5, name=str)
    assert rows == [0.0] and cut.startswith("30.0 stopped") and "2 of 3 not finished" in cut
    assert time.monotonic() - start < 5


@pytest.mark.parametrize("argv", [["--select", "no-such-case"], ["--budget-s", "0"], ["--size", "huge"]])
def test_bad_input_exits_2(tmp_path, capsys, argv):
    assert main(["selfcheck", "--out", str(tmp_path), *argv]) == 2
    assert "selfcheck" in capsys.readouterr().err


def test_the_device_is_cuda_when_present(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert selfcheck.device_backends() == ["cuda"]


def test_an_inner_time_box_leaves_the_outer_one_running():
    start = time.monotonic()
    with pytest.raises(selfcheck.OutOfTime):
        with selfcheck.time_box(0.5):
            with selfcheck.time_box(10):
                pass
            time.sleep(30)
    assert time.monotonic() - start < 5


def test_a_crashed_section_fails_and_the_others_still_run(monkeypatch):
    def crash(*args):
        raise RuntimeError("no device")

    monkeypatch.setattr(selfcheck, "decode_section", crash)
    result = selfcheck.run(selfcheck.SIZES["small"], 60, only=("backends", "decode"))
    assert result["sections"]["decode"] == {**result["sections"]["decode"], "status": "fail",
                                            "error": "RuntimeError: no device"}
    assert result["sections"]["backends"]["status"] == "pass" and result["failed"] == ["decode"]


def test_a_section_where_every_row_is_unavailable_is_not_a_pass():
    assert selfcheck.status({"rows": [{"status": "unavailable"}], "cut": None}) == "unavailable"
