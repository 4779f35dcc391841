"""Conversions with several worker processes (`--workers N`): killed at several points (the
whole process group, or the parent alone: its workers must die with it), then resumed with any N,
the output is byte-identical to an uninterrupted one-worker run; a worker's error reaches the
parent with its own message; workers share the output lock.

As in test_convert_reliability.py, the child runs the real CLI and a small driver wraps one
internal function so that, at the chosen point, the process reaching it announces itself and
stalls until the test kills it: "journal" stalls the parent after its k-th journal write (k
units journaled), "write" a worker at its k-th shard write (mid-shard)."""

import json
import os
import pickle
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from convert_util import KILL_DRIVER, cli, expert_shards, file_bytes, random_fp8, write_shards
from v4hal.conversion import plan
from v4hal.checkpoint_files import CheckpointError
from v4hal.ops._check import OpInputError



@pytest.fixture(scope="module")
def source(tmp_path_factory):
    return expert_shards(tmp_path_factory.mktemp("src"), seed=12)


@pytest.fixture(scope="module")
def reference(source, tmp_path_factory):
    out = tmp_path_factory.mktemp("ref") / "out"
    assert cli("run", "--to", "w8a8", "--no-progress", "--workers", "1", source, out) == 0
    return file_bytes(out)


def group_members(pgid: int) -> list[int]:
    """Processes of a process group with a thread still alive. A killed process's main thread
    turns zombie while another of its threads may still be finishing an fsync; its files (the
    output lock among them) close only when the last thread is gone."""
    pids = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            if int(stat.read_text().rsplit(")", 1)[1].split()[2]) != pgid:
                continue
            states = [task.read_text().rsplit(")", 1)[1].split()[0] for task in stat.parent.glob("task/*/stat")]
        except OSError:
            continue
        if any(state not in ("Z", "X") for state in states):
            pids.append(int(stat.parent.name))
    return pids


def kill_at(point: str, n: int, workers: int, source, dst, tmp_path, whom: str = "group"):
    """Run the CLI in its own process group until `point` #n, then SIGKILL the group (or only
    the parent) and wait until no process of it is left."""
    marker = tmp_path / f"marker-{point}-{n}-{time.monotonic_ns()}"
    child = subprocess.Popen([sys.executable, "-c", KILL_DRIVER, point, str(n), str(marker), "convert", "run", "--to", "w8a8",
                              "--no-progress", "--workers", str(workers), str(source), str(dst)],
                             stderr=subprocess.PIPE, env={**os.environ, "TQDM_DISABLE": "1"}, start_new_session=True)
    deadline = time.monotonic() + 120
    while not marker.exists():
        if child.poll() is not None:
            raise AssertionError(f"child ended ({child.returncode}) before reaching {point} #{n}: {child.stderr.read().decode()}")
        assert time.monotonic() < deadline, "child never reached the kill point"
        time.sleep(0.01)
    if whom == "group":
        os.killpg(child.pid, signal.SIGKILL)
    else:
        child.send_signal(signal.SIGKILL)
    child.wait()
    child.stderr.close()
    assert child.returncode == -signal.SIGKILL
    deadline = time.monotonic() + 30
    while members := group_members(child.pid):  # workers die with their parent: no orphans
        assert time.monotonic() < deadline, f"orphaned workers still alive: {members}"
        time.sleep(0.05)
    assert not (dst / plan.MANIFEST).exists()


@pytest.mark.parametrize("kills, resume_workers", [
    ([("journal", 1, 2, "group")], 2),
    ([("journal", 3, 2, "group")], 1),
    ([("write", 2, 2, "group")], 2),
    ([("write", 4, 2, "parent")], 2),
    ([("journal", 2, 2, "parent")], 3),
    ([("write", 3, 2, "group"), ("journal", 1, 1, "group"), ("write", 5, 2, "parent")], 2),
], ids=["1-journaled", "3-journaled-resume-1", "mid-shard", "parent-only-mid-shard", "parent-only-2-journaled", "three-kills"])
def test_killed_parallel_conversion_resumes_to_identical_output(kills, resume_workers, source, reference, tmp_path):
    dst = tmp_path / "out"
    for point, n, workers, whom in kills:
        kill_at(point, n, workers, source, dst, tmp_path, whom)
    journal = json.loads((dst / plan.PROGRESS).read_text()) if (dst / plan.PROGRESS).exists() else {"units": {}}
    if kills[-1][0] == "journal":
        assert len(journal["units"]) == kills[-1][1]
    assert cli("run", "--to", "w8a8", "--no-progress", "--workers", str(resume_workers), source, dst) == 0
    assert file_bytes(dst) == reference
    assert not list(dst.glob(".*"))  # no partial files, journal or lock left behind
    assert cli("verify", dst, "--source", source) == 0


