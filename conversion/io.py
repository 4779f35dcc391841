"""Safetensors shards read by hand, so a conversion streams: headers are parsed and validated
without touching data, tensors are read row-chunk by row-chunk. The writing side (shards written
sequentially under a temporary name, hashed as they go, renamed when complete) is
`conversion.output`.

No pickle anywhere: safetensors is a JSON header plus raw little-endian bytes.

Hashes: outputs are hashed with BLAKE3 (`OUTPUT_HASH`; ~0.3 CPU s per GB here, against sha256's
~0.65, see bench/convert_hash.py); manifests written before it hold sha256, and both verify. A
manifest entry names its algorithm by its key: `{"blake3": hex, "size": n}`. A source is hashed
only when nothing states its hash (`stated_hash`: a Hugging Face cache blob is named by its
sha256, a v4hal output's manifest lists its files).

Throughput: source reads and output writes go around the page cache (O_DIRECT) where the
filesystem allows it, with no copy on either side for the common cases (a source tensor is a view
into its read buffer; a BF16 chunk is decoded into the writer's placed buffer). Hashing the
source and every output costs as much CPU as the conversion math, so hashing and writing run on
background threads (hashlib, blake3, file writes and torch kernels
all release the GIL) while the caller reads and computes the next chunk. Each background stage
is one thread, so bytes are hashed and written in order, and it holds at most a few chunks, so
memory stays bounded.
"""

from __future__ import annotations

import collections
import ctypes
import hashlib
import json
import math
import os
import struct
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import blake3
import numpy
import torch

from v4hal.checkpoint_files import CheckpointError, confined, in_hf_blobs

# safetensors dtype codes <-> torch dtypes.
DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
    "F8_E8M0": torch.float8_e8m0fnu,
}
CODES = {v: k for k, v in DTYPES.items()}
INDEX_NAME = "model.safetensors.index.json"
MAX_HEADER = 100 * 2**20  # the safetensors library's own limit
READ_CHUNK = 16 * 2**20  # below glibc's 32 MiB mmap threshold, so buffers are reused, not page-faulted afresh
READ_AHEAD = 64 * 2**20  # asked of the kernel past each read, so the disk works while we compute
OUTPUT_HASH = "blake3"  # what new manifests and journals record
HASHES = {"blake3": blake3.blake3, "sha256": hashlib.sha256}  # what they may hold (older ones: sha256)


@dataclass(frozen=True)
class TensorInfo:
    name: str
    file: str          # absolute path of the shard holding it
    dtype: torch.dtype
    shape: tuple[int, ...]
    start: int         # absolute byte offset in the file
    nbytes: int

    @property
    def row_bytes(self) -> int:
        """Bytes per index of dim 0 (the whole tensor for a scalar)."""
        return self.nbytes // self.shape[0] if self.shape and self.shape[0] else self.nbytes


def stated_hash(folder: Path, name: str) -> dict[str, str] | None:
    """A source file's hash that something already states, as {algorithm: hex}, or None:
    - a Hugging Face cache snapshot file is a symlink to ../../blobs/<sha256 of its content> for
      LFS files (what huggingface_hub checked when it downloaded it; small files are named by
      their git blob sha1, 40 digits, and are not taken);
    - a v4hal output's manifest (`v4hal-manifest.json` in `folder`) lists each file's hash and
      size; taken when the size still matches.
    `--verify-source` hashes the file anyway and refuses a mismatch."""
    path = (folder / name).resolve()
    blob = path.name
    if in_hf_blobs(folder.resolve(), path) and len(blob) == 64 and all(c in "0123456789abcdef" for c in blob):
        return {"sha256": blob}
    try:
        entry = json.loads((folder / "v4hal-manifest.json").read_text())["outputs"][name]
        algo, digest = digest_of(entry)
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return {algo: digest} if entry.get("size") == path.stat().st_size else None


def digest_of(entry: dict) -> tuple[str, str]:
    """(algorithm, hex) of a manifest or journal entry such as {"blake3": hex, "size": n}."""
    for algo in HASHES:
        if isinstance(entry.get(algo), str):
            return algo, entry[algo]
    raise ValueError(f"no hash of a known algorithm ({', '.join(HASHES)}) in {entry!r}")


