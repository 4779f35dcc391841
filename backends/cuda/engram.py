"""Engram on NVIDIA GPUs: the device-agnostic torch path of `cpu_fast`. A table in host memory is
gathered on the host and the rows copied over from pinned memory without blocking (what
`EngramPrefetcher` overlaps with earlier layers); a table in GPU memory is gathered in place."""

from v4hal.backends.cpu_fast.engram import engram_gate, engram_hash, engram_lookup

__all__ = ["engram_hash", "engram_lookup", "engram_gate"]
