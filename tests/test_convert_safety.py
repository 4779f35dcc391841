"""What the converter, the loader and verify do with files they must not trust: names in a journal,
manifest, index or sidecar that lead out of their folder, symlinks, FIFOs, folders v4hal did not
write, a folder another run holds, emptied manifests, outputs changed in place, aliased or
duplicated tensors, integer weights; and the exit codes (0 ok, 1 a check failed, 2 refused or bad
input, 3 out of resources)."""

import hashlib
import json
import os
import stat
import struct
import threading

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from convert_util import cli, file_bytes, fp8_checkpoint, save_hf
from v4hal.conversion import plan
from v4hal.checkpoint_files import CheckpointError
from v4hal.conversion.io import Source
from v4hal.model.config import ModelArgs
from v4hal.model.loader import LoadError, load_checkpoint
from v4hal.model.model import build


@pytest.fixture
def src(tmp_path):
    fp8_checkpoint(tmp_path / "src")
    return tmp_path / "src"


def run(src, dst, *extra, to="bf16"):
    return cli("run", "--to", to, "--no-progress", *extra, src, dst)


def one_line_error(capsys) -> str:
    err = capsys.readouterr().err
    assert err.startswith("v4hal convert: error: ") and "Traceback" not in err
    return err


def test_restart_deletes_only_files_inside_the_output_folder(src, tmp_path, capsys):
    out, victim = tmp_path / "out", tmp_path / "victim.txt"
    victim.write_text("keep me")
    assert run(src, out) == 0
    (out / plan.PROGRESS).write_text(json.dumps({"plan": "x", "units": {"0": {"outputs": {"../victim.txt": {}}}}}))
    assert run(src, out, "--restart") == 2
    assert "outside" in one_line_error(capsys)
    assert victim.read_text() == "keep me"


def test_folder_v4hal_did_not_write_is_refused_unless_overwrite(src, tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "config.json").write_text('{"model_type": "another"}')
    (out / "model.safetensors").write_bytes(b"another model")
    before = file_bytes(out)
    assert run(src, out) == 2
    assert "--overwrite" in one_line_error(capsys)
    assert file_bytes(out) == before
    assert run(src, out, "--restart") == 2  # --restart discards v4hal's own files only
    assert file_bytes(out) == before
    assert run(src, out, "--overwrite") == 0
    assert json.loads((out / "config.json").read_text())["model_type"] == "deepseek_v3"
    assert (out / "model.safetensors").read_bytes() == b"another model"  # not a name the conversion writes


