"""Output files of a conversion: safetensors shards written sequentially under a temporary name,
hashed as they go and renamed when complete (`ShardWriter`), and small files written atomically.
The reading side, and the background threads both use, are in `conversion.io`.
"""

from __future__ import annotations

import ctypes
import json
import os
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy
import torch

from v4hal.conversion.io import ALIGN, CODES, HASHES, OUTPUT_HASH, Background, _advise, _aligned, _libc, nbytes_of

WRITE_BEHIND = 64 * 2**20  # start writeback every this many bytes, so close()'s fsync finds little left
STAGE = 8 * 2**20  # O_DIRECT: bytes gathered before each write

_SYNC_FILE_RANGE = _libc("sync_file_range")
if _SYNC_FILE_RANGE is not None:
    _SYNC_FILE_RANGE.argtypes = [ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint]
_SFR_WRITE, _SFR_WAIT_ALL = 2, 1 | 2 | 4  # SYNC_FILE_RANGE_WRITE; WAIT_BEFORE | WRITE | WAIT_AFTER


def _write_behind(fd: int, start: int, end: int, settled: int) -> None:
    """Start writeback of [start, end) without waiting; wait for the window before it,
    [settled, start), to reach the disk and drop it from the page cache. Output nobody reads
    back then never piles up as dirty or cached pages: with them, each write costs the kernel
    several times more CPU and is eventually throttled to the disk's pace anyway. This is not a
    durability guarantee (no metadata); close() still fsyncs."""
    if _SYNC_FILE_RANGE is None:
        _advise(fd, start, end - start, "POSIX_FADV_DONTNEED")  # starts writeback of dirty pages
        return
    for lo, hi, flags in ((start, end, _SFR_WRITE), (settled, start, _SFR_WAIT_ALL)):
        if hi > lo and _SYNC_FILE_RANGE(fd, lo, hi - lo, flags) != 0:
            err = ctypes.get_errno()
            raise OSError(err, os.strerror(err))
    if start > settled:
        _advise(fd, settled, start - settled, "POSIX_FADV_DONTNEED")


@dataclass(frozen=True)
class OutSpec:
    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        return nbytes_of(self.dtype, self.shape)


def header_bytes(specs: list[OutSpec], metadata: dict[str, str] | None = None) -> bytes:
    """The serialized header for tensors laid out back to back in `specs` order, padded with
    spaces to 8 bytes as safetensors does. Deterministic, so a rerun writes identical bytes."""
    header: dict[str, object] = {}
    if metadata:
        header["__metadata__"] = dict(sorted(metadata.items()))
    offset = 0
    for s in specs:
        header[s.name] = {"dtype": CODES[s.dtype], "shape": list(s.shape), "data_offsets": [offset, offset + s.nbytes]}
        offset += s.nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    return struct.pack("<Q", len(raw)) + raw


def file_size(specs: list[OutSpec], metadata: dict[str, str] | None = None) -> int:
    return len(header_bytes(specs, metadata)) + sum(s.nbytes for s in specs)


def partial_name(path: Path) -> Path:
    return path.with_name(f".{path.name}.partial")


def create_new(path: Path, flags: int = 0, mode: int = 0o666) -> int:
    """A fresh file for writing: whatever sat at `path` (a stale file, a planted symlink) is
    removed first and O_EXCL makes sure nothing is followed. `mode` is narrowed by the umask,
    so passing a source file's mode never widens who may read the copy."""
    path.unlink(missing_ok=True)
    return os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | flags, mode & 0o777)


def _open_direct(path: Path, mode: int) -> int | None:
    """`path` created for O_DIRECT writes, after a probe write (some filesystems accept the flag
    and refuse the writes); None where the OS or filesystem does not do direct I/O."""
    flag = getattr(os, "O_DIRECT", 0)
    if not flag:
        return None
    try:
        fd = create_new(path, flag, mode)
    except OSError:
        return None
    try:
        os.pwrite(fd, _aligned(ALIGN)[1], 0)
        os.ftruncate(fd, 0)
    except OSError:
        os.close(fd)
        return None
    return fd


