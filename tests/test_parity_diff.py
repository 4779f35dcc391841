"""bench/parity_diff.py: two parity reports compared row by row; the count of identical and differing
rows is always stated (zeros included), a changed metric or status is named, and the time taken
is never compared."""

import json

from v4hal.bench import parity, parity_diff
from v4hal.bench.cases import parity_cases


def report(rows):
    return {"rows": rows}


def row(case="linear/small", backend="cpu_fast", status="pass", max_abs=1e-7, seconds=0.5):
    return {"case": case, "op": case.split("/")[0], "backend": backend, "status": status, "note": "",
            "seconds": seconds, "outputs": {"out": {"max_abs": max_abs, "cosine": 1.0, "passed": True}}}


def test_identical_reports_say_zero_differ():
    d = parity_diff.diff(report([row(), row(backend="cpu")]), report([row(seconds=9.0), row(backend="cpu")]))
    assert d == {"compared": 2, "identical": 2, "differ": {}, "only_before": [], "only_after": []}
    assert parity_diff.identical(d)
    assert parity_diff.format_diff(d, "a", "b") == ("parity diff a -> b: 2 rows in both, 2 identical, 0 differ; "
                                                     "0 only in a, 0 only in b")


def test_a_changed_metric_or_status_and_missing_rows_are_named():
    before = report([row(), row(case="rms_norm/small"), row(case="gone/small")])
    after = report([row(max_abs=2e-7), row(case="rms_norm/small", status="fail"), row(case="new/small")])
    d = parity_diff.diff(before, after)
    assert d["compared"] == 2 and d["identical"] == 0
    assert d["differ"] == {"linear/small [cpu_fast]": ["outputs.out.max_abs: 1e-07 -> 2e-07"],
                           "rms_norm/small [cpu_fast]": ["status: 'pass' -> 'fail'"]}
    assert d["only_before"] == ["gone/small [cpu_fast]"] and d["only_after"] == ["new/small [cpu_fast]"]
    assert not parity_diff.identical(d)
    text = parity_diff.format_diff(d, "a", "b")
    assert "0 identical, 2 differ; 1 only in a, 1 only in b" in text and "DIFFERS linear/small [cpu_fast]" in text


def test_two_report_files_from_the_harness_compare_identical(tmp_path, capsys):
    """Real reports: the same quick case run twice gives an identical diff and exit 0; a changed
    metric gives exit 1."""
    case = [c for c in parity_cases(quick=True, select="rms_norm")][0]
    paths = []
    for name in ("a", "b"):
        rep = {"rows": parity.run_case(case, ["cpu", "cpu_fast"])}
        paths.append(tmp_path / f"{name}.json")
        paths[-1].write_text(json.dumps(rep))
    assert parity_diff.main([str(p) for p in paths]) == 0
    assert "2 rows in both, 2 identical, 0 differ" in capsys.readouterr().out
    rep = json.loads(paths[1].read_text())
    rep["rows"][1]["outputs"]["out"]["max_abs"] += 1e-9
    paths[1].write_text(json.dumps(rep))
    assert parity_diff.main([str(p) for p in paths]) == 1
