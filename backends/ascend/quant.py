"""Quantized matmuls on Ascend, per chip (torch-npu 2.13.0 schemas, `_op_plugin_docs.py` and the
wheel's Meta kernels are the ground truth; `chip_path(op)` says in words what runs where).

- A5 (Ascend 950) has FP8 cube units: `fp8_matmul` is one `npu_quant_matmul` with e4m3 x1/x2,
  `pertoken_scale` = the 1x128 activation scales `[M, K/128]`, `scale` = the 128x128 weight scales
  transposed to `[K/128, N/128]` (x2 is passed as `b.t()`, `[K, N]`) and `group_sizes=[1, 128, 128]`
  (the Meta kernel's "G-B" check: group 1 along M, 128 along N and K). `quantize_fp8` in ue8m0
  mode is `npu_dynamic_mx_quant(dst_type=292 = float8_e4m3fn, block_size=128, scale_alg=1,
  max_low_bound=1e-4)`: scale_alg 1 is the cuBLAS MXFP8 rule (scale = amax / 448 rounded UP to a
  power of two), max_low_bound is DeepSeek's amax floor. Its e8m0 scales come back as uint8 pairs
  `[..., ceil(Kb/2), 2]` and are turned into float32 powers of two here.
- A2 / A3 (910B / 910C) have no FP8 units, and no vendor op takes an FP8 tensor there.
  `fp8_matmul` decodes e4m3 from its uint8 bits with a 256-entry table lookup on the NPU, applies
  the block scales in float32 and runs one BF16 matmul (fp32 accumulation on the cube). The
  alternative, int8 W8A8, is a checkpoint conversion, not a per-call choice: a weight converted to
  per-channel int8 goes through `linear` -> `npu_dynamic_quant` + `npu_quant_matmul`.
- int8 W8A8 (all chips): `npu_dynamic_quant` (per-token, scale = rowmax|x| / 127) and
  `npu_quant_matmul(x1 int8, x2 int8 [K, N], scale fp32 [N], pertoken_scale fp32 [M],
  output_dtype=bf16/fp16)`: without output_dtype it would return int8.
- MXFP4 (`fp4_matmul`, `dequantize_fp4`): the weight is decoded by one byte-indexed table lookup
  (a byte holds two e2m1 codes, low nibble first) times its ue8m0 scales, then one BF16 matmul, on
  every chip. A5's FP8 x FP4 `npu_quant_matmul` (`x2_dtype=float4_e2m1fn_x2`) is not used: the
  docs state only that K must be a multiple of 64; neither they nor the Meta kernel (which skips
  its scale checks for this mode, `group_sizes` [0,0,32] or [1,1,32]) say which layout and dtype
  `scale` / `pertoken_scale` take, and the contract's activations are float (weight-only) or FP8
  with float32 1x128 scales, which e8m0 per-32 MX scales cannot carry.
Everything not listed, and every fallback here, is cpu_fast's device-agnostic torch code (inherited)
running on the NPU.
"""

import torch

from v4hal.backends import ascend, registry
from v4hal.backends.ascend import npu
from v4hal.ops.quant import ACT_BLOCK, FP4_BLOCK, INT32_EXACT_K, WEIGHT_BLOCK

FP8_CHIPS = ("A5",)
NPU_OUT = (torch.bfloat16, torch.float16)  # what npu_quant_matmul writes with scales applied
E4M3FN = 292  # torch_npu's enum for float8_e4m3fn (dst_type of npu_dynamic_mx_quant)
AMAX_FLOOR = 1e-4

torch_path = registry.parent_family(__name__)

