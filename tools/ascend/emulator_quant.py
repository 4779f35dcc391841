"""Emulated quantization ops: `npu_dynamic_quant`, `npu_quant_matmul`, `npu_dynamic_mx_quant`.

FP8 exists on the Ascend 950 (A5) only: an FP8 tensor reaching an op on A2/A3 is a DeviceError.
"""

from __future__ import annotations

import torch

from v4hal.tools.ascend.emulator import FP8, HALF, FLOATS, dims_in, dtype_in, f32, op, require, shape_is, unsupported
from v4hal.tools.ascend.emulator_moe import out_dtype

INT8_MAX = 127
E4M3_MAX = 448.0
E4M3_EMAX = 8  # largest power of two in e4m3 (the OCP MX scale rule subtracts it)
E8M0_BIAS = 127
DST_E4M3FN = 292
MX_CHIPS = ("A5",)
FP8_CHIPS = ("A5",)
QMM_BLOCK = (1, 128, 128)  # group_sizes of the G-B (1x128 activation, 128x128 weight) FP8 mode


def _no_fp8(name: str, chip: str, *tensors) -> None:
    for t in tensors:
        if t is not None and t.dtype in FP8:
            require(chip in FP8_CHIPS, name, f"{t.dtype} on {chip}: this chip has no FP8 units (Ascend 950 only)")


@op("npu_dynamic_quant")
def npu_dynamic_quant(chip, x, *, smooth_scales=None, group_index=None, dst_type=None, quant_mode="pertoken",
                      dst_type_max=0.0):
    """Per-token symmetric int8: scale = rowMax(|x|) / 127 (float32, x's shape without the last
    dim), y = round(x / scale) (half to even). An all-zero row: scale 0 and y 0."""
    name = "npu_dynamic_quant"
    _no_fp8(name, chip, x)
    dtype_in(name, "x", x, HALF)
    require(x.dim() > 1, name, f"x must have more than 1 dim, got {x.dim()}")
    for what, bad in (("smooth_scales", smooth_scales is not None), ("group_index", group_index is not None),
                      (f"dst_type={dst_type}", dst_type not in (None, torch.int8, 1)),
                      (f"quant_mode={quant_mode!r}", quant_mode != "pertoken"), ("dst_type_max", dst_type_max != 0.0)):
        if bad:
            unsupported(name, what)
    v = f32(x)
    scale = v.abs().amax(-1) / INT8_MAX
    safe = torch.where(scale > 0, scale, torch.ones_like(scale)).unsqueeze(-1)
    y = torch.round(v / safe).clamp(-INT8_MAX, INT8_MAX).to(torch.int8)
    return y, scale


