"""Counting host reads: every `Tensor.item`, `.tolist`, `bool(t)`, `int(t)`, `float(t)` and
`t.__index__` while a block runs (on a GPU or NPU each is a synchronisation with the device).

Each read is put down to the innermost v4hal frame that made it: a contract's own code in `ops/`
("checks": validation), or anything else ("other": backends, composites, the model). Used by
tests/test_value_reads.py and bench/validation_reads.py.

    with HostReads() as reads:
        ops.linear(x, w, s)
    reads.checks, reads.total
"""

from __future__ import annotations

import os
import sys

import torch

READERS = ("item", "tolist", "__bool__", "__int__", "__float__", "__index__")
# Functions in ops/ that are composites (they run backends' work, not validation).
COMPOSITE_PARTS = ("__call__", "send", "receive", "_expert_ffn", "shared_expert")
# Modules in ops/ that hold kernel helpers backends and the converter share, not contracts.
KERNEL_HELPERS = ("e4m3.py",)


class HostReads:
    def __init__(self):
        import v4hal.ops

        self.ops_dir = os.path.dirname(v4hal.ops.__file__) + os.sep
        self.tree = os.path.dirname(os.path.dirname(v4hal.ops.__file__)) + os.sep
        self.checks = self.total = 0
        self.where: list[str] = []
        self._saved = {}

    def _is_check(self, frame) -> bool:
        while frame is not None:
            path = frame.f_code.co_filename
            if path.startswith(self.tree) and "site-packages" not in path:
                name = frame.f_code.co_name
                return (path.startswith(self.ops_dir) and os.path.basename(path) not in KERNEL_HELPERS
                        and not name.startswith("composed_") and name not in COMPOSITE_PARTS)
            frame = frame.f_back
        return False

    def _counting(self, name, original):
        def read(t, *args, **kwargs):
            self.total += 1
            frame = sys._getframe(1)
            if self._is_check(frame):
                self.checks += 1
                self.where.append(f"{name} at {frame.f_code.co_filename}:{frame.f_lineno}")
            return original(t, *args, **kwargs)
        return read

    def __enter__(self) -> "HostReads":
        for name in READERS:
            self._saved[name] = getattr(torch.Tensor, name)
            setattr(torch.Tensor, name, self._counting(name, self._saved[name]))
        return self

    def __exit__(self, *exc) -> None:
        for name, original in self._saved.items():
            setattr(torch.Tensor, name, original)
