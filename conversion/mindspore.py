"""HF safetensors <-> MindSpore checkpoints.

Forward (`--to mindspore`): one MindSpore file per source shard, either a `.ckpt` written by
`mindspore.save_checkpoint` (what `mindspore.load_checkpoint` reads; protobuf, no pickle) or, with
`--ms-format safetensors`, MindSpore's safetensors format (`load_checkpoint(..., format=
"safetensors")`). Tensor names are renamed segment by segment with `SEGMENTS` (MindFormers'
DeepSeek naming style; `--ms-names hf` keeps HF names). MindSpore has no FP8 / E8M0 checkpoint
dtype, so those tensors travel as their uint8 bit patterns. `v4hal-mindspore.json` records, for
every MindSpore name, the HF name, original dtype, shape and file: the way back is exact.

Backward (`--to hf`, source = a forward output): safetensors shards with the original names and
dtypes, bit-identical to `--to copy` of the original checkpoint.

Memory: `save_checkpoint` / `load_checkpoint` take whole dicts, so a `.ckpt` shard is held in
memory while it is written or read (one source shard, not the model). The safetensors format
streams like every other target.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import numpy as np
import torch

from v4hal.conversion import formats
from v4hal.conversion.formats import Job, Options
from v4hal.checkpoint_files import CheckpointError, confined
from v4hal.conversion.io import CODES, DTYPES, TensorInfo, nbytes_of, read_header, hash_file, small_files
from v4hal.conversion.output import OutSpec, ShardWriter, partial_name, write_json_atomic
from v4hal.conversion.plan import MANIFEST, Plan, _record

SIDECAR = "v4hal-mindspore.json"
# HF / DeepSeek module name -> MindSpore-style name (MindFormers' DeepSeek conventions).
SEGMENTS = {
    "embed_tokens": "tok_embeddings", "embed": "tok_embeddings", "self_attn": "attention", "attn": "attention",
    "mlp": "feed_forward", "ffn": "feed_forward", "input_layernorm": "attention_norm", "attn_norm": "attention_norm",
    "post_attention_layernorm": "ffn_norm", "q_a_proj": "q2l_proj", "wq_a": "q2l_proj", "q_a_layernorm": "lq_norm",
    "q_norm": "lq_norm", "q_b_proj": "l2q_proj", "wq_b": "l2q_proj", "kv_a_proj_with_mqa": "kv2l",
    "kv_a_layernorm": "lkv_norm", "kv_b_proj": "lkv2kv", "o_proj": "wo", "gate_proj": "w1", "down_proj": "w2",
    "up_proj": "w3", "experts": "routed_experts", "gate": "router", "norm": "norm_out", "lm_head": "lm_head",
}
# MindSpore lacks these checkpoint dtypes: stored as their bit patterns.
BITS_ONLY = (torch.float8_e4m3fn, torch.float8_e5m2, torch.float8_e8m0fnu)


def ms_name(name: str) -> str:
    parts = name.split(".")
    out = [SEGMENTS.get(p, p) for p in parts[:-1]] + [parts[-1]]
    if len(parts) >= 2 and parts[-2] in ("embed_tokens", "embed") and parts[-1] == "weight":
        out[-1] = "embedding_weight"  # nn.Embedding's parameter name in MindSpore
    return ".".join(out)


def ms_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.uint8 if dtype in BITS_ONLY else dtype


def _ms():
    import mindspore

    return mindspore


def to_ms_tensor(t: torch.Tensor):
    ms = _ms()
    if t.dtype == torch.bfloat16:  # numpy has no bfloat16 here: go through float32 (exact)
        return ms.Tensor(t.float().numpy()).astype(ms.bfloat16)
    return ms.Tensor(t.numpy())


def from_ms_tensor(p, dtype: torch.dtype) -> torch.Tensor:
    ms = _ms()
    if p.dtype == ms.bfloat16:
        return torch.from_numpy(p.astype(ms.float32).asnumpy()).to(torch.bfloat16)
    t = torch.from_numpy(np.ascontiguousarray(p.asnumpy()))
    return t.view(dtype) if t.dtype != dtype else t


class CkptWriter:
    """Gathers one shard's tensors (raw bytes, in spec order) and writes them with
    `mindspore.save_checkpoint` on close, to a temporary name renamed into place."""

    def __init__(self, path: Path, specs: list[OutSpec], mode: int):
        self.path, self.specs, self.mode = path, specs, mode
        self.buffers = [bytearray() for _ in specs]
        self.current = 0

    def write(self, t: torch.Tensor) -> None:
        while len(self.buffers[self.current]) == self.specs[self.current].nbytes:
            self.current += 1
        data = t.contiguous().view(torch.uint8).reshape(-1).numpy().tobytes() if t.numel() else b""
        self.buffers[self.current] += data

    def close(self) -> tuple[str, int]:
        items = []
        for spec, buf in zip(self.specs, self.buffers):
            if len(buf) != spec.nbytes:
                raise RuntimeError(f"internal: {spec.name} got {len(buf)} bytes, planned {spec.nbytes}")
            t = torch.frombuffer(buf, dtype=torch.uint8).view(spec.dtype).reshape(spec.shape) if buf else torch.empty(spec.shape, dtype=spec.dtype)
            items.append({"name": spec.name, "data": to_ms_tensor(t)})
        tmp = partial_name(self.path).with_suffix(".partial.ckpt")  # save_checkpoint insists on .ckpt
        _ms().save_checkpoint(items, str(tmp))
        os.chmod(tmp, os.stat(tmp).st_mode & self.mode & 0o777)  # never more readable than the source
        os.replace(tmp, self.path)
        self.buffers = []
        return hash_file(self.path), self.path.stat().st_size

    def abort(self) -> None:
        self.buffers = []


class ToMindSpore(Plan):
    def __init__(self, source, ms_format: str, names: str):
        self.ms_format, self.names = ms_format, names
        super().__init__(source, Options(target="copy"))
        if ms_format == "ckpt":
            self.max_workers = 1  # save_checkpoint holds a whole shard: one at a time
        self.opts = Options(target="mindspore")
        seen: dict[str, str] = {}
        for j in self.jobs:
            for o in j.outputs:
                if o.name in seen:
                    raise ValueError(f"mindspore: two tensors map to the name {o.name!r}: {seen[o.name]!r} and {self.hf_names[o.name]!r}")
                seen[o.name] = self.hf_names[o.name]

    @property
    def plan_id(self) -> str:
        return hashlib.sha256(f"{super().plan_id}:{self.ms_format}:{self.names}".encode()).hexdigest()

    def make_jobs(self) -> list[Job]:
        jobs = formats.plan_jobs(self.source.tensors, Options(target="copy"))
        self.hf_names, self.hf_dtypes = {}, {}
        for j in jobs:
            renamed = []
            for o in j.outputs:
                name = ms_name(o.name) if self.names == "mindspore" else o.name
                self.hf_names[name], self.hf_dtypes[name] = o.name, o.dtype
                renamed.append(OutSpec(name, ms_dtype(o.dtype), o.shape))
            j.outputs = renamed
        return jobs

    def out_name(self, source_file: str) -> str:
        return Path(source_file).stem + (".ckpt" if self.ms_format == "ckpt" else ".safetensors")

    def make_writer(self, path: Path, specs: list[OutSpec], mode: int):
        if self.ms_format == "ckpt":
            return CkptWriter(path, specs, mode)
        return ShardWriter(path, specs, {"format": "ms"}, self.fsync, mode=mode)

    def small_outputs(self) -> list[str]:
        return [p.name for p in self.source.extra_files()] + [SIDECAR, MANIFEST]

    def write_small(self, dst: Path) -> dict[str, dict]:
        tensors = [{"name": s.name, "hf_name": self.hf_names[s.name], "dtype": CODES[self.hf_dtypes[s.name]],
                    "shape": list(s.shape), "file": f.name}
                   for u in self.units for f in u.files for s in f.specs]  # file order: the way back keeps it
        sidecar = {"format": self.ms_format, "names": self.names, "tensors": tensors}
        return {SIDECAR: _record(write_json_atomic(dst / SIDECAR, sidecar))}

    def config(self, cfg: dict) -> bytes:
        return (json.dumps(cfg, indent=2, sort_keys=True) + "\n").encode()


class MindSporeSource:
    """A `--to mindspore` output read back: tensors under their HF names and dtypes."""

    def __init__(self, path: str | os.PathLike):
        self.dir = self.path = Path(path).resolve()
        try:
            self.sidecar = json.loads((self.dir / SIDECAR).read_text())
        except OSError:
            raise ValueError(f"{self.dir}: no {SIDECAR}; --to hf reads the output of --to mindspore") from None
        self.format = self.sidecar["format"]
        self.files: dict[str, int] = {}
        self.tensors: dict[str, TensorInfo] = {}
        self.ms_names: dict[str, str] = {}
        headers: dict[str, dict[str, TensorInfo]] = {}
        for position, t in enumerate(self.sidecar["tensors"]):
            file = self.dir / t["file"]
            confined(self.dir, t["file"])
            self.files.setdefault(t["file"], file.stat().st_size)
            dtype, shape = DTYPES[t["dtype"]], tuple(t["shape"])
            start = position
            if self.format == "safetensors":  # plain safetensors: stream it like any other source
                if t["file"] not in headers:
                    headers[t["file"]] = read_header(file)[0]
                stored = headers[t["file"]].get(t["name"])
                if stored is None or stored.nbytes != nbytes_of(dtype, shape):
                    raise CheckpointError(file, f"does not match {SIDECAR}", t["name"])
                start = stored.start
            self.tensors[t["hf_name"]] = TensorInfo(t["hf_name"], str(file), dtype, shape, start, nbytes_of(dtype, shape))
            self.ms_names[t["hf_name"]] = t["name"]

    def extra_files(self) -> list[Path]:
        return small_files(self.dir, lambda p: p.suffix == ".json" and p.name not in (SIDECAR, MANIFEST)
                           and not p.name.startswith("."))


class MsReader:
    """Loads one .ckpt whole (load_checkpoint has no partial read) and serves rows."""

    def __init__(self, source: MindSporeSource, file: str, progress, algo: str | None = None):
        path = source.dir / file
        self.params = _ms().load_checkpoint(str(path))
        self.source, self.path, self.progress, self.algo = source, path, progress, algo
        self.cache: dict[str, torch.Tensor] = {}

    def rows(self, info: TensorInfo, row0: int, row1: int) -> torch.Tensor:
        t = self.cache.get(info.name)
        if t is None:
            t = self.cache[info.name] = from_ms_tensor(self.params.pop(self.source.ms_names[info.name]), info.dtype)
        out = t.reshape(info.shape)[row0:row1] if info.shape else t.reshape(())
        if row1 >= (info.shape[0] if info.shape else 1):
            del self.cache[info.name]
        return out

    def companion(self, info: TensorInfo) -> torch.Tensor:
        return self.rows(info, 0, info.shape[0] if info.shape else 1)

    def finish(self) -> str | None:
        return hash_file(self.path, self.algo, self.progress) if self.algo else None


class ToHF(Plan):
    def __init__(self, source: MindSporeSource):
        super().__init__(source, Options(target="copy"))
        self.opts = Options(target="hf")
        if source.format == "ckpt":
            self.max_workers = 1  # load_checkpoint holds a whole shard: one at a time

    def out_name(self, source_file: str) -> str:
        return Path(source_file).stem + ".safetensors"

    def make_reader(self, unit, progress):
        if self.source.format == "safetensors":
            return super().make_reader(unit, progress)
        return MsReader(self.source, unit.source_file, progress, self.source_hash(unit))


def plan(source: str, to: str, ms_format: str = "ckpt", names: str = "mindspore") -> Plan:
    if to == "hf":
        return ToHF(MindSporeSource(source))
    from v4hal.conversion.io import Source

    return ToMindSpore(Source(source), ms_format, names)