def test_a_locked_output_folder_is_refused_naming_the_holder(src, tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    with plan.output_lock(out):
        assert run(src, out) == 2
        assert f"pid {os.getpid()}" in one_line_error(capsys)
        assert not (out / plan.MANIFEST).exists()
    assert not (out / plan.LOCK).exists()
    # A lock file left by a killed run (nobody holds its flock) does not block.
    (out / plan.LOCK).write_text("pid 999999999 on elsewhere\n")
    assert run(src, out) == 0
    assert not (out / plan.LOCK).exists()
    assert cli("verify", out, "--source", src) == 0


def test_symlinked_shard_or_extra_file_leading_outside_is_refused(src, tmp_path, capsys):
    private = tmp_path / "private"
    private.mkdir()
    (private / "secret.json").write_text('{"token": "s3cret"}')
    (src / "tokenizer.json").symlink_to(private / "secret.json")
    assert run(src, tmp_path / "out") == 2
    assert "outside" in one_line_error(capsys)
    assert not (tmp_path / "out" / "tokenizer.json").exists()
    (src / "tokenizer.json").unlink()
    # A symlink that stays inside the folder is followed.
    (src / "sub").mkdir()
    (src / "tokenizer.json").write_text("{}")
    os.replace(src / "tokenizer.json", src / "sub" / "tokenizer.json")
    (src / "tokenizer.json").symlink_to(src / "sub" / "tokenizer.json")
    assert run(src, tmp_path / "ok") == 0
    assert (tmp_path / "ok" / "tokenizer.json").read_text() == "{}"
    # A shard symlinked from elsewhere: refused by the converter and the loader.
    os.replace(src / "model-00002-of-00002.safetensors", private / "model-00002-of-00002.safetensors")
    (src / "model-00002-of-00002.safetensors").symlink_to(private / "model-00002-of-00002.safetensors")
    with pytest.raises(CheckpointError, match="outside"):
        Source(src)
    with pytest.raises(LoadError, match="outside"):
        load_checkpoint(nn.Linear(2, 2), src, None)


def test_index_naming_a_shard_outside_the_folder_is_refused_by_the_loader(src, tmp_path):
    index = src / "model.safetensors.index.json"
    weight_map = json.loads(index.read_text())["weight_map"]
    (tmp_path / "elsewhere").mkdir()
    os.replace(src / "model-00002-of-00002.safetensors", tmp_path / "elsewhere" / "x.safetensors")
    index.write_text(json.dumps({"weight_map": {k: ("../elsewhere/x.safetensors" if v.endswith("2.safetensors") else v)
                                                for k, v in weight_map.items()}}))
    with pytest.raises(LoadError, match="outside"):
        load_checkpoint(nn.Linear(2, 2), src, None)


def test_mindspore_sidecar_naming_a_file_outside_is_refused(tmp_path, capsys):
    ms = tmp_path / "ms"
    ms.mkdir()
    save_file({"a": torch.zeros(1)}, str(tmp_path / "victim.safetensors"))
    (ms / "v4hal-mindspore.json").write_text(json.dumps({"format": "safetensors", "names": "hf", "tensors": [
        {"name": "a", "hf_name": "a", "dtype": "F32", "shape": [1], "file": "../victim.safetensors"}]}))
    assert cli("run", "--to", "hf", "--no-progress", ms, tmp_path / "out") == 2
    assert "outside" in one_line_error(capsys)


def test_verify_refuses_manifest_names_outside_the_folder(src, tmp_path, capsys):
    out, victim = tmp_path / "out", tmp_path / "victim.txt"
    assert run(src, out) == 0
    victim.write_bytes(b"private")
    manifest = json.loads((out / plan.MANIFEST).read_text())
    manifest["outputs"]["../victim.txt"] = {"sha256": hashlib.sha256(b"private").hexdigest(), "size": 7}
    (out / plan.MANIFEST).write_text(json.dumps(manifest))
    assert cli("verify", out) == 1
    assert "outside" in capsys.readouterr().out


def test_outputs_are_no_more_readable_than_their_sources(src, tmp_path):
    for p in src.iterdir():
        p.chmod(0o600)
    assert run(src, tmp_path / "out") == 0
    for name in ("config.json", "model-00001-of-00002.safetensors"):
        assert stat.S_IMODE((tmp_path / "out" / name).stat().st_mode) & 0o077 == 0, name


class Unblock:
    """Opens a FIFO's writing end after a while, so code that (wrongly) opened it for reading gets
    EOF instead of hanging the test; does nothing if the code under test refused it first."""

    def __init__(self, fifo):
        self.done = threading.Event()
        self.thread = threading.Thread(target=lambda: self.done.wait(20) or os.close(os.open(fifo, os.O_WRONLY)))

    def __enter__(self):
        self.thread.start()

    def __exit__(self, *exc):
        self.done.set()
        self.thread.join()


def test_a_fifo_named_like_a_shard_is_refused_not_opened(src):
    fifo = src / "model-00003-of-00003.safetensors"
    os.mkfifo(fifo)
    with Unblock(fifo), pytest.raises(CheckpointError, match="not a regular file"):
        Source(src)
    (src / "model.safetensors.index.json").unlink()
    with Unblock(fifo), pytest.raises(LoadError, match="not a regular file"):
        load_checkpoint(nn.Linear(2, 2), src, None)


def test_verify_fails_an_emptied_manifest(src, tmp_path, capsys):
    out = tmp_path / "out"
    assert run(src, out) == 0
    original = (out / plan.MANIFEST).read_text()
    for key in ("outputs", "tensors"):
        manifest = json.loads(original)
        manifest[key] = {}
        (out / plan.MANIFEST).write_text(json.dumps(manifest))
        assert cli("verify", out) == 1, key
        assert "not listed in the manifest" in capsys.readouterr().out


def test_resume_redoes_a_finished_unit_whose_output_changed(src, tmp_path, monkeypatch):
    assert run(src, tmp_path / "ref") == 0
    out = tmp_path / "out"
    original = plan.process_unit

    def fail_second(p, unit, *args):
        if unit.index == 1:
            raise RuntimeError("killed")
        return original(p, unit, *args)

    monkeypatch.setattr(plan, "process_unit", fail_second)
    with pytest.raises(RuntimeError, match="killed"):
        run(src, out, "--workers", "1")  # in this process, one unit after the other
    monkeypatch.setattr(plan, "process_unit", original)
    shard = out / "model-00001-of-00002.safetensors"
    data = bytearray(shard.read_bytes())
    data[-1] ^= 0xFF  # same size, other bytes
    shard.write_bytes(data)
    assert run(src, out) == 0
    assert file_bytes(out) == file_bytes(tmp_path / "ref")


def _safetensors(path, entries: dict, data: bytes) -> None:
    raw = json.dumps(entries).encode()
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + data)


