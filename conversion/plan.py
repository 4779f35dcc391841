"""Plan a conversion (every output file, tensor and byte, before reading any data) and run it.

The unit of work and of resume is one source shard: it produces one output shard (or one per
rank when resharding). After each unit the outputs are renamed into place and the progress
journal (`.v4hal-progress.json`) is replaced atomically, so a run killed at any point leaves
only complete files plus `.partial` leftovers; a rerun deletes those, skips the units the journal
lists (after checking their files' sizes), and redoes the rest. Everything written is a pure
function of the source bytes and the options, so the result is byte-identical to an
uninterrupted run. Finally config files, the index json(s), `quant_model_description.json`
(W8A8) and the manifest `v4hal-manifest.json` (the hash of every output and source file: BLAKE3
for outputs, for sources the hash something already states or else BLAKE3) are written, each
atomically.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import hashlib
import json
import math
import os
import shutil
import socket
import sys
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import torch

from v4hal.conversion import formats, reshard, workers
from v4hal.conversion.formats import Job, Options
from v4hal.checkpoint_files import CheckpointError, confined
from v4hal.conversion.io import INDEX_NAME, OUTPUT_HASH, HashingReader, Source, digest_of, hash_file, nbytes_of, stated_hash
from v4hal.conversion.output import OutSpec, ShardWriter, file_size, write_atomic, write_json_atomic

MANIFEST = "v4hal-manifest.json"
MANIFEST_FORMAT = "v4hal-conversion/2"  # /2: entries keyed by hash algorithm, "hash" names the outputs'; /1: sha256
PROGRESS = ".v4hal-progress.json"
LOCK = ".v4hal-lock"
DESCRIPTION = "quant_model_description.json"
CHUNK_BYTES = 32 * 2**20  # target size of one row chunk of float32 work


class ConversionError(RuntimeError):
    """A refused request: the output folder is someone else's, locked, or holds another conversion."""


class NotEnoughSpace(ConversionError):
    """The destination lacks the disk the conversion needs."""


@dataclass
class OutFile:
    name: str
    specs: list[OutSpec]
    rank: int | None = None

    @property
    def size(self) -> int:
        return file_size(self.specs, {"format": "pt"})


@dataclass
class Unit:
    index: int
    source_file: str
    source_size: int
    jobs: list[Job]
    files: list[OutFile]


