"""The manifest's hashes: BLAKE3 for new manifests, sha256 manifests (format /1) still verify;
source hashes reused where something states them (a Hugging Face cache blob name, a v4hal
manifest), checked with --verify-source; the Hugging Face cache layout accepted by the
confinement check, and nothing else outside the folder."""

import hashlib
import json
import os
import shutil

import blake3
import pytest

from convert_util import cli, file_bytes, fp8_checkpoint
from v4hal.checkpoint_files import CheckpointError
from v4hal.conversion import plan
from v4hal.conversion.io import Source
from v4hal.model.loader import LoadError, checkpoint_files

SHARDS = ("model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors")


@pytest.fixture
def src(tmp_path):
    fp8_checkpoint(tmp_path / "src")
    return tmp_path / "src"


def run(src, dst, *extra, to="bf16"):
    return cli("run", "--to", to, "--no-progress", "--workers", "1", *extra, src, dst)


def manifest(dst):
    return json.loads((dst / plan.MANIFEST).read_text())


def test_new_manifests_record_blake3_of_every_file(src, tmp_path):
    assert run(src, tmp_path / "out") == 0
    m = manifest(tmp_path / "out")
    assert m["format"] == "v4hal-conversion/2" and m["hash"] == "blake3"
    for name, meta in m["outputs"].items():
        assert meta == {"blake3": blake3.blake3((tmp_path / "out" / name).read_bytes()).hexdigest(),
                        "size": (tmp_path / "out" / name).stat().st_size}, name
    for name, meta in m["sources"].items():  # nothing states these sources' hashes: computed while read
        assert meta["blake3"] == blake3.blake3((src / name).read_bytes()).hexdigest()


def as_sha256_manifest(dst):
    """Rewrite a manifest the way format /1 wrote it: sha256 everywhere, no "hash" field."""
    m = manifest(dst)
    m["format"] = "v4hal-conversion/1"
    del m["hash"]
    for folder, entries in ((dst, m["outputs"]), (None, m["sources"])):
        for name, meta in entries.items():
            del meta["blake3"]
            if folder is not None:
                meta["sha256"] = hashlib.sha256((folder / name).read_bytes()).hexdigest()
    return m


def test_an_older_sha256_manifest_verifies_and_a_changed_byte_is_found(src, tmp_path, capsys):
    dst = tmp_path / "out"
    assert run(src, dst) == 0
    m = as_sha256_manifest(dst)
    for name, meta in m["sources"].items():
        meta["sha256"] = hashlib.sha256((src / name).read_bytes()).hexdigest()
    (dst / plan.MANIFEST).write_text(json.dumps(m))
    assert cli("verify", dst, "--source", src) == 0
    shard = dst / SHARDS[1]
    data = bytearray(shard.read_bytes())
    data[-3] ^= 0x01
    shard.write_bytes(bytes(data))
    capsys.readouterr()
    assert cli("verify", dst) == 1
    assert f"{SHARDS[1]}: sha256 differs from the manifest" in capsys.readouterr().out


def test_a_changed_byte_is_reported_by_file_and_with_the_source_by_tensor(src, tmp_path, capsys):
    dst = tmp_path / "out"
    assert run(src, dst) == 0
    shard = dst / SHARDS[0]
    data = bytearray(shard.read_bytes())
    data[-7] ^= 0x40  # in the last tensor's bytes
    shard.write_bytes(bytes(data))
    capsys.readouterr()
    assert cli("verify", dst, "--source", src) == 1
    out = capsys.readouterr().out
    assert f"{SHARDS[0]}: blake3 differs from the manifest" in out
    last = list(Source(dst, [SHARDS[0]]).tensors)[-1]
    assert f"{SHARDS[0]}, tensor '{last}'" in out


def hf_cache(src, root):
    """`src` laid out as the Hugging Face cache lays out a download: snapshot files are
    symlinks into ../../blobs, LFS files (the shards) named by their sha256, small files by a
    40-digit git blob id."""
    repo = root / "models--org--tiny"
    snapshot, blobs = repo / "snapshots" / ("c0ffee" * 6 + "0000"), repo / "blobs"
    snapshot.mkdir(parents=True)
    blobs.mkdir()
    for p in sorted(src.iterdir()):
        data = p.read_bytes()
        blob = hashlib.sha256(data).hexdigest() if p.suffix == ".safetensors" else hashlib.sha1(data).hexdigest()
        (blobs / blob).write_bytes(data)
        (snapshot / p.name).symlink_to(os.path.join("..", "..", "blobs", blob))
    return snapshot