def test_tensors_aliasing_the_same_bytes_are_refused(tmp_path, capsys):
    (tmp_path / "src").mkdir()
    _safetensors(tmp_path / "src" / "model.safetensors", {
        "a": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]},
        "b": {"dtype": "F32", "shape": [2], "data_offsets": [8, 16]}}, bytes(16))
    assert run(tmp_path / "src", tmp_path / "out", to="copy") == 2
    err = one_line_error(capsys)
    assert "overlap" in err and "'b'" in err and "'a'" in err


def _tiny():
    args = ModelArgs.from_dict({"model_type": "deepseek_v3", "vocab_size": 64, "hidden_size": 32, "num_hidden_layers": 1,
                                "num_attention_heads": 2, "intermediate_size": 64, "q_lora_rank": 16, "kv_lora_rank": 16,
                                "qk_nope_head_dim": 8, "qk_rope_head_dim": 8, "v_head_dim": 8, "max_position_embeddings": 64})
    return args, {k: v.contiguous() for k, v in build(args).state_dict().items()}


def test_loader_rejects_an_integer_weight_and_a_tensor_stored_twice(tmp_path):
    args, tensors = _tiny()
    weight = next(k for k, v in tensors.items() if k.endswith("o_proj.weight"))
    d = tmp_path / "int"
    d.mkdir()
    save_file({**tensors, weight: tensors[weight].round().to(torch.int32)}, str(d / "model.safetensors"))
    with pytest.raises(LoadError, match=rf"{weight}: stored as torch.int32"):
        load_checkpoint(build(args), d, args)
    d = tmp_path / "twice"
    d.mkdir()
    save_file(tensors, str(d / "model-1.safetensors"))
    save_file({weight: tensors[weight]}, str(d / "model-2.safetensors"))
    with pytest.raises(LoadError, match=rf"{weight}: stored twice, in model-1.safetensors and model-2.safetensors"):
        load_checkpoint(build(args), d, args)


def test_verify_source_accepts_a_resharded_output(tmp_path):
    gen = torch.Generator().manual_seed(0)
    (tmp_path / "src").mkdir()
    save_file({"model.layers.0.self_attn.o_proj.weight": torch.randn(64, 256, generator=gen).bfloat16(),
               "model.layers.0.input_layernorm.weight": torch.randn(64, generator=gen).bfloat16(),
               "model.layers.0.mlp.gate.tid2eid": torch.randint(0, 4, (16, 2), generator=gen, dtype=torch.int32)},
              str(tmp_path / "src" / "model.safetensors"))
    assert run(tmp_path / "src", tmp_path / "out", "--mp", "2", to="copy") == 0
    assert cli("verify", tmp_path / "out", "--source", tmp_path / "src") == 0
    rank1 = load_file(str(tmp_path / "out" / "model1-mp2-00001-of-00001.safetensors"))
    tampered = {**rank1, "model.layers.0.input_layernorm.weight": -rank1["model.layers.0.input_layernorm.weight"]}
    save_file(tampered, str(tmp_path / "tampered.safetensors"), metadata={"format": "pt"})
    os.replace(tmp_path / "tampered.safetensors", tmp_path / "out" / "model1-mp2-00001-of-00001.safetensors")
    assert cli("verify", "--no-hash", tmp_path / "out", "--source", tmp_path / "src") == 1  # each rank's copy is compared


