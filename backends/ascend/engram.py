"""Engram on Ascend: torch_npu has no Engram kernel (no `npu_*` op in the pinned wheel hashes
n-grams or gathers multi-head tables), so the device-agnostic torch path of `cpu_fast` runs on the
NPU; with the table in host memory, rows are gathered on the host and copied over non-blocking."""

from v4hal.backends.cpu_fast.engram import engram_gate, engram_hash, engram_lookup

__all__ = ["engram_hash", "engram_lookup", "engram_gate"]