class Plan:
    def __init__(self, source: Source, opts: Options):
        self.source, self.opts = source, resolve_scale_fmt(opts, source_config(source))
        jobs = self.make_jobs()
        by_job_file: dict[str, list[Job]] = {f: [] for f in source.files}
        for j in jobs:
            by_job_file[Path(source.tensors[j.source].file).name].append(j)
        n_units = len(source.files)
        self.units = []
        for i, (fname, fjobs) in enumerate(by_job_file.items()):
            self.units.append(Unit(i, fname, source.files[fname], fjobs, self._files(i, n_units, fname, fjobs)))
        self.jobs = jobs
        self.stated = {name: stated_hash(source.dir, name) for name in source.files}

    def make_jobs(self) -> list[Job]:
        jobs = formats.plan_jobs(self.source.tensors, self.opts)
        if self.opts.mp > 1:
            engram = reshard.engram_rows(source_config(self.source), self.opts.mp)
            reshard.assign(jobs, self.opts.mp, self.opts.n_experts, engram)
        return jobs

    def out_name(self, source_file: str) -> str:
        return source_file

    def _files(self, i: int, n: int, fname: str, jobs: list[Job]) -> list[OutFile]:
        mp = self.opts.mp
        if mp == 1:
            return [OutFile(self.out_name(fname), [o for j in jobs for o in j.outputs])]
        files = []
        for r in range(mp):
            specs = []
            for j in jobs:
                for k, o in enumerate(j.outputs):
                    shape = reshard.rank_shape(j, k, mp, r)
                    if shape is not None:
                        specs.append(OutSpec(o.name, o.dtype, shape))
            files.append(OutFile(f"model{r}-mp{mp}-{i + 1:05d}-of-{n:05d}.safetensors", specs, r))
        return files

    fsync = True
    verify_source = False  # hash every source file, even one whose hash is stated, and compare
    max_workers: int | None = None  # a plan whose units hold a whole shard in memory says 1

    def make_writer(self, path: Path, specs: list[OutSpec], mode: int):
        return ShardWriter(path, specs, {"format": "pt"}, self.fsync, mode=mode)

    def source_hash(self, unit: Unit) -> str | None:
        """The algorithm to hash a unit's source file with while it is read: None when its hash
        is stated and not to be checked, the stated hash's algorithm when it is, else BLAKE3."""
        stated = self.stated[unit.source_file]
        if stated is None:
            return OUTPUT_HASH
        return next(iter(stated)) if self.verify_source else None

    def make_reader(self, unit: Unit, progress):
        reader = HashingReader(str(self.source.dir / unit.source_file), progress, self.source_hash(unit))
        reader.expect(stream_reads(unit.jobs, self.source))
        return reader

    @property
    def plan_id(self) -> str:
        """Changes whenever the source headers or the options change (a journal from another
        plan must not be resumed)."""
        h = hashlib.sha256(json.dumps(self.opts.as_dict(), sort_keys=True).encode())
        for name, size in self.source.files.items():
            h.update(f"{name}:{size};".encode())
        for t in self.source.tensors.values():
            h.update(f"{t.name}:{t.dtype}:{t.shape}:{t.start};".encode())
        return h.hexdigest()

    def output_bytes(self) -> int:
        return sum(f.size for u in self.units for f in u.files)

    def describe(self) -> list[str]:
        lines = [f"{f.name}  {f.size / 1e9:.3f} GB  ({len(f.specs)} tensors, from {u.source_file})"
                 for u in self.units for f in u.files]
        lines += [f"{name}  (small)" for name in self.small_outputs()]
        return lines

    def small_outputs(self) -> list[str]:
        names = [p.name for p in self.source.extra_files()] + self.index_names()
        if self.opts.target == "w8a8":
            names.append(DESCRIPTION)
        return names + [MANIFEST]

    def write_small(self, dst: Path) -> dict[str, dict]:
        """Index json(s) and the W8A8 description: {name: {blake3, size}}."""
        out = {}
        for name, weight_map, total in _indexes(self):
            out[name] = _record(write_json_atomic(dst / name, {"metadata": {"total_size": total}, "weight_map": weight_map}))
        if self.opts.target == "w8a8":
            out[DESCRIPTION] = _record(write_json_atomic(dst / DESCRIPTION, description(self)))
        return out

    def config(self, cfg: dict) -> bytes:
        return _config(cfg, self.opts)

    def index_names(self) -> list[str]:
        return [INDEX_NAME] if self.opts.mp == 1 else [f"model{r}-mp{self.opts.mp}.safetensors.index.json" for r in range(self.opts.mp)]


def source_config(source: Source) -> dict | None:
    config = source.dir / "config.json"
    return json.loads(config.read_text()) if config.is_file() else None


def resolve_scale_fmt(opts: Options, config: dict | None) -> Options:
    """The fp8 target's scale format, with the source's (its config's `quantization_config.scale_fmt`,
    absent: fp32). That field also sets how the model quantizes its activations at run time
    (ue8m0: power-of-two scales), so "auto" keeps the source's; fp32 asked of a ue8m0 source is
    refused (its weights' scales are powers of two already: only the activations would change);
    ue8m0 asked of an fp32 source re-quantizes the weights, as asked, and the config says ue8m0."""
    if opts.target != "fp8":
        return opts
    stated = ((config or {}).get("quantization_config") or {}).get("scale_fmt") or "fp32"
    if stated not in formats.SCALE_FMTS:
        raise ConversionError(f"the source's config.json says quantization_config.scale_fmt {stated!r}; "
                              f"expected one of {formats.SCALE_FMTS} (or none)")
    asked = stated if opts.scale_fmt == "auto" else opts.scale_fmt
    if stated == "ue8m0" and asked == "fp32":
        raise ConversionError("--scale-fmt fp32: the source's config says quantization_config.scale_fmt 'ue8m0', "
                              "which also makes the model scale its FP8 activations by powers of two at run time; "
                              "an fp32 checkpoint would compute differently (and the weights' scales are powers of "
                              "two already). Leave --scale-fmt out (or pass ue8m0) to keep the source's")
    return dataclasses.replace(opts, scale_fmt=asked, source_scale_fmt=stated)


