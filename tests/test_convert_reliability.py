"""Kill a conversion (SIGKILL, a real separate process) at several points, rerun it, and check the
result is byte-identical to an uninterrupted run. One worker process (`--workers 1`) here; several:
test_convert_workers.py.

The child runs the real CLI; a small driver wraps one internal function so that, at the chosen
point, the child announces itself (a marker file) and stalls until the test kills it. That makes
each kill point deterministic without any test hook in the converter itself."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from convert_util import KILL_DRIVER, cli, expert_shards, file_bytes



@pytest.fixture(scope="module")
def source(tmp_path_factory):
    return expert_shards(tmp_path_factory.mktemp("src"), seed=11)


@pytest.fixture(scope="module")
def reference(source, tmp_path_factory):
    out = tmp_path_factory.mktemp("ref") / "out"
    assert cli("run", "--to", "w8a8", "--no-progress", source, out) == 0
    return file_bytes(out)


def kill_at(point: str, n: int, source, dst, tmp_path):
    marker = tmp_path / f"marker-{point}-{n}"
    child = subprocess.Popen([sys.executable, "-c", KILL_DRIVER, point, str(n), str(marker),
                              "convert", "run", "--to", "w8a8", "--no-progress", "--workers", "1", str(source), str(dst)],
                             stderr=subprocess.PIPE, env={**os.environ, "TQDM_DISABLE": "1"})
    deadline = time.monotonic() + 120
    while not marker.exists():
        if child.poll() is not None:
            raise AssertionError(f"child ended ({child.returncode}) before reaching {point} #{n}: {child.stderr.read().decode()}")
        assert time.monotonic() < deadline, "child never reached the kill point"
        time.sleep(0.01)
    child.send_signal(signal.SIGKILL)
    child.wait()
    child.stderr.close()
    assert child.returncode == -signal.SIGKILL
    assert not (dst / "v4hal-manifest.json").exists()


@pytest.mark.parametrize("points", [[("write", 2)], [("rename", 1)], [("rename", 3)], [("journal", 2)],
                                   [("finish-before", 1)], [("write", 9), ("journal", 1), ("write", 3)]],
                         ids=["mid-shard", "first-rename", "after-rename", "between-units", "before-index", "three-kills"])
def test_killed_conversion_resumes_to_identical_output(points, source, reference, tmp_path):
    dst = tmp_path / "out"
    for point, n in points:
        kill_at(point, n, source, dst, tmp_path)
    assert cli("run", "--to", "w8a8", "--no-progress", source, dst) == 0
    assert file_bytes(dst) == reference
    assert not list(dst.glob(".*"))  # no partial files or journal left behind
    assert cli("verify", dst, "--source", source) == 0


def test_resume_skips_finished_units(source, reference, tmp_path, monkeypatch):
    dst = tmp_path / "out"
    kill_at("journal", 3, source, dst, tmp_path)
    journal = json.loads((dst / ".v4hal-progress.json").read_text())
    assert sorted(journal["units"]) == ["0", "1", "2"]
    from v4hal.conversion import plan

    done = []
    original = plan.process_unit
    monkeypatch.setattr(plan, "process_unit", lambda p, u, *a: done.append(u.index) or original(p, u, *a))
    assert cli("run", "--to", "w8a8", "--no-progress", "--workers", "1", source, dst) == 0
    assert done == [3, 4]
    assert file_bytes(dst) == reference


def test_other_conversion_in_destination_is_refused(source, tmp_path, capsys):
    dst = tmp_path / "out"
    kill_at("journal", 1, source, dst, tmp_path)
    assert cli("run", "--to", "bf16", "--no-progress", source, dst) == 2
    assert "--restart" in capsys.readouterr().err
    assert cli("run", "--to", "bf16", "--no-progress", "--restart", source, dst) == 0
    assert cli("verify", dst, "--source", source) == 0
