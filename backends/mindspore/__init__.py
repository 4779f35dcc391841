"""MindSpore: an independent implementation of every contract in Huawei's own framework.

On this CPU it is a second opinion for parity; where MindSpore has an Ascend or GPU device it runs
there. Torch tensors cross the boundary through numpy (bfloat16 through float32, exactly).
"""

import contextlib
import importlib
import importlib.util
import os
import sys

import numpy as np
import torch

PARENT = "cpu"  # the composite ops (written from other ops) are the reference's

_ms = None


def probe() -> tuple[bool, str]:
    if importlib.util.find_spec("mindspore") is None:
        return False, "mindspore is not installed (pip install 'v4hal[mindspore]')"
    ms()
    return True, ""


def ms():
    """The mindspore module, imported on first use only.

    MindSpore 2.10's NumPy-1.x extension leaves one error pending when it meets NumPy 2 ("numpy.core
    .multiarray failed to import"): the first PyNative op after import raises SystemError and every
    later one works. One throwaway op here absorbs it, so no backend module has to."""
    global _ms
    if _ms is None:
        with _quiet_stderr():  # the same mismatch prints a 40-line NumPy traceback that is not ours
            module = importlib.import_module("mindspore")
            try:
                module.ops.reshape(module.Tensor([0.0]), (1,))
            except SystemError:
                pass
        _ms = module
    return _ms


@contextlib.contextmanager
def _quiet_stderr():
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with open(os.devnull, "w") as devnull:
            os.dup2(devnull.fileno(), 2)
            yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def mops():
    """`mindspore.ops` (MindSpore imported on first use)."""
    return ms().ops


def keep_nan(out, x):
    """`out` with x's NaNs put back. MindSpore's relu, clamp, maximum and sign turn NaN into a
    number where torch keeps it; every op that uses them passes its input's NaNs on like torch."""
    return mops().where(mops().isnan(x), x, out)


def device() -> torch.device:
    return torch.device("cpu")


def versions() -> dict[str, str]:
    return {"mindspore": ms().__version__, "device_target": str(ms().get_context("device_target"))}


_TO_MS = {torch.float32: "float32", torch.float64: "float64", torch.float16: "float16",
          torch.bfloat16: "bfloat16", torch.int8: "int8", torch.uint8: "uint8",
          torch.int32: "int32", torch.int64: "int64", torch.bool: "bool_"}


def to_ms(t: torch.Tensor):
    """torch -> mindspore Tensor, same dtype (bfloat16 and fp8 go through float32)."""
    mst = ms()
    t = t.detach().cpu()
    if t.dtype in (torch.bfloat16, torch.float8_e4m3fn, torch.float8_e5m2):
        arr = t.float().numpy()
        target = getattr(mst, _TO_MS.get(t.dtype, "float32"))
        return mst.Tensor(arr).astype(target)
    return mst.Tensor(t.numpy())


def to_torch(x, dtype: torch.dtype | None = None) -> torch.Tensor:
    """mindspore Tensor -> torch tensor, cast to `dtype` if given (bfloat16 goes through float32)."""
    mst = ms()
    if x.dtype == mst.bfloat16:
        x = x.astype(mst.float32)
    out = torch.from_numpy(np.ascontiguousarray(x.asnumpy()))
    return out if dtype is None else out.to(dtype)
