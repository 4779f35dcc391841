"""Reference quantized matmuls: loops over K blocks, written to read like the format spec.

Runs in float32, or in float64 when handed float64 scales/activations (the parity harness does)."""

import math

import torch

from v4hal.ops.quant import ACT_BLOCK, E2M1_VALUES, FP4_BLOCK, FP8_MAX, INT8_MAX, WEIGHT_BLOCK

AMAX_FLOOR = 1e-4
E2M1_MIDPOINTS = tuple((a + b) / 2 for a, b in zip(E2M1_VALUES, E2M1_VALUES[1:]))


def _compute_dtype(*tensors):
    return torch.float64 if any(t is not None and t.dtype == torch.float64 for t in tensors) else torch.float32


def _expand_blocks(scale, shape, block):
    """Repeat each block scale over the elements it covers, cropped to `shape`."""
    bm, bk = block
    if bm == 1:
        return scale.repeat_interleave(bk, dim=-1)[..., : shape[-1]]
    full = scale.repeat_interleave(bm, dim=0).repeat_interleave(bk, dim=1)
    return full[: shape[0], : shape[1]]


def _block_amax(x, block):
    bm, bk = block
    k = x.shape[-1]
    padded = torch.nn.functional.pad(x.abs(), (0, -k % bk))
    if bm == 1:
        return padded.unflatten(-1, (-1, bk)).amax(dim=-1)
    n = x.shape[0]
    padded = torch.nn.functional.pad(padded, (0, 0, 0, -n % bm))
    return padded.unflatten(0, (-1, bm)).unflatten(-1, (-1, bk)).amax(dim=(1, 3))


def power_of_two_ceil(s):
    """2**ceil(log2(s)), exactly: frexp gives s = m * 2**e with m in [0.5, 1), and s is a power
    of two only when m == 0.5. (ceil(log2(s)) in float32 rounds scales just above a power of two
    down, which would push the block's amax past the format's range.)"""
    mantissa, exponent = torch.frexp(s)
    return torch.ldexp(torch.ones_like(s), exponent - (mantissa == 0.5).to(exponent.dtype))


def quantize_fp8(x, block, scale_fmt):
    xf = x.to(_compute_dtype(x))
    scale = _block_amax(xf, block).clamp_min(AMAX_FLOOR) / FP8_MAX
    if scale_fmt == "ue8m0":
        scale = power_of_two_ceil(scale)
    q = (xf / _expand_blocks(scale, x.shape, block)).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn)
    return q, scale.float()


def dequantize_fp8(q, scale, block, out_dtype):
    cd = _compute_dtype(scale)
    return (q.to(cd) * _expand_blocks(scale.to(cd), q.shape, block)).to(out_dtype)


def fp8_matmul(a, a_scale, b, b_scale, out_dtype):
    cd = _compute_dtype(a_scale, b_scale)
    k = a.shape[-1]
    bk = ACT_BLOCK[1]
    b_row_scale = b_scale.to(cd).repeat_interleave(WEIGHT_BLOCK[0], dim=0)[: b.shape[0]]  # [N, Kb]
    acc = torch.zeros(*a.shape[:-1], b.shape[0], dtype=cd, device=a.device)
    for kb in range(math.ceil(k / bk)):
        cols = slice(kb * bk, min(k, (kb + 1) * bk))
        partial = a[..., cols].to(cd) @ b[:, cols].to(cd).T
        acc += partial * a_scale[..., kb : kb + 1].to(cd) * b_row_scale[:, kb]
    return acc.to(out_dtype)


def e2m1_codes_to_values(codes, dtype):
    table = torch.tensor(E2M1_VALUES, dtype=dtype, device=codes.device)
    magnitude = table[(codes & 0x7).long()]
    return torch.where((codes & 0x8) != 0, -magnitude, magnitude)


def fp4_scale_values(scale, dtype):
    """ue8m0 scales as values: fp32 powers of two pass through; e8m0/uint8 hold the exponent + 127."""
    if scale.dtype == torch.float8_e8m0fnu:
        scale = scale.view(torch.uint8)
    if scale.dtype == torch.uint8:
        return torch.exp2(scale.to(dtype) - 127)
    return scale.to(dtype)


def unpack_fp4(packed):
    """uint8 [N, K/2] -> e2m1 codes uint8 [N, K]: low nibble first."""
    return torch.stack((packed & 0x0F, packed >> 4), dim=-1).flatten(-2)


def dequantize_fp4(packed, scale, out_dtype):
    cd = torch.float64 if out_dtype == torch.float64 else torch.float32
    values = e2m1_codes_to_values(unpack_fp4(packed), cd)
    s = fp4_scale_values(scale, cd).repeat_interleave(FP4_BLOCK, dim=-1)[:, : values.shape[1]]
    return (values * s).to(out_dtype)


def quantize_fp4(w):
    wf = w.to(_compute_dtype(w))
    scale = power_of_two_ceil(_block_amax(wf, (1, FP4_BLOCK)).clamp_min(AMAX_FLOOR) / 6.0)
    scaled = wf / scale.repeat_interleave(FP4_BLOCK, dim=-1)
    # Nearest code = how many midpoints between neighbouring values lie below |x|; a tie (|x| on a
    # midpoint) goes to the even code (codes 0,2,4,6 have an even mantissa bit): up at the
    # midpoint just above an odd code, down at the others. (Seven compares; a [.., 8] table of
    # distances made quantizing a V4 expert take seconds.)
    magnitude = scaled.abs()
    code = torch.zeros(magnitude.shape, dtype=torch.uint8, device=w.device)
    for i, mid in enumerate(E2M1_MIDPOINTS):
        code += (magnitude >= mid) if i % 2 else (magnitude > mid)
    code = code | ((scaled < 0) & (code > 0)).to(torch.uint8) << 3  # no -0: a zero code is +0
    packed = code[..., 0::2] | (code[..., 1::2] << 4)
    return packed, scale.float()


def fp4_matmul(a, b, b_scale, a_scale, out_dtype):
    cd = _compute_dtype(a_scale, a if a.is_floating_point() and a_scale is None else None)
    if a_scale is not None:
        a_values = a.to(cd) * a_scale.to(cd).repeat_interleave(ACT_BLOCK[1], dim=-1)[..., : a.shape[-1]]
    else:
        a_values = a.to(cd)
    return (a_values @ dequantize_fp4(b, b_scale, cd).T).to(out_dtype)


def quantize_int8(x):
    xf = x.to(_compute_dtype(x))
    scale = xf.abs().amax(dim=-1).clamp_min(1e-8) / INT8_MAX
    q = torch.round(xf / scale.unsqueeze(-1)).clamp(-INT8_MAX, INT8_MAX).to(torch.int8)
    return q, scale.float()


def int8_matmul(a, a_scale, b, b_scale, out_dtype):
    cd = _compute_dtype(a_scale, b_scale)
    acc = a.to(torch.int64) @ b.to(torch.int64).T  # exact for any K (int32 overflows past INT32_EXACT_K)
    return (acc.to(cd) * a_scale.to(cd).unsqueeze(-1) * b_scale.to(cd)).to(out_dtype)