PATHS = {
    "quantize_fp8": {
        "A5": "ue8m0 1x128: npu_dynamic_mx_quant(dst_type=float8_e4m3fn, block_size=128, scale_alg=1, "
              "max_low_bound=1e-4); fp32 scales / 128x128 blocks: torch ops on the NPU",
        "A2/A3": "torch ops on the NPU (no FP8 units: the e4m3 tensor is storage for the BF16 path)"},
    "dequantize_fp8": {"*": "e4m3 decoded from uint8 by table lookup, float32 scale multiply, on the NPU"},
    "fp8_matmul": {
        "A5": "npu_quant_matmul FP8 x FP8, pertoken_scale 1x128 + scale 128x128, group_sizes=[1,128,128]",
        "A2/A3": "BF16 dequant (uint8 table lookup + block scales) then one BF16 matmul; int8 W8A8 is "
                 "available by converting the checkpoint (linear on int8 weights)"},
    "quantize_fp4": {"*": "torch ops on the NPU"},
    "dequantize_fp4": {"*": "one byte-indexed e2m1 pair table lookup x ue8m0 scale, torch ops on the NPU"},
    "fp4_matmul": {"*": "MXFP4 weight dequantized to BF16 by table lookup, then one BF16 matmul"},
    "quantize_int8": {"*": "npu_dynamic_quant (per token, bf16/fp16 input); torch ops otherwise"},
    "int8_matmul": {"*": "npu_quant_matmul int8 x int8, per-channel scale + pertoken_scale, "
                         "output_dtype bf16/fp16; float32 matmul for float32/float64 outputs and K > 131071"},
}


def chip_path(op: str, chip: str | None = None) -> str:
    """How `op` runs on `chip` (default: this machine's chip; all chips when it is unknown)."""
    paths = PATHS.get(op)
    if paths is None:
        return "not a quant op"
    if chip is None:
        try:
            chip = ascend.chip()
        except Exception:  # no NPU and no V4HAL_ASCEND_CHIP: describe every chip
            return "; ".join(f"{c}: {p}" for c, p in paths.items())
    for key, path in paths.items():
        if key == "*" or chip in key.split("/"):
            return f"{chip}: {path}"
    return f"{chip}: {next(iter(paths.values()))}"


def _fp8_native() -> bool:
    return ascend.chip() in FP8_CHIPS


def _e4m3_table(device) -> torch.Tensor:
    return torch.arange(256, dtype=torch.uint8).view(torch.float8_e4m3fn).float().to(device)


def _decode_e4m3(q: torch.Tensor) -> torch.Tensor:
    """float32 values of an e4m3 tensor without any FP8 arithmetic (A2/A3 have none); int32
    indices, half the transient memory of int64 ones."""
    codes = q.view(torch.uint8).reshape(-1).int()
    return torch.index_select(_e4m3_table(q.device), 0, codes).view(q.shape)