def test_workers_hold_the_output_lock_until_they_are_gone(source, tmp_path, capsys):
    """A worker holds the flock it inherited: with its parent stopped, the folder is still locked."""
    dst = tmp_path / "out"
    marker = tmp_path / "marker"
    child = subprocess.Popen([sys.executable, "-c", KILL_DRIVER, "write", "2", str(marker), "convert", "run", "--to", "w8a8",
                              "--no-progress", "--workers", "2", str(source), str(dst)],
                             stderr=subprocess.DEVNULL, env={**os.environ, "TQDM_DISABLE": "1"}, start_new_session=True)
    try:
        deadline = time.monotonic() + 120
        while not marker.exists():
            assert child.poll() is None and time.monotonic() < deadline
            time.sleep(0.01)
        worker = int(marker.read_text())
        assert worker != child.pid  # the stall is in a worker process
        os.kill(child.pid, signal.SIGSTOP)  # the parent cannot die and release anything
        assert cli("run", "--to", "w8a8", "--no-progress", source, dst) == 2
        assert "locked by another conversion" in capsys.readouterr().err
    finally:
        os.killpg(child.pid, signal.SIGKILL)
        child.wait()


def bad_scale_source(root):
    gen = torch.Generator().manual_seed(3)
    shards = []
    for i in range(3):
        q, s = random_fp8(256, 256, gen)
        if i == 1:
            s[1, 0] = float("nan")
        shards.append({f"model.layers.{i}.mlp.down_proj.weight": q, f"model.layers.{i}.mlp.down_proj.weight_scale_inv": s})
    write_shards(root, shards)
    return root


def test_a_worker_error_reaches_the_parent_with_its_own_message(tmp_path, capsys):
    src = bad_scale_source(tmp_path / "src")
    errors = {}
    for workers in ("1", "2"):
        dst = tmp_path / f"out{workers}"
        assert cli("run", "--to", "bf16", "--no-progress", "--workers", workers, src, dst) == 2
        errors[workers] = capsys.readouterr().err
        assert not (dst / plan.MANIFEST).exists()
        assert not list(dst.glob(".*.partial*"))  # the failed unit and any stopped one removed theirs
    assert "scale" in errors["1"] and "Traceback" not in errors["2"]
    assert errors["2"] == errors["1"]  # the same one line, from a worker process
    # Source fixed (same headers, so the same plan): the rerun resumes and completes.
    bad = tmp_path / "src" / "model-00002-of-00003.safetensors"
    from safetensors.torch import load_file, save_file

    tensors = load_file(str(bad))
    tensors["model.layers.1.mlp.down_proj.weight_scale_inv"].nan_to_num_(0.5)
    save_file(tensors, str(bad))
    assert cli("run", "--to", "bf16", "--no-progress", "--workers", "2", src, tmp_path / "out2") == 0
    assert cli("verify", tmp_path / "out2", "--source", src) == 0


def test_errors_cross_a_process_boundary_intact():
    for exc in (OpInputError("dequantize_fp8", "scale", "finite values", "nan at [1, 0]"),
                CheckpointError("/ckpt/a.safetensors", "truncated", "w")):
        back = pickle.loads(pickle.dumps(exc))
        assert type(back) is type(exc) and str(back) == str(exc) and vars(back) == vars(exc)


def test_workers_default_to_four_per_core_within_memory_and_bad_counts_are_refused(source, tmp_path, capsys, monkeypatch):
    from v4hal.conversion import workers

    from v4hal.model import plan as model_plan

    cores = len(os.sched_getaffinity(0))
    assert workers.default_workers() == min(4 * cores, model_plan.available_memory() // 2**30)
    monkeypatch.setattr(model_plan, "available_memory", lambda: 64 * 2**30)
    assert workers.default_workers() == 4 * cores
    monkeypatch.setattr(model_plan, "available_memory", lambda: None)  # unknown: no memory cap
    assert workers.default_workers() == 4 * cores
    monkeypatch.setattr(model_plan, "available_memory", lambda: 2**30 + 5)  # one GiB: one worker
    assert workers.default_workers() == 1
    monkeypatch.setattr(model_plan, "available_memory", lambda: 2**20)  # less: still one
    assert workers.default_workers() == 1
    used = []
    monkeypatch.setattr(workers, "run_units", lambda work, units, n, *a: used.append(n))
    monkeypatch.setattr(plan, "finish", lambda *a: {"outputs": {}})
    monkeypatch.setattr(workers, "default_workers", lambda: 7)
    assert cli("run", "--to", "w8a8", "--no-progress", source, tmp_path / "out") == 0
    assert used == [7]
    for bad in ("0", "-1", "two"):
        assert cli("run", "--to", "w8a8", "--workers", bad, source, tmp_path / "x") == 2
        assert "argument --workers: expected an integer >= 1" in capsys.readouterr().err
