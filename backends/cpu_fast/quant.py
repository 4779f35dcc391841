"""Fast CPU quantized matmuls: dequantize in cache-sized chunks with vectorised integer ops, then
hand the arithmetic to one BLAS call per chunk (decode) or one GEMM in total (prefill).

Why bit tricks: PyTorch's CPU `float8_e4m3fn -> float` cast is a scalar loop (about 2 ns per
element here, 20x a BF16 GEMV's cost per weight), while integer shifts and masks on int32 are
vectorised. An e4m3 byte `s eeee mmm`, sign-extended to int32 and shifted left by 20, then masked
with 0x87F00000, is the float32 `s 0000eeee mmm0...`: the e4m3 value times 2**-120, exact for
normals and subnormals alike (e4m3 subnormals land on float32 subnormals). The 2**120 is folded
into the block scales, so no pass over the weight is spent on it.

Nothing is cached between calls: every call reads the fp8 weight and its scales afresh.

The bit trick (`v4hal.ops.e4m3`, shared with the checkpoint converter) reads NaN codes
(S.1111.111) as +-480. Full dequantizations (dequantize_fp8, both operands of the prefill GEMM,
the activation of the decode GEMV) put the NaN back; the weight streamed by the decode GEMV does
not (that would add a pass over the weight to every decode step): the fp8_matmul contract leaves
a NaN code in the weight undefined, and loaders reject such weights once.
"""

import torch
import torch.nn.functional as F

from v4hal.backends import registry
from v4hal.ops.e4m3 import e4m3_as_f32, restore_nan_codes
from v4hal.ops.quant import ACT_BLOCK, E2M1_VALUES, FP4_BLOCK, FP8_MAX, INT8_MAX, INT32_EXACT_K, WEIGHT_BLOCK

ref = registry.parent_family(__name__)

# e4m3 value = reinterpreted float32 * 2**120, applied as two halves in the decode GEMV where one
# factor of 2**120 on a scale would overflow float32 (activation x scale products >= 2**8).
_HALF_UNBIAS = 2.0 ** 60
# Elements dequantized per chunk: 2 MiB of float32, so a chunk is still in cache when it is used.
_CHUNK_ELEMENTS = 1 << 19
# Up to this many activation rows the GEMM is memory-bound (decode): it streams the weight once in
# float32 chunks; above, the weight is dequantized to BF16 once and one BF16 GEMM runs (prefill).
_DECODE_ROWS = 16
# Weight elements per BF16 slab of the prefill GEMM (8 MiB of BF16).
_GEMM_SLAB_ELEMENTS = 1 << 22