def _scale_blocks(values, scale, block):
    """values `[..., n, k]` times the scale of the (bm, bk) block each element lies in (scale
    `[..., ceil(n/bm), ceil(k/bk)]`); broadcast over a blocked view where the blocks tile the
    matrix, so no full-size scale tensor is built."""
    bm, bk = block
    *lead, n, k = values.shape
    s = scale.float()
    if k % bk == 0 and (bm == 1 or n % bm == 0):
        if bm == 1:
            return (values.unflatten(-1, (-1, bk)) * s.unsqueeze(-1)).flatten(-2)
        blocked = values.view(*lead, n // bm, bm, k // bk, bk) * s.view(*lead, n // bm, 1, k // bk, 1)
        return blocked.view(values.shape)
    s = s.repeat_interleave(bk, dim=-1)[..., :k]
    if bm > 1:
        s = s.repeat_interleave(bm, dim=-2)[..., :n, :]
    return values * s


def _e2m1_pair_table(device) -> torch.Tensor:
    """[256, 2] float32: the two e2m1 values a byte holds, low nibble first."""
    magnitudes = torch.tensor([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0])
    nibbles = torch.cat([magnitudes, -magnitudes])
    codes = torch.arange(256)
    return torch.stack([nibbles[codes & 0xF], nibbles[codes >> 4]], dim=-1).to(device)


def _fp4_scale_values(scale: torch.Tensor) -> torch.Tensor:
    """ue8m0 scales as float32: e8m0 / uint8 bytes are exponents + 127, float32 ones are values."""
    if scale.dtype in (torch.float8_e8m0fnu, torch.uint8):
        return torch.exp2(scale.view(torch.uint8).float() - 127)
    return scale.float()


def _decode_fp4(packed: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """float32 `[..., N, K]` of a packed MXFP4 weight `[..., N, K/2]` and its 1x32 scales."""
    codes = packed.reshape(-1).int()
    pairs = torch.index_select(_e2m1_pair_table(packed.device), 0, codes)
    values = pairs.view(*packed.shape[:-1], 2 * packed.shape[-1])
    return _scale_blocks(values, _fp4_scale_values(scale), (1, FP4_BLOCK))


def quantize_fp8(x, block, scale_fmt):
    if (block == ACT_BLOCK and scale_fmt == "ue8m0" and x.dtype in NPU_OUT and x.dim() >= 2
            and x.shape[-1] % 2 == 0 and _fp8_native()):
        y, mx = npu().npu_dynamic_mx_quant(x, axis=-1, round_mode="rint", dst_type=E4M3FN, block_size=128,
                                           scale_alg=1, max_low_bound=AMAX_FLOOR)
        kb = -(-x.shape[-1] // 128)
        exponent = mx.reshape(*x.shape[:-1], -1)[..., :kb].float()
        return y, torch.exp2(exponent - 127)
    return torch_path.quantize_fp8(x, block, scale_fmt)


def dequantize_fp8(q, scale, block, out_dtype):
    return _scale_blocks(_decode_e4m3(q), scale, block).to(out_dtype)


def fp8_matmul(a, a_scale, b, b_scale, out_dtype):
    k = a.shape[-1]
    a2, s2 = a.reshape(-1, k), a_scale.reshape(-1, a_scale.shape[-1]).float()
    if _fp8_native() and out_dtype in NPU_OUT:
        y = npu().npu_quant_matmul(a2, b.t(), b_scale.float().t(), pertoken_scale=s2,
                                   output_dtype=out_dtype, group_sizes=[1, 128, 128])
    else:
        act = _scale_blocks(_decode_e4m3(a2), s2, ACT_BLOCK).bfloat16()
        w = _scale_blocks(_decode_e4m3(b), b_scale, WEIGHT_BLOCK).bfloat16()
        y = torch.matmul(act, w.t()).to(out_dtype)
    return y.reshape(*a.shape[:-1], b.shape[0])


def dequantize_fp4(packed, scale, out_dtype):
    if out_dtype == torch.float64:
        return torch_path.dequantize_fp4(packed, scale, out_dtype)
    return _decode_fp4(packed, scale).to(out_dtype)


def fp4_matmul(a, b, b_scale, a_scale, out_dtype):
    if out_dtype == torch.float64 or a.dtype == torch.float64:
        return torch_path.fp4_matmul(a, b, b_scale, a_scale, out_dtype)
    act = a.float() if a_scale is None else _scale_blocks(_decode_e4m3(a), a_scale, ACT_BLOCK)
    # e2m1 values times a power of two are exact in BF16: only the activation rounds.
    w = _decode_fp4(b, b_scale).bfloat16()
    return torch.matmul(act.bfloat16(), w.t()).to(out_dtype)


def quantize_int8(x):
    if x.dtype in NPU_OUT and x.dim() >= 2:
        q, scale = npu().npu_dynamic_quant(x)
        # An all-zero row gets scale 0 from the kernel; the contract floors amax at 1e-8.
        floor = 1e-8 / 127
        return torch.where(scale.unsqueeze(-1) > 0, q, torch.zeros_like(q)), scale.clamp_min(floor)
    return torch_path.quantize_int8(x)


def int8_matmul(a, a_scale, b, b_scale, out_dtype):
    k = a.shape[-1]
    # npu_quant_matmul accumulates in int32, which a longer K could overflow.
    if out_dtype not in NPU_OUT or k > INT32_EXACT_K:
        return torch_path.int8_matmul(a, a_scale, b, b_scale, out_dtype)
    y = npu().npu_quant_matmul(a.reshape(-1, k), b.t(), b_scale.float(),
                               pertoken_scale=a_scale.reshape(-1).float(), output_dtype=out_dtype)
    return y.reshape(*a.shape[:-1], b.shape[0])