def _fp8_block_matmul(name, x1, x2, scale, pertoken_scale, group_sizes):
    m, k = x1.shape
    n = x2.shape[1]
    require(list(group_sizes or []) == list(QMM_BLOCK), name,
            f"FP8 x FP8 with block scales needs group_sizes={list(QMM_BLOCK)}, got {group_sizes}")
    kb, nb = -(-k // QMM_BLOCK[2]), -(-n // QMM_BLOCK[1])
    dtype_in(name, "scale", scale, (torch.float32,))
    shape_is(name, "scale", scale, (kb, nb))
    require(pertoken_scale is not None, name, "FP8 G-B mode needs pertoken_scale [M, ceil(K/128)]")
    dtype_in(name, "pertoken_scale", pertoken_scale, (torch.float32,))
    shape_is(name, "pertoken_scale", pertoken_scale, (m, kb))
    a, b = f32(x1), f32(x2)
    out = torch.zeros(m, n)
    w_scale = scale.repeat_interleave(QMM_BLOCK[1], 1)[:, :n]  # [kb, N]
    for i in range(kb):
        lo, hi = i * QMM_BLOCK[2], min(k, (i + 1) * QMM_BLOCK[2])
        out += (a[:, lo:hi] @ b[lo:hi]) * pertoken_scale[:, i:i + 1] * w_scale[i]
    return out


@op("npu_quant_matmul")
def npu_quant_matmul(chip, x1, x2, scale, *, offset=None, pertoken_scale=None, bias=None, output_dtype=None,
                     x1_dtype=None, x2_dtype=None, pertoken_scale_dtype=None, scale_dtype=None, group_sizes=None,
                     y_scale=None):
    """int8 x int8 [K, N] (A2/A3 table row: scale float32/bfloat16 [N] or [1], pertoken_scale
    float32 [M], output bfloat16/float16): (x1 @ x2, exact int32) * scale * pertoken_scale.
    Without output_dtype the result would be int8 (requantized): not emulated. FP8 e4m3 x e4m3
    (A5): per 128-block of K, (x1_blk @ x2_blk) * pertoken_scale[m, kb] * scale[kb, n // 128]."""
    name = "npu_quant_matmul"
    _no_fp8(name, chip, x1, x2)
    for arg, v in (("offset", offset), ("bias", bias), ("y_scale", y_scale), ("x1_dtype", x1_dtype),
                   ("x2_dtype", x2_dtype), ("scale_dtype", scale_dtype), ("pertoken_scale_dtype", pertoken_scale_dtype)):
        if v is not None:
            unsupported(name, arg)
    dims_in(name, "x1", x1, (2,))
    dims_in(name, "x2", x2, (2,))
    m, k = x1.shape
    require(x2.shape[0] == k, name, f"x2 must be [K={k}, N], got {tuple(x2.shape)}")
    require(k <= 65535 and x2.shape[1] <= 65535, name, "K and N must be <= 65535")
    dt = out_dtype(name, output_dtype, torch.int8)
    if x1.dtype in FP8:
        require(x1.dtype == x2.dtype == torch.float8_e4m3fn, name, "FP8: x1 and x2 must both be float8_e4m3fn")
        require(dt in HALF, name, f"FP8 output_dtype must be bfloat16 or float16, got {dt}")
        return _fp8_block_matmul(name, x1, x2, scale, pertoken_scale, group_sizes).to(dt)
    dtype_in(name, "x1", x1, (torch.int8,))
    dtype_in(name, "x2", x2, (torch.int8,))
    require(group_sizes is None or 0 in list(group_sizes), name, f"int8 per-channel/per-token takes no group_sizes, got {group_sizes}")
    dtype_in(name, "scale", scale, (torch.float32, torch.bfloat16))
    require(scale.dim() == 1 and scale.shape[0] in (1, x2.shape[1]), name, f"scale must be [1] or [N={x2.shape[1]}], got {tuple(scale.shape)}")
    if dt in (torch.int8, torch.int32):
        unsupported(name, f"output_dtype={dt} (requantized / raw int32 output)")
    require(dt in HALF, name, f"output_dtype must be int8, float16, bfloat16 or int32, got {dt}")
    acc = x1.double() @ x2.double()  # int32 accumulation, exact in float64 for these K
    out = acc * scale.double()
    if pertoken_scale is not None:
        dtype_in(name, "pertoken_scale", pertoken_scale, (torch.float32,))
        shape_is(name, "pertoken_scale", pertoken_scale, (m,))
        out = out * pertoken_scale.double().unsqueeze(-1)
    return out.to(dt)


@op("npu_dynamic_mx_quant", chips=MX_CHIPS)
def npu_dynamic_mx_quant(chip, x, *, axis=-1, round_mode="rint", dst_type=296, block_size=32, scale_alg=0,
                         dst_type_max=0.0, max_low_bound=0.0):
    """MX quantization to float8_e4m3fn along the last axis, per block of block_size values.
    scale_alg 0 (OCP MX): scale = 2^(floor(log2 amax) - 8); 1 (cuBLAS, FP8 only): scale =
    amax / 448 rounded up to a power of two, amax = max(amax, max_low_bound). y = rint(x / scale)
    in e4m3; mxscale = the e8m0 exponents (uint8), shape [..., ceil(ceil(K/bs)/2), 2]."""
    name = "npu_dynamic_mx_quant"
    dtype_in(name, "input", x, FLOATS)
    require(1 <= x.dim() <= 7, name, f"input must have 1-7 dims, got {x.dim()}")
    require(dst_type in (291, 292, 296, 297), name, f"dst_type must be 291, 292, 296 or 297, got {dst_type}")
    require(block_size > 0 and block_size % 32 == 0 and block_size <= 1024, name,
            f"block_size must be a multiple of 32 in [32, 1024], got {block_size}")
    require(x.dtype != torch.float32 or block_size == 32, name, "a float32 input needs block_size=32")
    require(scale_alg in (0, 1), name, f"scale_alg for FP8 must be 0 or 1, got {scale_alg}")
    require(max_low_bound >= 0 and (scale_alg == 1 or max_low_bound == 0.0), name,
            f"max_low_bound must be >= 0 and only set with scale_alg=1, got {max_low_bound}")
    require(round_mode == "rint", name, f"FP8 round_mode must be 'rint', got {round_mode!r}")
    if dst_type != DST_E4M3FN or axis not in (-1, x.dim() - 1):
        unsupported(name, f"dst_type={dst_type} / axis={axis} (only float8_e4m3fn on the last axis)")
    k = x.shape[-1]
    nb = -(-k // block_size)
    padded = torch.nn.functional.pad(f32(x), (0, nb * block_size - k)).unflatten(-1, (nb, block_size))
    amax = padded.abs().amax(-1)
    if scale_alg == 1:
        exponent = torch.ceil(torch.log2(amax.clamp_min(max_low_bound) / E4M3_MAX))
    else:
        exponent = torch.floor(torch.log2(amax)) - E4M3_EMAX
    exponent = torch.nan_to_num(exponent, nan=-E8M0_BIAS, neginf=-E8M0_BIAS).clamp(-E8M0_BIAS, E8M0_BIAS)
    y = (padded / torch.exp2(exponent).unsqueeze(-1)).clamp(-E4M3_MAX, E4M3_MAX).flatten(-2)[..., :k]
    codes = torch.zeros(*x.shape[:-1], -(-nb // 2) * 2, dtype=torch.uint8)
    codes[..., :nb] = (exponent + E8M0_BIAS).to(torch.uint8)
    return y.to(torch.float8_e4m3fn), codes.unflatten(-1, (-1, 2))