class ShardWriter:
    """Writes one safetensors file sequentially to a temporary name; `close` checks every
    declared byte arrived, fsyncs (unless told not to: a killed process loses nothing the kernel
    already holds, only a power cut does) and renames it into place. Returns the hex digest
    with `algo` (None with `algo=None`, for timing the disk alone) and size.

    Writing and hashing run on two background threads. Where the filesystem allows, the file is
    written with O_DIRECT: bytes are gathered in an aligned STAGE-byte buffer and go from it to
    the disk, skipping the page cache, whose copy and bookkeeping cost the kernel ~4x more CPU
    than the gathering copy; close() writes the last block padded and truncates the padding
    away. Elsewhere writes go through the page cache, with writeback of each WRITE_BEHIND bytes
    started as soon as they are written (`_write_behind`). Either way the disk writes while the
    conversion computes, and the final fsync, which still comes before the rename, has little
    left to wait for."""

    def __init__(self, path: Path, specs: list[OutSpec], metadata: dict[str, str] | None = None, fsync: bool = True,
                 direct: bool = True, algo: str | None = OUTPUT_HASH, mode: int = 0o666):
        self.path, self.specs, self.fsync = path, specs, fsync
        self.tmp = partial_name(path)
        self.fd = _open_direct(self.tmp, mode) if direct else None
        self._stage = None
        if self.fd is None:
            self.fd = create_new(self.tmp, mode=mode)
        else:
            self._stage = _aligned(STAGE)
        self.hash = HASHES[algo]() if algo else None
        self.expected = file_size(specs, metadata)
        self.written = 0   # bytes handed over (caller's thread)
        self._filled = 0   # writer thread: bytes in the stage buffer (O_DIRECT),
        self._flushed = 0  # bytes in the file,
        self._kicked = 0   # how far writeback was started (page cache),
        self._settled = 0  # and how far it is known complete
        self._placed: dict[int, int] = {}  # address of a `buffer` -> the file offset it was made for
        self._writer = Background("v4hal-write")
        self._hasher = Background("v4hal-hash-out") if algo else None
        self._write(header_bytes(specs, metadata))

    @property
    def direct(self) -> bool:
        return self._stage is not None

    def buffer(self, nbytes: int) -> torch.Tensor:
        """A uint8 tensor to fill with the next `nbytes` to write, then pass (or a view of it of
        another dtype) to the very next `write`. With O_DIRECT it sits where its first byte's file
        offset falls in an aligned block, with that block's start free before it, so the bytes go
        from it to the disk without the gathering copy (for BF16 output that copy cost ~0.15-0.3
        CPU s per GB of input)."""
        if not self.direct:
            return torch.empty(nbytes, dtype=torch.uint8)
        lead = self.written % ALIGN
        block = _aligned(lead + nbytes)[0]
        t = torch.from_numpy(block)[lead:]
        self._placed[t.data_ptr()] = (self.written, block)
        return t

    def _write(self, data, block: numpy.ndarray | None = None) -> None:
        """Queue `data` (bytes or a memoryview the caller no longer modifies); `block`: the
        aligned array of the `buffer` that `data` fills."""
        self.written += len(data)
        if block is None:
            self._writer.submit(self._put, data)
        else:
            self._writer.submit(self._put_placed, block)
        if self._hasher is not None:
            self._hasher.submit(self.hash.update, data)

    def _pwrite(self, view: memoryview) -> None:
        while view:
            k = os.pwrite(self.fd, view, self._flushed)  # may write less than asked
            view, self._flushed = view[k:], self._flushed + k

    def _put(self, data) -> None:
        if not self.direct:
            self._pwrite(memoryview(data).cast("B"))
            if self._flushed - self._kicked >= WRITE_BEHIND:
                _write_behind(self.fd, self._kicked, self._flushed, self._settled)
                self._settled, self._kicked = self._kicked, self._flushed
            return
        src, (stage, view) = numpy.frombuffer(data, dtype=numpy.uint8), self._stage
        pos = 0
        while pos < len(src):
            k = min(STAGE - self._filled, len(src) - pos)
            stage[self._filled:self._filled + k] = src[pos:pos + k]  # numpy copies without the GIL
            self._filled, pos = self._filled + k, pos + k
            if self._filled == STAGE:
                self._pwrite(view)
                self._filled = 0

    def _put_placed(self, block: numpy.ndarray) -> None:
        """Write a `buffer`'s bytes (`block`: its aligned array, the buffer at its end, the
        bytes before it free): the stage's whole blocks first, then the stage's partial last
        block copied into the free bytes and written from there with the buffer, whole blocks
        only; what is left of the last block goes to the stage."""
        stage, view = self._stage
        whole = self._filled - self._filled % ALIGN
        if whole:
            self._pwrite(view[:whole])
        head = self._filled - whole  # == the buffer's offset in `block` (both: the file offset mod ALIGN)
        block[:head] = stage[whole:self._filled]
        body = len(block) - len(block) % ALIGN
        self._pwrite(memoryview(block[:body]))
        self._filled = len(block) - body
        stage[:self._filled] = block[body:]

    def write(self, t: torch.Tensor) -> None:
        """Append `t`'s bytes; `t` must not be modified afterwards (it is written in the background)."""
        t = t.contiguous()
        offset, block = self._placed.pop(t.data_ptr(), (None, None))
        self._placed.clear()  # a buffer not written next is an ordinary tensor from now on
        whole = offset == self.written and block is not None and len(block) - (offset % ALIGN) == t.nbytes >= ALIGN
        self._write(memoryview(t.view(torch.uint8).reshape(-1).numpy()) if t.numel() else b"", block if whole else None)

    def write_bytes(self, data) -> None:
        self._write(data)

    def close(self) -> tuple[str | None, int]:
        try:
            self._writer.close()
            if self._hasher is not None:
                self._hasher.close()
            if self.written != self.expected:
                raise RuntimeError(f"internal: {self.path.name} got {self.written} bytes, planned {self.expected}")
            if self.direct and self._filled:
                self._pwrite(self._stage[1][:-(-self._filled // ALIGN) * ALIGN])
                os.ftruncate(self.fd, self.written)
            if self.fsync:
                os.fsync(self.fd)
        except BaseException:
            self.abort()
            raise
        os.close(self.fd)
        self.fd = None
        os.replace(self.tmp, self.path)
        return None if self.hash is None else self.hash.hexdigest(), self.written

    def abort(self) -> None:
        self._writer.close(cancel=True)
        if self._hasher is not None:
            self._hasher.close(cancel=True)
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None
        self.tmp.unlink(missing_ok=True)  # gone already if close() renamed it


def write_atomic(path: Path, data: bytes, mode: int = 0o666) -> tuple[str, int]:
    tmp = partial_name(path)
    with os.fdopen(create_new(tmp, mode=mode), "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    return HASHES[OUTPUT_HASH](data).hexdigest(), len(data)


def write_json_atomic(path: Path, obj: object) -> tuple[str, int]:
    return write_atomic(path, (json.dumps(obj, indent=2, sort_keys=True) + "\n").encode())
