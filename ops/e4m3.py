"""Exact decoding of e4m3 bytes with integer ops: a format helper, not an op (nothing is
dispatched). cpu_fast's FP8 kernels and the checkpoint converter share it.

Why: PyTorch's CPU `float8_e4m3fn -> float` cast is a scalar loop (about 2 ns per element on the
machine this project measures on), while integer shifts and masks on int32 are vectorised.
"""

import torch

__all__: list[str] = []  # nothing here joins the `v4hal.ops` namespace of contracts

# An e4m3 byte `s eeee mmm`, sign-extended to int32, shifted left by 20 and masked with
# 0x87F00000 (sign bit + the 7 exponent/mantissa bits), is the float32 `s 0000eeee mmm0...`: the
# e4m3 value times 2**-120, exactly, for zeros, subnormals (they land on float32 subnormals) and
# normals alike.
_E4M3_F32_MASK = -2014314496  # 0x87F00000 as int32


def e4m3_as_f32(q: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """float32 view of `q` (e4m3) times 2**-120, computed in `out` (int32, same shape). NaN codes
    come out as +-480 * 2**-120: see `restore_nan_codes`."""
    out.copy_(q.view(torch.int8))
    out.mul_(1 << 20)  # |q| <= 127 so this never overflows int32
    out.bitwise_and_(_E4M3_F32_MASK)
    return out.view(torch.float32)


def has_nan_codes(q: torch.Tensor) -> bool:
    """Whether `q` (e4m3fn) holds a NaN code S.1111.111. The codes are the largest int8 and uint8
    values, so two max reductions (a fraction of a millisecond per 16 MB) answer it."""
    return q.numel() > 0 and (int(q.view(torch.uint8).max()) == 0xFF or int(q.view(torch.int8).max()) == 0x7F)


def restore_nan_codes(q: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """Put NaN where `q` (e4m3fn) holds its NaN code, which `e4m3_as_f32` reads as +-480."""
    if has_nan_codes(q):
        out.masked_fill_((q.view(torch.uint8) & 0x7F) == 0x7F, float("nan"))
    return out