def itemsize(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


def nbytes_of(dtype: torch.dtype, shape: tuple[int, ...]) -> int:
    return math.prod(shape) * itemsize(dtype)


def read_header(path: str | os.PathLike) -> tuple[dict[str, TensorInfo], dict[str, str], int]:
    """Parse and validate one shard's header: returns (tensors by name in file order, metadata,
    file size). Every tensor's byte range must match its dtype and shape and lie inside the file."""
    path = os.path.abspath(path)
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise CheckpointError(path, f"truncated: {size} bytes, not even a header length")
        (n,) = struct.unpack("<Q", head)
        if n > MAX_HEADER or 8 + n > size:
            raise CheckpointError(path, f"corrupt or truncated header: declares {n} header bytes in a {size}-byte file")
        raw = f.read(n)
    try:
        header = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CheckpointError(path, f"corrupt header (not JSON: {exc})") from None
    if not isinstance(header, dict):
        raise CheckpointError(path, "corrupt header (not a JSON object)")
    metadata = header.pop("__metadata__", None) or {}
    data_start = 8 + n
    tensors = []
    for name, entry in header.items():
        try:
            dtype = DTYPES[entry["dtype"]]
            shape = tuple(int(s) for s in entry["shape"])
            begin, end = (int(o) for o in entry["data_offsets"])
        except (KeyError, TypeError, ValueError):
            raise CheckpointError(path, f"corrupt header entry {entry!r}", name) from None
        if end - begin != nbytes_of(dtype, shape) or begin < 0:
            raise CheckpointError(path, f"header offsets [{begin}, {end}) do not fit {entry['dtype']} {list(shape)}", name)
        if data_start + end > size:
            raise CheckpointError(path, f"truncated: tensor ends at byte {data_start + end} but the file has {size}", name)
        tensors.append(TensorInfo(name, path, dtype, shape, data_start + begin, end - begin))
    tensors.sort(key=lambda t: (t.start, t.nbytes))
    for before, after in zip(tensors, tensors[1:]):
        if after.start < before.start + before.nbytes:
            raise CheckpointError(path, f"its bytes overlap tensor '{before.name}' (header data_offsets alias the same data)", after.name)
    return {t.name: t for t in tensors}, metadata, size


class Source:
    """A safetensors checkpoint (a directory with or without an index json, or one file), opened
    read-only. `tensors` lists every tensor in (file, offset) order. `only` picks some of a
    directory's shards (one rank of a resharded output); the index json is then not checked."""

    def __init__(self, path: str | os.PathLike, only: list[str] | None = None):
        self.path = Path(path).resolve()
        if self.path.is_dir():
            self.dir = self.path
            files = sorted(only if only is not None else (p.name for p in self.path.glob("*.safetensors")))
        else:
            self.dir, files = self.path.parent, [self.path.name]
        if not files:
            raise CheckpointError(self.path, "no .safetensors files found")
        for name in files:
            confined(self.dir, name, hf_cache=True)
        self.files: dict[str, int] = {}
        self.tensors: dict[str, TensorInfo] = {}
        for name in files:
            infos, _, size = read_header(self.dir / name)
            self.files[name] = size
            for t in infos.values():
                if t.name in self.tensors:
                    raise CheckpointError(self.dir / name, f"duplicate: also in {Path(self.tensors[t.name].file).name}", t.name)
                self.tensors[t.name] = t
        index = self.dir / INDEX_NAME
        if self.path.is_dir() and index.exists() and only is None:
            self._check_index(index)

    def _check_index(self, index: Path) -> None:
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as exc:
            raise CheckpointError(index, f"corrupt index json ({exc})") from None
        for name, file in weight_map.items():
            info = self.tensors.get(name)
            if info is None:
                raise CheckpointError(self.dir / file, "listed in the index but missing from the shard", name)
            if Path(info.file).name != file:
                raise CheckpointError(self.dir / file, f"index says this file, but it is in {Path(info.file).name}", name)
        for name, info in self.tensors.items():
            if name not in weight_map:
                raise CheckpointError(info.file, "present in the shard but missing from the index", name)

    def by_file(self) -> dict[str, list[TensorInfo]]:
        out: dict[str, list[TensorInfo]] = {f: [] for f in self.files}
        for t in self.tensors.values():
            out[Path(t.file).name].append(t)
        return out

    def extra_files(self) -> list[Path]:
        """Small non-weight files (config, tokenizer) that travel with the checkpoint."""
        return small_files(self.dir, lambda p: p.suffix in (".json", ".model", ".txt", ".py", ".jinja")
                           and p.name != INDEX_NAME and not p.name.startswith(("v4hal-", ".v4hal")), hf_cache=True)


def small_files(folder: Path, wanted, hf_cache: bool = False) -> list[Path]:
    """The files in `folder` that `wanted(path)` picks, sorted; a picked symlink leading outside
    the folder is refused (`confined`), non-regular entries are not files and never picked."""
    files = sorted(p for p in folder.iterdir() if wanted(p) and p.is_file())
    for p in files:
        confined(folder, p.name, hf_cache=hf_cache)
    return files


def read_rows(info: TensorInfo, row0: int = 0, row1: int | None = None, fd: int | None = None) -> torch.Tensor:
    """Rows [row0, row1) of a tensor (the whole tensor by default) as a fresh CPU tensor."""
    row1 = (info.shape[0] if info.shape else 1) if row1 is None else row1
    n = (row1 - row0) * info.row_bytes
    buf = bytearray(n)
    own = fd is None
    fd = os.open(info.file, os.O_RDONLY) if own else fd
    try:
        view, offset, got = memoryview(buf), info.start + row0 * info.row_bytes, 0
        while got < n:
            k = os.preadv(fd, [view[got:]], offset + got)
            if k <= 0:
                raise CheckpointError(info.file, f"truncated while reading (got {got} of {n} bytes)", info.name)
            got += k
    finally:
        if own:
            os.close(fd)
    t = torch.frombuffer(buf, dtype=torch.uint8) if n else torch.empty(0, dtype=torch.uint8)
    shape = ((row1 - row0), *info.shape[1:]) if info.shape else ()
    return t.view(info.dtype).reshape(shape)


def hash_file(path: str | os.PathLike, algo: str = OUTPUT_HASH, progress=None) -> str:
    h = HASHES[algo]()
    with open(path, "rb") as f:
        while block := f.read(READ_CHUNK):
            h.update(block)
            if progress:
                progress(len(block))
    return h.hexdigest()


class Background:
    """One worker thread running submitted calls in submission order. At most `depth` calls wait
    behind the running one (submit blocks beyond that), which bounds the buffers they hold; a
    failed call's exception is raised by a later submit or by drain."""

    def __init__(self, name: str, depth: int = 2):
        self._pool = ThreadPoolExecutor(1, thread_name_prefix=name)
        self._pending: collections.deque = collections.deque()
        self._depth = depth

    def submit(self, fn, *args) -> None:
        self._pending.append(self._pool.submit(fn, *args))
        while self._pending and (len(self._pending) > self._depth or self._pending[0].done()):
            self._pending.popleft().result()

    def drain(self) -> None:
        while self._pending:
            self._pending.popleft().result()

    def close(self, cancel: bool = False) -> None:
        """Stop the thread; cancel=True drops queued calls (the running one still completes)."""
        self._pool.shutdown(wait=True, cancel_futures=cancel)
        if not cancel:
            self.drain()
        self._pending.clear()


def _libc(name: str):
    """A libc function by name, or None (not Linux / glibc)."""
    try:
        return getattr(ctypes.CDLL(None, use_errno=True), name)
    except (OSError, AttributeError, TypeError):
        return None


def _advise(fd: int, offset: int, length: int, advice_name: str) -> None:
    """posix_fadvise where the OS has it (a hint: skipping it changes speed, not results)."""
    if hasattr(os, "posix_fadvise"):
        os.posix_fadvise(fd, offset, length, getattr(os, advice_name))


_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # mallopt parameters (glibc malloc.h)
_malloc_tuned = False


def _reuse_freed_chunks() -> None:
    """A conversion allocates chunk buffers of up to ~32 MiB thousands of times, two or three
    alive at once. glibc serves allocations above its (adaptive, at most 32 MiB) mmap threshold
    with fresh mmaps and, once a few are alive, often with fresh heap pages: each one is then
    page-faulted afresh, which costs more than decoding it. Raising the threshold to 64 MiB and
    keeping up to 128 MiB of freed heap lets the buffers be reused. Called once, by the first
    HashingReader (so only conversions run with it); a no-op where mallopt does not exist."""
    global _malloc_tuned
    if _malloc_tuned:
        return
    _malloc_tuned = True
    mallopt = _libc("mallopt")
    if mallopt is None:
        return
    mallopt(_M_MMAP_THRESHOLD, 64 * 2**20)
    mallopt(_M_TRIM_THRESHOLD, 128 * 2**20)


def _buffer(n: int) -> tuple[torch.Tensor, memoryview]:
    """An uninitialised byte buffer (torch.empty: no zero fill, unlike bytearray) and a writable view."""
    t = torch.empty(n, dtype=torch.uint8)
    return t, memoryview(t.numpy())


ALIGN = 4096          # O_DIRECT: offsets, lengths and buffer addresses are multiples of this


def _aligned(n: int) -> tuple[numpy.ndarray, memoryview]:
    raw = torch.empty(n + ALIGN, dtype=torch.uint8)
    a = raw[(-raw.data_ptr()) % ALIGN:][:n].numpy()
    return a, memoryview(a)


class HashingReader:
    """Reads one source file front to back, hashing every byte with `algo` (in a background
    thread, in order; None: not hashed, its hash is stated elsewhere, and bytes no tensor needs
    are skipped), so the source hash in the manifest costs no second pass and little wall time.

    Reads go around the page cache (O_DIRECT, where the filesystem allows it) into aligned
    buffers, and a tensor's bytes are a view into its buffer: through the page cache each GB cost
    the kernel ~0.4-0.6 CPU s of copying and page bookkeeping, directly ~0.05 (measured with
    bench/conversion.py's stage breakdown). Without the kernel's read-ahead, `expect` announces
    the reads to come and a background thread reads the next ones while the caller computes.
    Reads that are not at the current position (a scale that sits earlier in the file) go
    through `read_rows` and do not disturb the hash. Tensors returned by `rows` are read-only:
    the hashing thread may still be reading their bytes."""

    AHEAD = 2  # announced reads in flight, one thread each (two requests queued at the disk keep it
    # busier than one); bounds the buffers held to two chunks

    def __init__(self, path: str, progress=None, algo: str | None = OUTPUT_HASH):
        _reuse_freed_chunks()
        self.path = path
        self.fd = os.open(path, os.O_RDONLY)
        self.size = os.fstat(self.fd).st_size
        self._direct = _open_direct_read(self.fd)
        self.pos = 0
        self.hash = HASHES[algo]() if algo else None
        self.progress = progress
        self._hasher = Background("v4hal-hash-in", depth=3) if algo else None
        self._plan = iter(())
        self._ahead: collections.deque = collections.deque()  # ((offset, n), future), in stream order
        self._pool: ThreadPoolExecutor | None = None

    def expect(self, reads) -> None:
        """Announce the `rows` calls to come as (offset, nbytes) in order. The reader reads the
        next AHEAD of them (and the bytes between, when hashing) in the background; the first
        call that differs from the announcement ends reading ahead (results stay the same)."""
        self._pool = ThreadPoolExecutor(self.AHEAD, thread_name_prefix="v4hal-read")
        self._plan = self._segments(reads)
        self._fill()

    def _segments(self, reads):
        """The stream reads `rows`, `_advance_to` and `finish` will do, in order."""
        pos = self.pos
        for offset, n in reads:
            if offset < pos:
                continue  # out of the stream: read_rows
            if self.hash is not None:
                for k in _pieces(offset - pos):
                    yield pos, k
                    pos += k
            yield offset, n
            pos = offset + n
        if self.hash is not None:
            for k in _pieces(self.size - pos):
                yield pos, k
                pos += k

    def _fill(self) -> None:
        while len(self._ahead) < self.AHEAD and (seg := next(self._plan, None)) is not None:
            self._ahead.append((seg, self._pool.submit(self._read_at, *seg, self._space(*seg))))

    def _stop_ahead(self) -> None:
        self._plan = iter(())
        for _, fut in self._ahead:
            fut.cancel()
        if self._pool is not None:
            self._pool.shutdown(wait=True)
        self._ahead.clear()

    def _space(self, offset: int, n: int) -> tuple[int, torch.Tensor, memoryview]:
        """(first file byte, buffer, its view) to read [offset, offset + n) into: whole aligned
        blocks around the range for O_DIRECT. Allocated by the caller's thread, the main one:
        glibc's other threads get other arenas, where freed chunks were not reused (page faults
        doubled the read-ahead thread's CPU)."""
        if self._direct is None:
            return (offset, *_buffer(n))
        lo = offset - offset % ALIGN
        array, view = _aligned(-(-(offset + n - lo) // ALIGN) * ALIGN)
        return lo, torch.from_numpy(array), view

    def _read_at(self, offset: int, n: int, space=None) -> torch.Tensor:
        """Bytes [offset, offset + n) of the file as a uint8 tensor (one copy: disk -> buffer)."""
        lo, buf, view = space or self._space(offset, n)
        fd = self.fd if self._direct is None else self._direct
        got, need = 0, offset + n - lo
        while got < need:
            k = os.preadv(fd, [view[got:]], lo + got)
            got += max(k, 0)
            if k <= 0 or (self._direct is not None and got < need and got % ALIGN):
                break  # end of file (a direct read that stops short of a block)
        if got < need:
            raise CheckpointError(self.path, f"truncated at byte {lo + got}")
        return buf[offset - lo: offset - lo + n]

    def _advance_to(self, offset: int) -> None:
        if self.hash is None:
            self.pos = max(self.pos, offset)  # nothing needs the bytes between
        for k in _pieces(offset - self.pos):
            self._consume(k)

    def _consume(self, n: int) -> torch.Tensor:
        """The next n bytes of the file, read ahead if announced, queued for hashing."""
        if self._ahead and self._ahead[0][0] == (self.pos, n):
            buf = self._ahead.popleft()[1].result()
            self._fill()
        else:
            if self._ahead:
                self._stop_ahead()
            buf = self._read_at(self.pos, n)
        if self._hasher is not None:
            self._hasher.submit(self.hash.update, memoryview(buf.numpy()))
        self.pos += n
        if self._direct is None:
            _advise(self.fd, self.pos, READ_AHEAD, "POSIX_FADV_WILLNEED")
        if self.progress:
            self.progress(n)
        return buf

    def rows(self, info: TensorInfo, row0: int, row1: int) -> torch.Tensor:
        offset = info.start + row0 * info.row_bytes
        if offset < self.pos:
            return read_rows(info, row0, row1, self.fd)
        self._advance_to(offset)
        t = self._consume((row1 - row0) * info.row_bytes)
        if t.storage_offset() % itemsize(info.dtype):
            t = t.clone()  # a view of another dtype must start at a multiple of its item size
        return t.view(info.dtype).reshape((row1 - row0, *info.shape[1:]) if info.shape else ())

    def companion(self, info: TensorInfo) -> torch.Tensor:
        """A whole small tensor (a scale), possibly from another shard, outside the hashed stream."""
        return read_rows(info)

    def finish(self) -> str | None:
        """The whole file's hex digest (None when not hashed); reads what is left of it."""
        try:
            if self._hasher is None:
                return None
            self._advance_to(self.size)
            self._hasher.close()
            return self.hash.hexdigest()
        finally:
            self._stop_ahead()
            os.close(self.fd)
            if self._direct is not None:
                os.close(self._direct)


def _pieces(n: int):
    """Sizes of the READ_CHUNK-sized reads that cover n bytes."""
    return [min(READ_CHUNK, n - i) for i in range(0, max(n, 0), READ_CHUNK)]


def _open_direct_read(opened: int) -> int | None:
    """The file `opened` already is, opened again for O_DIRECT reads (through /proc/self/fd, so a
    path swapped since, a symlink planted after the checks, is never followed), or None where the
    OS or filesystem refuses them."""
    flag = getattr(os, "O_DIRECT", 0)
    if not flag:
        return None
    try:
        fd = os.open(f"/proc/self/fd/{opened}", os.O_RDONLY | flag)
    except OSError:
        return None
    try:
        os.preadv(fd, [_aligned(ALIGN)[1]], 0)  # some filesystems open with the flag, then refuse reads
    except OSError:
        os.close(fd)
        return None
    return fd
