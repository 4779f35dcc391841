"""Quantized matmuls in MindSpore: an independent implementation of the FP8 / MXFP4 / int8 formats.

MindSpore 2.10 has `float8_e4m3fn` as a dtype, but its CPU kernels cannot cast to or from it, so
the formats are encoded and decoded here from their bits with plain arithmetic on int32/float32
tensors (no torch math and no numpy math: torch tensors only cross the boundary, FP8 as its raw
uint8 bytes):

- e4m3 decode: byte -> sign (b // 128), exponent field e ((b // 8) % 16), mantissa m (b % 8);
  value = (8 + m) * 2**(e - 10) for e > 0, m * 2**-9 for e = 0; S.1111.111 is NaN.
- e4m3 encode (round to nearest, ties to even, like a hardware cast): with E = max(floor(log2 |x|),
  -6) and n = round_half_even(|x| / 2**(E - 3)) in [0, 16], the magnitude byte is 8 * E + 48 + n,
  a formula that also covers subnormals (E = -6) and the carry into the next binade (n = 16).
- e2m1 (MXFP4) is the same construction with E = max(floor(log2 |x|), 0), step 2**(E - 1),
  code 2 * E + n; codes are packed low nibble first.
floor(log2) and ceil(log2) are taken in float32 and then corrected by comparing with the power of
two they name, so values next to a power of two cannot land in the wrong binade.

Arithmetic runs in float32 (MindSpore's CPU kernels); float64 outputs are float32 results cast up.
"""

import torch

from v4hal.backends.mindspore import mops, ms, to_ms, to_torch
from v4hal.ops.quant import ACT_BLOCK, FP4_BLOCK, FP4_MAX, FP8_MAX, INT8_MAX, WEIGHT_BLOCK

AMAX_FLOOR = 1e-4


def _f32(x):
    return x.astype(ms().float32)


def _idiv(x, n: int):
    return mops().floor_divide(x, ms().Tensor(n, x.dtype))


def pow2(e):
    """2**e for an integer-valued float32 / float64 tensor, exactly, in e's dtype."""
    return mops().pow(ms().Tensor(2.0, e.dtype), e)


def _floor_log2(a):
    """floor(log2(a)) for a > 0, exact."""
    o = mops()
    e = o.floor(o.log2(a))
    e = o.where(pow2(e) > a, e - 1, e)
    return o.where(pow2(e + 1) <= a, e + 1, e)


def ceil_log2(a):
    """ceil(log2(a)) for a > 0, exact (float32 or float64)."""
    o = mops()
    e = o.ceil(o.log2(a))
    e = o.where(pow2(e - 1) >= a, e - 1, e)
    return o.where(pow2(e) < a, e + 1, e)


def bytes_in(q: torch.Tensor):
    """A torch e4m3 / e8m0 / uint8 tensor as MindSpore int32 byte values."""
    return to_ms(q.view(torch.uint8) if q.dtype != torch.uint8 else q).astype(ms().int32)


def decode_e4m3(b):
    o = mops()
    sign = 1 - 2 * _f32(_idiv(b, 128))
    e = _f32(_idiv(b, 8) % 16)
    m = _f32(b % 8)
    magnitude = o.where(e > 0, (8 + m) * pow2(e - 10), m * 2.0 ** -9)
    nan = ms().Tensor(float("nan"), ms().float32)
    return o.where(b % 128 == 127, nan, sign * magnitude)  # S.1111.111 is e4m3fn's NaN


def _e4m3_binade(a):
    """Exponent E of the e4m3 binade holding a >= 0 (subnormals share E = -6), in a's dtype."""
    o = mops()
    return o.maximum(_floor_log2(o.maximum(a, ms().Tensor(2.0 ** -10, a.dtype))), ms().Tensor(-6.0, a.dtype))


def round_e4m3(x):
    """float32 / float64 with |x| <= 448 -> the nearest e4m3 value (ties to even), in x's dtype."""
    o = mops()
    step = pow2(_e4m3_binade(o.abs(x)) - 3)
    return o.round(x / step) * step  # MindSpore's Round is half-to-even, symmetric about zero


def encode_e4m3(x):
    """float32 with |x| <= 448 -> int32 byte values of the nearest e4m3 (ties to even)."""
    o = mops()
    a = o.abs(x)
    e = _e4m3_binade(a)
    n = o.round(a / pow2(e - 3))  # MindSpore's Round is half-to-even
    byte = (8 * e + 48 + n).astype(ms().int32)
    return o.where(x < 0, byte + 128, byte)