def test_hf_cache_layout_is_read_and_its_blob_names_are_the_source_hashes(src, tmp_path, monkeypatch):
    snapshot = hf_cache(src, tmp_path / "hub")
    hashed = []
    original = plan.HashingReader.__init__
    monkeypatch.setattr(plan.HashingReader, "__init__", lambda self, path, progress=None, algo="blake3":
                        hashed.append(algo) or original(self, path, progress, algo))
    assert run(snapshot, tmp_path / "out") == 0
    assert hashed == [None, None]  # stated by the blob names: not hashed again
    m = manifest(tmp_path / "out")
    for name in SHARDS:
        assert m["sources"][name] == {"sha256": hashlib.sha256((src / name).read_bytes()).hexdigest(),
                                      "size": (src / name).stat().st_size}
    assert run(src, tmp_path / "plain") == 0  # the same bytes out as from a plain folder
    plain = file_bytes(tmp_path / "plain")
    assert {k: v for k, v in file_bytes(tmp_path / "out").items() if k != plan.MANIFEST} == \
           {k: v for k, v in plain.items() if k != plan.MANIFEST}
    assert cli("verify", tmp_path / "out", "--source", snapshot) == 0


def test_the_loader_reads_the_hf_cache_layout_and_refuses_a_symlink_leaving_it(src, tmp_path):
    snapshot = hf_cache(src, tmp_path / "hub")
    assert [p.name for p in checkpoint_files(snapshot)] == list(SHARDS)
    shard = snapshot / SHARDS[1]
    (tmp_path / "elsewhere").mkdir()
    shutil.copyfile(shard.resolve(), tmp_path / "elsewhere" / "x")
    shard.unlink()
    shard.symlink_to(tmp_path / "elsewhere" / "x")
    with pytest.raises(LoadError, match="outside"):
        checkpoint_files(snapshot)


def test_verify_source_hashes_a_stated_source_and_refuses_a_mismatch(src, tmp_path, capsys):
    snapshot = hf_cache(src, tmp_path / "hub")
    assert run(snapshot, tmp_path / "ok", "--verify-source") == 0
    blob = (snapshot / SHARDS[1]).resolve()
    data = bytearray(blob.read_bytes())
    data[-1] ^= 0x01  # the blob no longer has the content its name states
    blob.write_bytes(bytes(data))
    assert run(snapshot, tmp_path / "trusting") == 0  # without the flag the stated hash is taken
    assert run(snapshot, tmp_path / "out", "--verify-source") == 2
    err = capsys.readouterr().err
    assert SHARDS[1] in err and "differs from its stated sha256" in err
    assert not (tmp_path / "out" / plan.MANIFEST).exists()


def test_a_v4hal_output_as_source_reuses_its_manifest_hashes(src, tmp_path):
    assert run(src, tmp_path / "fp8", to="fp8") == 0
    stated = manifest(tmp_path / "fp8")["outputs"]
    assert run(tmp_path / "fp8", tmp_path / "bf16") == 0
    for name, meta in manifest(tmp_path / "bf16")["sources"].items():
        assert meta == stated[name]


def test_symlinks_leaving_the_hf_cache_layout_are_refused(src, tmp_path):
    snapshot = hf_cache(src, tmp_path / "hub")
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    shard = snapshot / SHARDS[1]
    escapes = {
        "another repo's blobs": tmp_path / "hub" / "models--other--repo" / "blobs" / "x",
        "a blob folder of a non-cache folder": outside / "blobs" / "x",
        "the repo folder itself": tmp_path / "hub" / "models--org--tiny" / "x",
        "a file anywhere": outside / "x",
    }
    for why, target in escapes.items():
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(shard.resolve(), target)
        shard.unlink()
        shard.symlink_to(target)
        with pytest.raises(CheckpointError, match="outside"):
            Source(snapshot)
    # the same blobs layout outside a snapshots/<rev> folder of a models--* repo is refused too
    fake = tmp_path / "notcache" / "snapshots" / "rev"
    fake.mkdir(parents=True)
    (tmp_path / "notcache" / "blobs").mkdir()
    shutil.copyfile(src / SHARDS[0], tmp_path / "notcache" / "blobs" / "b")
    (fake / SHARDS[0]).symlink_to("../../blobs/b")
    with pytest.raises(CheckpointError, match="outside"):
        Source(fake)