def _chunk_rows(k: int) -> int:
    return max(1, _CHUNK_ELEMENTS // k)


def _expand_last(scale: torch.Tensor, block: int, length: int) -> torch.Tensor:
    return scale.repeat_interleave(block, dim=-1)[..., :length]


def _dequant_rows(q: torch.Tensor, row_scale: torch.Tensor, bk: int, out: torch.Tensor) -> torch.Tensor:
    """out[r, k] = q[r, k] * row_scale[r, k // bk] for a 2-d e4m3 `q`, chunk by chunk."""
    if bool((row_scale >= 2.0 ** 7).any()):
        # row_scale * 2**120 would overflow float32: each chunk (still in cache) is brought back
        # to its e4m3 values instead, exactly, and meets the plain scales as in the reference.
        return _dequant_chunks(q, row_scale, bk, out, unbias=True)
    return _dequant_chunks(q, row_scale * (_HALF_UNBIAS * _HALF_UNBIAS), bk, out)


def _dequant_chunks(q, row_scale, bk, out, unbias=False):
    rows, k = q.shape
    step = _chunk_rows(k)
    buf = torch.empty(min(step, rows), k, dtype=torch.int32)
    for start in range(0, rows, step):
        stop = min(start + step, rows)
        w = e4m3_as_f32(q[start:stop], buf[: stop - start])
        if unbias:
            w.mul_(_HALF_UNBIAS * _HALF_UNBIAS)
        if k % bk == 0:
            torch.mul(w.view(stop - start, -1, bk), row_scale[start:stop].unsqueeze(-1),
                      out=out[start:stop].view(stop - start, -1, bk))
        else:
            torch.mul(w, _expand_last(row_scale[start:stop], bk, k), out=out[start:stop])
    return out


def _row_scales(scale: torch.Tensor, bm: int, rows: int) -> torch.Tensor:
    """One row of block scales per row of the tensor (small: rows x ceil(K/bk))."""
    s = scale.reshape(-1, scale.shape[-1]).float()
    return s.repeat_interleave(bm, dim=0)[:rows] if bm > 1 else s


def dequantize_fp8(q, scale, block, out_dtype):
    # Off the CPU (cuda and ascend inherit this) the reference's one broadcast multiply is what a
    # device wants; the bit tricks here are for a CPU's vector units.
    if out_dtype == torch.float64 or scale.dtype == torch.float64 or q.device.type != "cpu":
        return ref.dequantize_fp8(q, scale, block, out_dtype)
    q2 = q.reshape(-1, q.shape[-1])
    out = _dequant_rows(q2, _row_scales(scale, block[0], q2.shape[0]), block[1],
                        torch.empty(q2.shape, dtype=out_dtype))
    return restore_nan_codes(q2, out).reshape(q.shape)


def fp8_matmul(a, a_scale, b, b_scale, out_dtype):
    if a_scale.dtype == torch.float64 or b_scale.dtype == torch.float64 or out_dtype == torch.float64:
        return ref.fp8_matmul(a, a_scale, b, b_scale, out_dtype)
    k = a.shape[-1]
    a2 = a.reshape(-1, k)
    # Per-K-block scaling of the raw products equals scaling the dequantized operands, so both
    # operands are dequantized and the K blocks are summed by one GEMM.
    if a2.shape[0] <= _DECODE_ROWS:
        act = dequantize_fp8(a2, a_scale.reshape(-1, a_scale.shape[-1]), ACT_BLOCK, torch.float32)
        y = _fp8_gemv(act, b, b_scale)
    else:
        act = dequantize_fp8(a2, a_scale.reshape(-1, a_scale.shape[-1]), ACT_BLOCK, torch.bfloat16)
        y = _fp8_gemm(act, b, b_scale)
    return y.reshape(*a.shape[:-1], b.shape[0]).to(out_dtype)


def _slab_gemm(act, n, k, weight_rows):
    """Compute-bound case: BF16 GEMMs over slabs of the weight, `weight_rows(start, stop)`
    dequantizing each slab to BF16 just before use. Slabs keep the BF16 copy small enough to be
    reused from the allocator instead of faulting in a fresh full-size weight on every call."""
    rows = max(1, _GEMM_SLAB_ELEMENTS // (WEIGHT_BLOCK[0] * k)) * WEIGHT_BLOCK[0]
    if rows >= n:
        return F.linear(act, weight_rows(0, n))
    out = torch.empty(*act.shape[:-1], n, dtype=torch.bfloat16)
    for start in range(0, n, rows):
        stop = min(start + rows, n)
        out[..., start:stop] = F.linear(act, weight_rows(start, stop))
    return out


def _fp8_gemm(act, b, b_scale):
    """DeepSeek's weight_dequant (product in float32, one rounding to BF16) slab by slab."""
    bm = WEIGHT_BLOCK[0]
    return _slab_gemm(act, b.shape[0], b.shape[1], lambda start, stop: dequantize_fp8(
        b[start:stop], b_scale[start // bm: -(-stop // bm)], WEIGHT_BLOCK, torch.bfloat16))


def _fp8_gemv(act, b, b_scale):
    """Memory-bound case: stream the weight once in float32 chunks of whole 128-row scale blocks.
    Each block's scales go on the (tiny) activation instead of the weight, so the weight only
    sees the three integer passes of `e4m3_as_f32` before the GEMM reads it from cache. Half of
    the 2**120 goes on the activation, half on the (small) output, so neither can overflow."""
    n, k = b.shape
    bm, bk = WEIGHT_BLOCK
    # Huge weight scales (>= 2**7) take all of the 2**120 on the output instead.
    act_part = _HALF_UNBIAS if bool((b_scale < 2.0 ** 7).all()) else 1.0
    col_scale = _expand_last(b_scale.float() * act_part, bk, k)  # [Nb, K]
    out = torch.empty(act.shape[0], n, dtype=torch.float32)
    rows = max(1, _CHUNK_ELEMENTS // (bm * k)) * bm
    buf = torch.empty(min(rows, n), k, dtype=torch.int32)
    for start in range(0, n, rows):
        stop = min(start + rows, n)
        w = e4m3_as_f32(b[start:stop], buf[: stop - start])
        g, tail = divmod(stop - start, bm)
        scaled = act.unsqueeze(0) * col_scale[start // bm: start // bm + g + (tail > 0)].unsqueeze(1)
        if g:
            part = torch.bmm(scaled[:g], w[: g * bm].view(g, bm, k).transpose(1, 2))  # [g, M, bm]
            out[:, start: start + g * bm] = part.permute(1, 0, 2).reshape(act.shape[0], g * bm)
        if tail:
            torch.mm(scaled[g], w[g * bm:].T, out=out[:, start + g * bm: stop])
    out.mul_(_HALF_UNBIAS)
    return out if act_part != 1.0 else out.mul_(_HALF_UNBIAS)


def quantize_fp8(x, block, scale_fmt):
    bm, bk = block
    k = x.shape[-1]
    if bm != 1 or k % bk or x.dtype == torch.float64:
        return ref.quantize_fp8(x, block, scale_fmt)
    blocks = x.float().unflatten(-1, (k // bk, bk))
    scale = blocks.abs().amax(dim=-1).clamp_min(ref.AMAX_FLOOR) / FP8_MAX
    if scale_fmt == "ue8m0":
        scale = ref.power_of_two_ceil(scale)
    q = (blocks / scale.unsqueeze(-1)).clamp_(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn)
    return q.flatten(-2), scale


def _fp4_pair_bits() -> torch.Tensor:
    """byte -> the BF16 bit patterns of its two e2m1 values packed in one int32: the low nibble's
    value in the low half, so viewing the gathered int32s as BF16 lays the elements out in order
    (little-endian). e2m1 values are exact in BF16."""
    table = torch.tensor(E2M1_VALUES + tuple(-v for v in E2M1_VALUES), dtype=torch.bfloat16)
    bits = table.view(torch.int16).to(torch.int32) & 0xFFFF
    codes = torch.arange(256)
    return bits[codes & 0xF] | (bits[codes >> 4] << 16)


_FP4_PAIR_BITS = _fp4_pair_bits()


def _fp4_weight(packed, scale, dtype):
    n, k = packed.shape[0], 2 * packed.shape[1]
    # One int32 gather per byte yields both BF16 values; the ue8m0 scales are powers of two, so
    # the BF16 multiply is exact and the result equals the float32 dequantization.
    values = _FP4_PAIR_BITS.index_select(0, packed.reshape(-1).to(torch.int32)).view(torch.bfloat16)
    s = ref.fp4_scale_values(scale, torch.float32)[:, : k // FP4_BLOCK].to(torch.bfloat16)
    return (values.view(n, -1, FP4_BLOCK) * s.unsqueeze(-1)).view(n, k).to(dtype)


_E2M1_SIGNED = torch.tensor(E2M1_VALUES + tuple(-v for v in E2M1_VALUES))


def _dequantize_fp4_on_device(packed, scale, out_dtype):
    """One table lookup per code and one scale multiply: what a GPU or NPU wants."""
    cd = torch.float64 if out_dtype == torch.float64 else torch.float32
    table = _E2M1_SIGNED.to(device=packed.device, dtype=cd)
    values = table[torch.stack((packed & 0xF, packed >> 4), dim=-1).flatten(-2).long()]
    s = ref.fp4_scale_values(scale, cd).repeat_interleave(FP4_BLOCK, dim=-1)[:, : values.shape[1]]
    return (values * s).to(out_dtype)


def dequantize_fp4(packed, scale, out_dtype):
    if packed.device.type != "cpu":
        return _dequantize_fp4_on_device(packed, scale, out_dtype)
    if out_dtype == torch.float64 or (2 * packed.shape[1]) % FP4_BLOCK:
        return ref.dequantize_fp4(packed, scale, out_dtype)
    return _fp4_weight(packed, scale, out_dtype)


def fp4_matmul(a, b, b_scale, a_scale, out_dtype):
    k = a.shape[-1]
    if out_dtype == torch.float64 or a.dtype == torch.float64 or k % FP4_BLOCK or (
            a_scale is not None and a_scale.dtype == torch.float64):
        return ref.fp4_matmul(a, b, b_scale, a_scale, out_dtype)
    act = a.bfloat16() if a_scale is None else dequantize_fp8(a, a_scale, ACT_BLOCK, torch.bfloat16)
    # e2m1 values times a power of two are exact in BF16, so only the activation rounds.
    y = _slab_gemm(act, b.shape[0], k, lambda start, stop: _fp4_weight(b[start:stop], b_scale[start:stop],
                                                                      torch.bfloat16))
    return y.to(out_dtype)


def quantize_int8(x):
    if x.dtype == torch.float64:
        return ref.quantize_int8(x)
    xf = x.float()
    scale = xf.abs().amax(dim=-1).clamp_min(1e-8) / INT8_MAX
    q = torch.round(xf / scale.unsqueeze(-1)).clamp_(-INT8_MAX, INT8_MAX).to(torch.int8)
    return q, scale


def int8_matmul(a, a_scale, b, b_scale, out_dtype):
    k = a.shape[-1]
    if a.device.type != "cpu":
        return _int8_matmul_on_device(a, a_scale, b, b_scale, out_dtype)
    # torch 2.13's CPU _int_mm returns garbage for K = 1 (any M, N > 1); found by hypothesis.
    if out_dtype == torch.float64 or a_scale.dtype == torch.float64 or b_scale.dtype == torch.float64 or k == 1:
        return ref.int8_matmul(a, a_scale, b, b_scale, out_dtype)
    acc = _exact_int_mm(a.reshape(-1, k), b)
    y = acc.float() * a_scale.reshape(-1, 1).float() * b_scale.float()
    return y.reshape(*a.shape[:-1], b.shape[0]).to(out_dtype)


def _int8_matmul_on_device(a, a_scale, b, b_scale, out_dtype):
    """A device (cuda and ascend inherit this) may lack an int8 or int64 GEMM: int8 products are
    exact in float32, sums stay exact up to 2**24 (K*127*127 < 2**24 for K <= 1040) and round like
    a float32 epilogue beyond that, without overflowing."""
    acc = a.reshape(-1, a.shape[-1]).float() @ b.float().T
    y = acc * a_scale.reshape(-1, 1).float() * b_scale.float()
    return y.reshape(*a.shape[:-1], b.shape[0]).to(out_dtype)


def _exact_int_mm(a2, b):
    """`a2 @ b.T` exactly. torch._int_mm (oneDNN's int8 GEMM, int32 accumulation) wants dense
    operands (an expanded activation has stride 0) and overflows past INT32_EXACT_K, so longer K
    runs as equal pieces (none of length 1, see above) summed in int64."""
    k = a2.shape[1]
    pieces = -(-k // INT32_EXACT_K)
    if pieces == 1:
        return torch._int_mm(a2.contiguous(), b.contiguous().T)
    step = -(-k // pieces)
    return sum(torch._int_mm(a2[:, s:s + step].contiguous(), b[:, s:s + step].contiguous().T).long()
               for s in range(0, k, step))
