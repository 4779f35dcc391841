"""The `v4hal` command's contract (docs/cli.md): exit codes 0 / 1 / 2 / 3, one-line errors naming
the flag, `v4hal checkpoint`, the memory guard, and a closed stdout pipe."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from v4hal.cli import main as cli
from v4hal.model.config import ModelArgs, preset
from v4hal.model.loader import load_checkpoint
from v4hal.model.model import build

V4HAL = str(Path(sys.executable).with_name("v4hal"))


def _error_line(capsys, *words):
    err = capsys.readouterr().err
    assert "Traceback" not in err
    last = err.strip().splitlines()[-1]
    assert "error:" in last and all(w in last for w in words), err
    return last


# -- checkpoint ------------------------------------------------------------------------------------

@pytest.mark.parametrize("shard_mb", ["2048", "1"])  # one file, and shards + index
def test_checkpoint_reads_back_with_the_same_logits(tmp_path, shard_mb):
    out = tmp_path / "ckpt"
    assert cli(["checkpoint", "--preset", "tiny", "--seed", "3", "--shard-mb", shard_mb, str(out)]) == 0
    assert (out / "model.safetensors.index.json").exists() == (shard_mb == "1")
    assert not [p for p in tmp_path.iterdir() if p.name != "ckpt"]  # no staging folder left behind
    args = ModelArgs.from_json(out / "config.json")
    loaded = build(args)
    load_checkpoint(loaded, out, args)
    ref = build(preset("tiny")).init_random(3)
    ids = torch.tensor([[0, 42, 17, 511, 3]])
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids), ref(ids), rtol=0, atol=0)


def test_checkpoint_runs_generate(tmp_path, capsys):
    out = tmp_path / "ckpt"
    assert cli(["checkpoint", "--preset", "tiny", str(out)]) == 0
    assert cli(["generate", "--config", str(out / "config.json"), "--weights", str(out),
                "--prompt-ids", "0,42,17", "--max-new-tokens", "2"]) == 0
    assert "generated: [" in capsys.readouterr().out


def test_checkpoint_refuses_a_non_empty_folder_and_a_file(tmp_path, capsys):
    (tmp_path / "mine.txt").write_text("keep")
    assert cli(["checkpoint", "--preset", "tiny", str(tmp_path)]) == 2
    _error_line(capsys, str(tmp_path), "refusing to overwrite")
    assert [p.name for p in tmp_path.iterdir()] == ["mine.txt"]
    assert cli(["checkpoint", "--preset", "tiny", str(tmp_path / "mine.txt")]) == 2
    _error_line(capsys, "existing file")
    assert (tmp_path / "mine.txt").read_text() == "keep"


# -- generate: bad input, memory, compile ----------------------------------------------------------

@pytest.mark.parametrize("flags,words", [
    (["--prompt-ids", "0,x"], ["--prompt-ids", "expected", "'0,x'"]),
    (["--prompt-ids", "0,4242,17"], ["--prompt-ids", "[0, 512)", "4242"]),
    (["--prompt-ids", "1;"], ["--prompt-ids", "empty prompt"]),
    (["--batch", "0"], ["--batch", ">= 1", "'0'"]),
    (["--top-k", "-3"], ["--top-k", ">= 0", "'-3'"]),
    (["--top-p", "2"], ["--top-p", "(0, 1]", "'2'"]),
    (["--temperature", "-1"], ["--temperature", ">= 0", "'-1'"]),
    (["--weights", "/no/such/dir"], ["--weights", "expected a folder", "no such path"]),
])
def test_generate_bad_flags_are_one_line_errors(capsys, flags, words):
    assert cli(["generate", "--preset", "tiny", "--max-new-tokens", "1", *flags]) == 2
    _error_line(capsys, *words)


def test_generate_refuses_a_random_model_larger_than_free_memory(monkeypatch, capsys):
    monkeypatch.setattr("v4hal.model.plan.available_memory", lambda: 2 ** 20)
    assert cli(["generate", "--preset", "tiny"]) == 3
    line = _error_line(capsys, "--preset tiny", "0.0 GiB")  # needs ~0.002 GiB, has 0.001: both printed
    assert line.count("GiB") == 2
    assert cli(["checkpoint", "--preset", "tiny", "unused-dir"]) == 3
    assert not Path("unused-dir").exists()


def test_generate_says_it_compiles_before_the_first_compiled_step(monkeypatch, capsys):
    import v4hal.model.generate as g

    seen, eager = {}, g.generate

    def fake_generate(model, prompts, n, sampling, eos_token_id=None, compile=False):
        seen["stderr"], seen["compile"] = capsys.readouterr().err, compile
        return eager(model, prompts, n, sampling)  # eager: the message is what is tested

    monkeypatch.setattr(g, "generate", fake_generate)
    assert cli(["generate", "--preset", "tiny", "--compile", "--max-new-tokens", "2"]) == 0
    assert seen["compile"] and "compiling the decode step" in seen["stderr"]


# -- parity, bench, dryrun: unavailable backends and empty selections --------------------------------

@pytest.mark.parametrize("command", ["parity", "bench"])
def test_an_unavailable_requested_backend_is_an_error(monkeypatch, capsys, tmp_path, command):
    from v4hal.backends import registry

    monkeypatch.setattr(registry, "probe", lambda b: (False, "no device") if b == "cuda" else (True, ""))
    assert cli([command, "--backend", "cuda", "--quick", "--out", str(tmp_path)]) == 2
    _error_line(capsys, "--backend cuda", "unavailable", "no device")


@pytest.mark.parametrize("command,flag", [("parity", "--select"), ("bench", "--select"), ("dryrun", "--op")])
def test_a_selection_matching_nothing_is_an_error(capsys, tmp_path, command, flag):
    out = ["--out", str(tmp_path)] if command != "dryrun" else []
    assert cli([command, flag, "nothing-has-this-id", *out]) == 2
    _error_line(capsys, flag, "'nothing-has-this-id'")


def test_parity_where_every_backend_is_unavailable_is_not_success(monkeypatch, capsys, tmp_path):
    import v4hal.bench.parity as parity

    monkeypatch.setattr(parity, "run_case", lambda case, backends, seed=0, distributed=None: [
        {"case": case.id, "op": case.op, "backend": b, "status": "unavailable", "note": "no device"} for b in backends])
    assert cli(["parity", "--backend", "cpu", "--quick", "--select", "sinkhorn", "--out", str(tmp_path)]) == 2
    _error_line(capsys, "no case ran")


def test_oversubscription_warning():
    from v4hal.bench.speed import oversubscription_warning

    assert oversubscription_warning(1, 2, 30.0) is None  # one thread: nothing to wait on
    assert oversubscription_warning(2, 16, 1.0) is None
    assert "--threads 1" in oversubscription_warning(2, 2, 6.0)
    assert "8 threads on 4 cores" in oversubscription_warning(8, 4, 0.0)
    assert oversubscription_warning(1, 2, 0.0, ranks=2) is None  # one thread per core
    assert "2 threads (2 ranks x 1)" in oversubscription_warning(1, 2, 6.0, ranks=2)
    assert "start fewer ranks" in oversubscription_warning(1, 2, 0.0, ranks=4)


def test_bench_on_a_loaded_machine_warns_and_records_it(monkeypatch, capsys, tmp_path):
    import v4hal.bench.speed as speed

    monkeypatch.setattr(os, "getloadavg", lambda: (64.0, 64.0, 64.0))
    monkeypatch.setattr(speed, "limits", lambda device: {"bandwidth_gbs": 1.0, "bf16_tflops": 1.0, "fp32_tflops": 1.0})
    threads = torch.get_num_threads()
    try:
        assert cli(["bench", "--backend", "cpu", "--quick", "--select", "sinkhorn", "--repeats", "1",
                    "--threads", "2", "--out", str(tmp_path)]) == 0
    finally:
        torch.set_num_threads(threads)
    assert "warning: " in capsys.readouterr().err
    assert any("--threads 1" in w for w in json.loads((tmp_path / "bench.json").read_text())["warnings"])
    assert "**warning**" in (tmp_path / "bench.md").read_text()


# -- info, plan, help, pipes ---------------------------------------------------------------------------

def test_info_says_why_each_other_backend_was_not_chosen(capsys):
    from v4hal.backends import registry

    cli(["info"])
    out = capsys.readouterr().out
    section = out[out.index("\nops:\n"):].splitlines()
    at = next(i for i, line in enumerate(section) if line.strip().startswith("apply_rope "))
    chosen = section[at].split("->")[1].split()[0]
    reasons = {line.split(":")[0].strip(): line.split(":", 1)[1] for line in section[at + 1: at + len(registry.BACKENDS)]}
    assert set(reasons) == set(registry.BACKENDS) - {chosen}
    assert all(r.strip() for r in reasons.values())


@pytest.mark.parametrize("argv", [["plan", "--config", "/no/such/config.json"], ["plan", "--preset", "tiny", "--tp", "3"],
                                  ["plan", "--preset", "tiny", "--tp", "0"], ["no-such-command"]])
def test_bad_input_exits_2(capsys, argv):
    assert cli(argv) == 2
    assert "Traceback" not in capsys.readouterr().err


def test_help_exits_0(capsys):
    assert cli(["--help"]) == 0
    assert "exit codes" in capsys.readouterr().out


@pytest.mark.parametrize("argv", [["info"], ["plan", "--preset", "tiny"]])
def test_a_closed_stdout_pipe_is_not_a_traceback(argv):
    read_end, write_end = os.pipe()
    os.close(read_end)  # the reader is gone before the first write, as after `| head` has read enough
    try:
        p = subprocess.run([V4HAL, *argv], stdout=write_end, stderr=subprocess.PIPE, text=True, timeout=300)
    finally:
        os.close(write_end)
    assert p.returncode in (0, 141) and "Traceback" not in p.stderr and "Exception" not in p.stderr, p.stderr


@pytest.mark.parametrize("exc,code,said", [(MemoryError(), 3, "MemoryError"), (ValueError("bad --mp"), 2, "bad --mp")])
def test_convert_errors_are_one_line_with_the_shared_exit_codes(monkeypatch, capsys, exc, code, said):
    from v4hal.conversion import cli as convert

    def fail(args):
        raise exc

    monkeypatch.setattr(convert, "_verify", fail)
    assert cli(["convert", "verify", "somewhere"]) == code
    assert capsys.readouterr().err == f"v4hal convert: error: {said}\n"