def test_mxfp8_output_loads_into_our_model_with_the_sources_logits(tmp_path):
    save_hf("v3", tmp_path / "bf16")
    assert run(tmp_path / "bf16", tmp_path / "fp8", to="fp8") == 0  # --to mxfp8 re-quantizes FP8 weights
    assert run(tmp_path / "fp8", tmp_path / "mx", to="mxfp8") == 0
    ids = torch.randint(0, 256, (1, 12), generator=torch.Generator().manual_seed(1))
    got = {}
    for directory in ("fp8", "mx"):
        args = ModelArgs.from_json(tmp_path / directory / "config.json")
        ours = build(args, dtype=torch.float32)
        report = load_checkpoint(ours, tmp_path / directory, args)
        with torch.no_grad():
            got[directory] = ours(ids).float()
    assert report.dequantized > 0
    ref, mx = got["fp8"], got["mx"]
    # e4m3 keeps 3 mantissa bits: each weight within 2^-4 of itself, the logits within a few percent.
    assert torch.nn.functional.cosine_similarity(ref.flatten(), mx.flatten(), 0) > 0.999
    assert (mx - ref).abs().max() < 0.1 * ref.abs().max()


def test_resume_skips_unchanged_outputs_without_reading_them_and_redoes_one_changed_with_its_mtime_restored(
        src, tmp_path, monkeypatch):
    run(src, tmp_path / "ref")
    out = tmp_path / "out"
    original = plan.process_unit

    def fail_last(p, unit, *args):
        if unit.index == len(p.units) - 1:
            raise RuntimeError("killed")
        return original(p, unit, *args)

    monkeypatch.setattr(plan, "process_unit", fail_last)
    with pytest.raises(RuntimeError, match="killed"):
        run(src, out, "--workers", "1")
    monkeypatch.setattr(plan, "process_unit", original)
    hashed = []
    hash_file = plan.hash_file
    monkeypatch.setattr(plan, "hash_file", lambda path, algo: hashed.append(os.path.basename(path)) or hash_file(path, algo))
    journal = json.loads((out / plan.PROGRESS).read_text())
    finished = [name for rec in journal["units"].values() for name in rec["outputs"]]
    assert finished and run(src, out) == 0
    assert hashed == []  # the journal's identities matched: nothing re-read
    assert file_bytes(out) == file_bytes(tmp_path / "ref")

    with pytest.raises(RuntimeError, match="killed"):
        monkeypatch.setattr(plan, "process_unit", fail_last)
        run(src, out, "--workers", "1", "--restart")
    monkeypatch.setattr(plan, "process_unit", original)
    shard = out / finished[0]
    before = shard.stat()
    data = bytearray(shard.read_bytes())
    data[-1] ^= 0xFF  # same size, other bytes, and the old mtime put back
    shard.write_bytes(data)
    os.utime(shard, ns=(before.st_atime_ns, before.st_mtime_ns))
    assert run(src, out) == 0
    assert hashed == [finished[0]]  # its ctime changed: re-hashed, found changed, redone
    assert file_bytes(out) == file_bytes(tmp_path / "ref")


def test_direct_reads_reopen_the_file_already_opened_not_its_path(tmp_path):
    """The O_DIRECT descriptor is the file the checks opened, even if its path now names another."""
    from v4hal.conversion import io as conversion_io

    checked, planted = tmp_path / "model.safetensors", tmp_path / "elsewhere"
    checked.write_bytes(b"a" * 8192)
    planted.write_bytes(b"b" * 8192)
    fd = os.open(checked, os.O_RDONLY)
    try:
        checked.unlink()
        checked.symlink_to(planted)
        direct = conversion_io._open_direct_read(fd)
        if direct is None:
            pytest.skip("this filesystem refuses O_DIRECT, so the converter opens nothing more here")
        try:
            assert os.fstat(direct).st_ino == os.fstat(fd).st_ino != planted.stat().st_ino
        finally:
            os.close(direct)
    finally:
        os.close(fd)