def _blocks(x, bm, bk):
    """Zero-pad a 2-d tensor to whole blocks and view it as [R/bm, bm, C/bk, bk]."""
    rows, cols = x.shape
    pad_r, pad_c = -rows % bm, -cols % bk
    if pad_r or pad_c:
        x = mops().pad(x, (0, pad_c, 0, pad_r))
    return x.reshape((rows + pad_r) // bm, bm, (cols + pad_c) // bk, bk)


def expand_blocks(scale, bm, bk, rows, cols):
    """Repeat a [R/bm, C/bk] block scale over its elements, cropped to [rows, cols]."""
    o = mops()
    s = o.repeat_interleave(scale, bk, 1)[:, :cols]
    return o.repeat_interleave(s, bm, 0)[:rows] if bm > 1 else s


def _two_d(t: torch.Tensor) -> torch.Tensor:
    return t.reshape(-1, t.shape[-1])


def quantize_fp8(x, block, scale_fmt):
    bm, bk = block
    xs = _f32(to_ms(_two_d(x).float()))
    rows, cols = xs.shape
    amax = mops().abs(_blocks(xs, bm, bk)).amax(axis=(1, 3))
    scale = mops().maximum(amax, ms().Tensor(AMAX_FLOOR, ms().float32)) / FP8_MAX
    if scale_fmt == "ue8m0":
        scale = pow2(ceil_log2(scale))
    scaled = mops().clamp(xs / expand_blocks(scale, bm, bk, rows, cols), -FP8_MAX, FP8_MAX)
    q = to_torch(encode_e4m3(scaled).astype(ms().uint8)).view(torch.float8_e4m3fn).reshape(x.shape)
    s = to_torch(scale, torch.float32)
    return q, s.reshape(*x.shape[:-1], -1) if bm == 1 else s


def _dequant(q, scale, block):
    b = bytes_in(_two_d(q))
    rows, cols = b.shape
    s = _f32(to_ms(_two_d(scale).float()))
    return decode_e4m3(b) * expand_blocks(s, block[0], block[1], rows, cols)


def dequantize_fp8(q, scale, block, out_dtype):
    return to_torch(_dequant(q, scale, block), out_dtype).reshape(q.shape)


def fp8_matmul(a, a_scale, b, b_scale, out_dtype):
    # Per-K-block scaling of the raw products equals scaling the operands: one float32 GEMM.
    y = mops().matmul(_dequant(a, a_scale, ACT_BLOCK), _dequant(b, b_scale, WEIGHT_BLOCK).T)
    return to_torch(y, out_dtype).reshape(*a.shape[:-1], b.shape[0])


def decode_e2m1(codes):
    o = mops()
    magnitude_code = codes % 8
    e = _f32(_idiv(magnitude_code, 2))
    m = _f32(magnitude_code % 2)
    magnitude = o.where(e > 0, (2 + m) * pow2(e - 2), m * 0.5)
    return o.where(codes >= 8, -magnitude, magnitude)


def _fp4_scales(scale: torch.Tensor):
    if scale.dtype in (torch.uint8, torch.float8_e8m0fnu):
        return pow2(_f32(bytes_in(scale)) - 127)
    return _f32(to_ms(scale.float()))


def _dequant_fp4(packed, scale):
    o = mops()
    p = to_ms(packed).astype(ms().int32)
    codes = o.stack((p % 16, _idiv(p, 16)), axis=-1).reshape(p.shape[0], -1)
    values = decode_e2m1(codes)
    return values * o.repeat_interleave(_fp4_scales(scale), FP4_BLOCK, 1)[:, : values.shape[1]]


def dequantize_fp4(packed, scale, out_dtype):
    return to_torch(_dequant_fp4(packed, scale), out_dtype)


def quantize_fp4(w):
    o = mops()
    ws = _f32(to_ms(w.float()))
    n, k = ws.shape
    amax = o.abs(ws.reshape(n, k // FP4_BLOCK, FP4_BLOCK)).amax(axis=-1)
    scale = pow2(ceil_log2(o.maximum(amax, ms().Tensor(AMAX_FLOOR, ms().float32)) / FP4_MAX))
    scaled = ws / o.repeat_interleave(scale, FP4_BLOCK, 1)
    a = o.minimum(o.abs(scaled), ms().Tensor(FP4_MAX, ms().float32))
    e = o.maximum(_floor_log2(o.maximum(a, ms().Tensor(0.125, ms().float32))), ms().Tensor(0.0))
    code = (2 * e + o.round(a / pow2(e - 1))).astype(ms().int32)
    code = o.where((scaled < 0) & (code > 0), code + 8, code)  # no negative zero
    pairs = code.reshape(n, k // 2, 2)
    packed = pairs[:, :, 0] + 16 * pairs[:, :, 1]
    return to_torch(packed.astype(ms().uint8)), to_torch(scale, torch.float32)


def fp4_matmul(a, b, b_scale, a_scale, out_dtype):
    act = _dequant(a, a_scale, ACT_BLOCK) if a_scale is not None else _f32(to_ms(_two_d(a).float()))
    y = mops().matmul(act, _dequant_fp4(b, b_scale).T)
    return to_torch(y, out_dtype).reshape(*a.shape[:-1], b.shape[0])


def quantize_int8(x):
    o = mops()
    xs = _f32(to_ms(_two_d(x).float()))
    scale = o.maximum(o.abs(xs).amax(axis=-1), ms().Tensor(1e-8, ms().float32)) / INT8_MAX
    q = o.clamp(o.round(xs / scale.reshape(-1, 1)), -INT8_MAX, INT8_MAX).astype(ms().int8)
    return to_torch(q).reshape(x.shape), to_torch(scale, torch.float32).reshape(x.shape[:-1])


def int8_matmul(a, a_scale, b, b_scale, out_dtype):
    o = mops()
    # int8 x int8 products summed in float64 are exact (|sum| < 2**53), as int32 accumulation is.
    acc = o.matmul(to_ms(_two_d(a)).astype(ms().float64), to_ms(b).astype(ms().float64).T)
    # The epilogue runs in float32 like the reference's, in float64 when a scale is float64.
    wide = torch.float64 in (a_scale.dtype, b_scale.dtype)
    cd = ms().float64 if wide else ms().float32
    y = acc.astype(cd) * to_ms(a_scale.reshape(-1, 1)).astype(cd) * to_ms(b_scale).astype(cd)
    return to_torch(y, out_dtype).reshape(*a.shape[:-1], b.shape[0])