def chunk_rows(job: Job) -> int:
    """Rows per chunk: a multiple of 128 (whole FP8 blocks) near CHUNK_BYTES of float32."""
    main = job.outputs[0].shape
    if len(main) < 2:
        return max(main[0], 1) if main else 1
    per_row = max(1, math.prod(main[1:]) * 4)
    return max(128, CHUNK_BYTES // per_row // 128 * 128)


def row_chunks(job: Job, src: Source) -> list[tuple[int, int]]:
    """The [row0, row1) chunks in which `run_job` reads a job's source tensor."""
    info = src.tensors[job.source]
    rows = info.shape[0] if info.shape else 1
    step = max(1, CHUNK_BYTES // max(info.row_bytes, 1)) if job.decode == "raw" else chunk_rows(job)
    return [(r0, min(rows, r0 + step)) for r0 in range(0, rows, step)]


def stream_reads(jobs: list[Job], src: Source) -> list[tuple[int, int]]:
    """(file offset, bytes) of every source read of `jobs`, in order (what readers read ahead)."""
    out = []
    for job in jobs:
        info = src.tensors[job.source]
        out += [(info.start + r0 * info.row_bytes, (r1 - r0) * info.row_bytes) for r0, r1 in row_chunks(job, src)]
    return out


def run_job(job: Job, src: Source, reader, emit, buffer=None) -> None:
    """Stream one job: emit(out_index, row0, piece) for the main output's row chunks in order,
    then for each side output once. `buffer(nbytes)`, when given, is where a BF16 or int8 chunk
    is computed before it is emitted (the writer's placed buffers: no copy on the way to the disk)."""
    info = src.tensors[job.source]
    if job.decode == "raw":
        for r0, r1 in row_chunks(job, src):
            emit(0, r0, reader.rows(info, r0, r1))
        if job.scale:  # a kept scale travels as is
            emit(1, 0, reader.companion(src.tensors[job.scale]))
        return
    scale = formats.float_scale(reader.companion(src.tensors[job.scale]), src.tensors[job.scale]) if job.scale else None
    sides: list[list[torch.Tensor]] = [[] for _ in job.outputs[1:]]
    dtype = job.outputs[0].dtype
    placed = buffer is not None and job.encode in ("bf16", "int8")
    for r0, r1 in row_chunks(job, src):
        shape = (r1 - r0, *job.outputs[0].shape[1:])
        out = buffer(nbytes_of(dtype, shape)).view(dtype).reshape(shape) if placed else None
        main, *rest = formats.convert_rows(job.decode, job.encode, reader.rows(info, r0, r1), scale, r0, job.extra, out)
        if job.decode == "mxfp8" and job.encode == "bf16":
            formats.refuse_bf16_overflow(main, scale, r0, info)
        emit(0, r0, main)
        for acc, piece in zip(sides, rest):
            acc.append(piece)
    for k, acc in enumerate(sides, 1):
        emit(k, 0, torch.cat(acc))


def process_unit(plan: Plan, unit: Unit, dst: Path, progress) -> dict:
    src, mp = plan.source, plan.opts.mp
    mode = os.stat(plan.source.dir / unit.source_file).st_mode  # outputs no more readable than their source
    writers = [plan.make_writer(dst / f.name, f.specs, mode) for f in unit.files]
    reader = plan.make_reader(unit, progress)
    try:
        for job in unit.jobs:
            if mp == 1:
                run_job(job, src, reader, lambda k, r0, t: writers[0].write(t),
                        getattr(writers[0], "buffer", None))
            else:
                run_job(job, src, reader, lambda k, r0, t, job=job: [
                    writers[r].write(p) for r, p in reshard.pieces(job, k, t, mp, r0)])
        source = source_record(plan, unit, reader.finish())
        outputs = {}
        for f, w in zip(unit.files, writers):
            outputs[f.name] = _record(w.close())
    except BaseException:
        for w in writers:
            w.abort()
        raise
    return {"source": source, "outputs": outputs, "identity": {f.name: _identity(dst / f.name) for f in unit.files}}


def source_record(plan: Plan, unit: Unit, digest: str | None) -> dict[str, str]:
    """{algorithm: hex} of a unit's source file: the stated hash (checked against `digest`
    when the file was hashed anyway), else the hash computed while reading it."""
    stated = plan.stated[unit.source_file]
    if stated is None:
        return {OUTPUT_HASH: digest}
    algo, expected = next(iter(stated.items()))
    if digest is not None and digest != expected:
        raise CheckpointError(plan.source.dir / unit.source_file, f"content differs from its stated {algo} {expected} "
                              f"(Hugging Face cache blob name or v4hal manifest): the file is corrupt or was changed")
    return dict(stated)


def _written_names(dst: Path) -> set[str]:
    """Every file the journal and manifest in `dst` say v4hal wrote there."""
    names = set()
    try:
        if (dst / PROGRESS).exists():
            for rec in json.loads((dst / PROGRESS).read_text())["units"].values():
                names.update(rec["outputs"])
        if (dst / MANIFEST).exists():
            names.update(json.loads((dst / MANIFEST).read_text())["outputs"])
    except (json.JSONDecodeError, KeyError, TypeError, AttributeError) as exc:
        raise ConversionError(f"{dst}: unreadable {PROGRESS} / {MANIFEST} ({exc!r}); remove the folder by hand") from None
    return names


def _discard(dst: Path) -> None:
    """--restart: remove what an earlier conversion (finished or not) wrote, so none of it survives.
    Only names inside `dst` are removed: a journal or manifest naming another file is refused."""
    names = _written_names(dst) | {MANIFEST, PROGRESS}
    try:
        paths = [confined(dst, name, regular=False) for name in names]
    except CheckpointError as exc:
        raise ConversionError(f"--restart refused: {exc}") from None
    for path in paths:
        path.unlink(missing_ok=True)


def is_scratch(name: str) -> bool:
    """v4hal's own leftovers: the lock, partial files of a killed run."""
    return name == LOCK or (name.startswith(".") and ".partial" in name)


def _check_owner(dst: Path, overwrite: bool) -> None:
    """A folder holding files but no v4hal journal or manifest belongs to someone else: refused,
    so nothing v4hal did not write is ever replaced, unless the user says --overwrite."""
    if overwrite or (dst / PROGRESS).exists() or (dst / MANIFEST).exists():
        return
    foreign = sorted(p.name for p in dst.iterdir() if not is_scratch(p.name))
    if foreign:
        shown = ", ".join(foreign[:5]) + (" ..." if len(foreign) > 5 else "")
        raise ConversionError(f"{dst} holds files v4hal did not write ({shown}); choose an empty or new folder, "
                              f"or pass --overwrite to replace files of the same names")


@contextlib.contextmanager
def output_lock(dst: Path):
    """Hold `dst/.v4hal-lock` (flock, so a dead holder's lock is released by the kernel) for a
    run; another run into the same folder is refused at once, naming the holder. The file holds
    the holder's pid and host, and is removed on release; a lock file removed by its holder
    between our open and flock is retried, so two runs never both hold one."""
    path = dst / LOCK
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(fd, 256).decode(errors="replace").strip() or "a process that is starting"
            os.close(fd)
            raise ConversionError(f"{dst} is locked by another conversion ({holder}); "
                                  f"wait for it to finish or choose another folder") from None
        try:
            if os.stat(path, follow_symlinks=False).st_ino == os.fstat(fd).st_ino:
                break
        except FileNotFoundError:
            pass
        os.close(fd)
    try:
        os.ftruncate(fd, 0)
        os.write(fd, f"pid {os.getpid()} on {socket.gethostname()}\n".encode())
        yield
    finally:
        os.unlink(path)
        os.close(fd)


def _load_journal(dst: Path, plan_id: str, restart: bool) -> dict:
    path = dst / PROGRESS
    if restart:
        _discard(dst)
    if path.exists():
        journal = json.loads(path.read_text())
        if journal.get("plan") == plan_id:
            return journal
        raise ConversionError(f"{dst} holds a different conversion in progress (other source or options); "
                              f"pass --restart to discard it")
    if (dst / MANIFEST).exists():
        if json.loads((dst / MANIFEST).read_text()).get("plan") == plan_id:
            return {"plan": plan_id, "units": {}, "complete": True}
        raise ConversionError(f"{dst} already holds a finished conversion of something else; pass --restart to overwrite")
    return {"plan": plan_id, "units": {}}


def _identity(path: Path) -> list[int]:
    """What changes whenever a file's bytes do: inode, size, mtime and ctime (ns). The kernel
    sets ctime to its clock on every write, and no system call sets it back (utime sets only
    atime / mtime), so a file rewritten in place, even to the same size with its mtime restored,
    gets another ctime (only a clock set back by root, or writes to the raw disk, escape this)."""
    st = path.stat()
    return [st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns]


def _unit_done(dst: Path, record: dict | None) -> bool:
    """A journaled unit is skipped only if each of its outputs is still the file the journal
    recorded: the same `_identity` as right after its rename (then its bytes are the ones
    hashed as they were written, fsync'd before the journal named them), or else the recorded
    size and hash, re-read (a journal from before identities, a file copied back in place). A
    record of an older journal format (no "source") is redone."""
    if not record or "source" not in record:
        return False
    for name, meta in record["outputs"].items():
        try:
            path = confined(dst, name)
            algo, digest = digest_of(meta)
        except (CheckpointError, ValueError):
            return False
        try:
            if _identity(path) == record.get("identity", {}).get(name):
                continue
            if path.stat().st_size != meta["size"] or hash_file(path, algo) != digest:
                return False
        except OSError:  # gone, or unreadable
            return False
    return True


def free_bytes(dst: str | os.PathLike) -> int:
    probe = Path(dst).resolve()
    while not probe.exists():
        probe = probe.parent
    return shutil.disk_usage(probe).free


def check_space(dst: Path, needed: int) -> None:
    free = free_bytes(dst)
    if needed > free:
        raise NotEnoughSpace(f"not enough free disk at {dst}: the conversion needs {needed / 1e9:.2f} GB more, "
                              f"{free / 1e9:.2f} GB are free")


def run(plan: Plan, dst: str | os.PathLike, progress: bool = True, restart: bool = False, overwrite: bool = False,
        n_workers: int | None = None) -> dict:
    """Convert into `dst` with up to `n_workers` units at once (default: `workers.default_workers()`)."""
    dst = Path(dst).resolve()
    if dst == plan.source.dir:
        raise ConversionError("the destination must differ from the source (inputs are never modified)")
    dst.mkdir(parents=True, exist_ok=True)
    with output_lock(dst):
        _check_owner(dst, overwrite)
        journal = _load_journal(dst, plan.plan_id, restart)
        if journal.get("complete"):
            return json.loads((dst / MANIFEST).read_text())
        n = workers.default_workers() if n_workers is None else n_workers
        with ThreadPoolExecutor(max(1, n)) as pool:  # the files left to re-hash, one per core (hashes release the GIL)
            done = list(pool.map(lambda u: _unit_done(dst, journal["units"].get(str(u.index))), plan.units))
        todo = [u for u, finished in zip(plan.units, done) if not finished]
        check_space(dst, sum(f.size for u in todo for f in u.files))
        for stale in dst.glob(".*.partial*"):
            stale.unlink()
        if not (dst / PROGRESS).exists():  # before any output: from now on the folder is v4hal's
            write_json_atomic(dst / PROGRESS, journal)
        from tqdm import tqdm

        bar = tqdm(total=sum(u.source_size for u in todo), unit="B", unit_scale=True, unit_divisor=1024,
                   desc=f"convert -> {plan.opts.target}", disable=not progress, file=sys.stderr)
        def journaled(unit: Unit, record: dict) -> None:
            journal["units"][str(unit.index)] = record
            write_json_atomic(dst / PROGRESS, journal)

        workers.run_units(lambda i, feed: process_unit(plan, plan.units[i], dst, feed), todo,
                          min(n, plan.max_workers or n), journaled, bar.update)
        bar.close()
        manifest = finish(plan, dst, journal)
        (dst / PROGRESS).unlink(missing_ok=True)
        return manifest


def finish(plan: Plan, dst: Path, journal: dict) -> dict:
    """Small outputs, then the manifest (last: its presence means the conversion is complete)."""
    outputs: dict[str, dict] = {}
    sources: dict[str, dict] = {}
    for u in plan.units:
        rec = journal["units"][str(u.index)]
        sources[u.source_file] = {**rec["source"], "size": u.source_size}
        outputs.update(rec["outputs"])
    for extra in plan.source.extra_files():
        data = extra.read_bytes()
        if extra.name == "config.json":
            data = plan.config(json.loads(data))
        outputs[extra.name] = _record(write_atomic(dst / extra.name, data, extra.stat().st_mode))
    outputs.update(plan.write_small(dst))
    manifest = {
        "format": MANIFEST_FORMAT,
        "hash": OUTPUT_HASH,
        "plan": plan.plan_id,
        "options": plan.opts.as_dict(),
        "sources": sources,
        "outputs": outputs,
        "tensors": {j.outputs[0].name: {"source": j.source, "source_scale": j.scale, "decode": j.decode,
                                        "encode": j.encode, "outputs": [o.name for o in j.outputs],
                                        "split": list(j.split) if j.split else None}
                    for j in plan.jobs},
    }
    write_json_atomic(dst / MANIFEST, manifest)
    return manifest


def _record(digest_size: tuple[str, int]) -> dict:
    return {OUTPUT_HASH: digest_size[0], "size": digest_size[1]}


def _indexes(plan: Plan):
    maps: dict[int | None, tuple[dict, int]] = {}
    for u in plan.units:
        for f in u.files:
            weight_map, total = maps.get(f.rank, ({}, 0))
            for s in f.specs:
                weight_map[s.name] = f.name
            maps[f.rank] = (weight_map, total + sum(s.nbytes for s in f.specs))
    names = plan.index_names()
    for (rank, (weight_map, total)), name in zip(sorted(maps.items(), key=lambda kv: kv[0] or 0), names):
        yield name, dict(sorted(weight_map.items())), total


def description(plan: Plan) -> dict:
    """msmodelslim's quant_model_description.json: every tensor named with its quant type."""
    desc = {"model_quant_type": formats.W8A8_TYPE}
    for j in plan.jobs:
        for o in j.outputs:
            desc[o.name] = j.quant_type
    return desc


def _config(cfg: dict, opts: Options) -> bytes:
    if opts.target == "copy":
        return (json.dumps(cfg, indent=2, sort_keys=True) + "\n").encode()
    cfg = dict(cfg)
    cfg.pop("quantization_config", None)
    if opts.target == "fp8":
        cfg["quantization_config"] = {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic",
                                      "weight_block_size": [128, 128], "scale_fmt": opts.scale_fmt}
    elif opts.target == "w8a8":
        cfg["quantize"] = "w8a8_dynamic"
    elif opts.target == "mxfp8":
        cfg["quantization_config"] = {"quant_method": "mxfp8", "fmt": "e4m3", "activation_scheme": "dynamic",
                                      "weight_block_size": [1, formats.MX_BLOCK], "scale_fmt": "ue8m0"}
    if opts.target == "bf16":
        cfg["torch_dtype"] = cfg["dtype"] = "bfloat16"
    return (json.dumps(cfg, indent=2, sort_keys=True) + "\n").encode()
