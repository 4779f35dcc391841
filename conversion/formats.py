"""What each tensor of a DeepSeek checkpoint is, and the per-tensor transforms between formats.

A weight `P.weight` is FP8 when it is `float8_e4m3fn` with a sibling `P.weight_scale_inv` (V3 /
V3.2 HF naming) or `P.scale` (V4 official naming) of shape `[ceil(N/128), ceil(K/128)]`; it is
MXFP4 when it is int8/uint8 `[N, K/2]` with a sibling scale `[N, K/32]`. Everything else is
plain. Plain 2-d linear weights are quantized by the quantizing targets; norms, embeddings,
router gates, biases, mHC and position parameters never are.

All math goes through the `v4hal.ops` quant contracts, so a converted checkpoint holds exactly
what the runtime would compute: decode = `dequantize_fp8` / `dequantize_fp4`, encode =
`quantize_fp8` (128x128, fp32 or ue8m0 scales; 1x32 ue8m0 for MXFP8) / `quantize_int8`.
Transforms work on row chunks (multiples of 128 rows), so memory stays bounded by the chunk,
not the tensor.

Three hot paths are computed here rather than by the contracts, bit for bit the same values
(tests/test_convert_fast.py compares them with the contracts on every e4m3 code): FP8 -> BF16 /
float32 decode, float32 -> int8 per-channel encode, and FP8 -> int8 (W8A8) as one pass over each
piece, without the float32 chunk in between. They work through each chunk in pieces of about
2 MB (reused scratch that stays in cache; smaller pieces cost more in per-call overhead than they
save in cache misses) on one thread: the conversion's other CPU work, hashing input and output
and writing, runs on background threads (see io.py), and on a small shared machine a second
OpenMP thread only contends with them.
"""

from __future__ import annotations

import contextlib
import math
import re
from dataclasses import dataclass, field

import torch

from v4hal.checkpoint_files import CheckpointError
from v4hal.conversion import kernels
from v4hal.conversion.io import TensorInfo
from v4hal.conversion.output import OutSpec
from v4hal.ops import engram, quant
from v4hal.ops.e4m3 import e4m3_as_f32, has_nan_codes, restore_nan_codes

SCALE_SUFFIXES = ("weight_scale_inv", "scale")
# Module names that hold a 2-d `.weight` but are not quantized linears.
NOT_LINEAR = re.compile(r"(embed|lm_head|(^|\.)head\.|norm|(^|\.)gate\.weight$|weights_proj|(^|\.)hc_|\.ape$|sink)")
# V4.1's Engram tables (float8 rows with a ue8m0 scale per 32 columns, ~189 GiB for V4.1-Flash)
# are kept as shipped by every target (the lookup dequantizes the few rows it gathers), unless
# `engram_tables="bf16"` re-encodes them for hardware that cannot read float8 (Ascend A2 / A3),
# at twice the bytes: the product rounded once, exact wherever BF16 holds it (every product under
# scale bytes 3 .. 246; below 2^-126 only BF16's 2^-133 steps survive, 2^128 and up is +-inf).
ENGRAM_TABLE = re.compile(r"(^|\.)engram\.embed\.(weight|scale)$")
ENGRAM_TABLE_FORMATS = ("keep", "bf16")
TARGETS = ("bf16", "fp8", "w8a8", "mxfp8", "copy")
SCALE_FMTS = quant.SCALE_FMTS
W8A8_TYPE = "W8A8_DYNAMIC"
FLOAT_TYPE = "FLOAT"
MX_BLOCK = 32
# The e4m3 bit trick (v4hal.ops.e4m3) reads the codes as float32 times 2**-120; the 2**120 goes into the
# scale, so q * scale is formed exactly as float32(q) * scale, rounded once.
_UNBIAS = 2.0 ** 120
# The scale dtypes each decode reads: ue8m0 ones as float8_e8m0fnu, or as uint8 holding the same
# exponent bytes where the runtime's contracts read them so (MXFP4: `dequantize_fp4`; V4.1's
# Engram tables: `engram_lookup`, and vLLM's Engram loader keeps a uint8 scale's bytes). FP8's
# 128x128 scales are floats to `fp8_matmul`, so a uint8 one there is refused, not guessed at.
DECODED_SCALE_DTYPES = {"fp8": quant.FP8_STORED_SCALE_DTYPES,
                        "fp4": quant.FP4_SCALE_DTYPES, "mxfp8": engram.SCALE_DTYPES}
_SUB_ELEMENTS = 1 << 19     # elements per piece: 2 MiB of int32 / float32 scratch


@dataclass(frozen=True)
class Options:
    target: str = "bf16"
    scale_fmt: str = "auto"          # fp8 target: fp32 or ue8m0 scales; auto: as the source (plan.resolve_scale_fmt)
    source_scale_fmt: str = "fp32"   # the source's: its FP8 weights are copied as shipped when scale_fmt is the same
    scale_name: str = "auto"         # fp8/mxfp8 target: weight_scale_inv | scale | auto (as the source)
    keep: str | None = None          # regex of extra tensor names never to quantize
    mp: int = 1                      # tensor/expert parallel ranks (1 = no resharding)
    n_experts: int | None = None     # routed experts (resharding); default: from the names
    engram_tables: str = "keep"      # V4.1's Engram tables: keep (as shipped) | bf16 (float8 ones decoded)

    def as_dict(self) -> dict:
        return {k: getattr(self, k) for k in self.__dataclass_fields__}


@dataclass
class Job:
    """One source tensor (plus its scale) -> output tensors; outputs[0] is streamed in row
    chunks, the others (scales) are gathered and written after it."""
    source: str
    decode: str                      # raw | plain | fp8 | fp4
    encode: str                      # raw | bf16 | fp8 | int8 | mxfp8
    outputs: list[OutSpec]
    scale: str | None = None         # the source scale tensor
    quant_type: str = FLOAT_TYPE
    split: tuple | None = None       # resharding: ("dim", d, block) or ("expert", rank); None = whole
    extra: dict = field(default_factory=dict)


def sibling_scale(name: str, tensors: dict[str, TensorInfo]) -> str | None:
    if not name.endswith(".weight"):
        return None
    stem = name[: -len("weight")]
    for suffix in SCALE_SUFFIXES:
        if stem + suffix in tensors:
            return stem + suffix
    return None


def storage(info: TensorInfo, scale: TensorInfo | None) -> str:
    """plain | fp8 | fp4, checking the scale's shape against the weight's."""
    if scale is None:
        return "plain"
    if len(info.shape) != 2:
        raise CheckpointError(info.file, f"has a scale tensor but is {len(info.shape)}-d", info.name)
    n, k = info.shape
    if info.dtype == torch.float8_e4m3fn:
        want = quant.scale_shape((n, k), quant.WEIGHT_BLOCK)
        if scale.shape != want:
            raise CheckpointError(scale.file, f"FP8 scale shape {list(scale.shape)} does not match weight {[n, k]} in 128x128 blocks {list(want)}", scale.name)
        return "fp8"
    if info.dtype in (torch.int8, torch.uint8):
        want = (n, math.ceil(2 * k / quant.FP4_BLOCK))
        if scale.shape != want:
            raise CheckpointError(scale.file, f"FP4 scale shape {list(scale.shape)} does not match packed weight {[n, k]} (want {list(want)})", scale.name)
        return "fp4"
    raise CheckpointError(info.file, f"has a scale tensor but dtype {info.dtype} is neither FP8 nor packed FP4", info.name)


def is_linear(name: str, shape: tuple[int, ...], keep: re.Pattern | None) -> bool:
    return (name.endswith(".weight") and len(shape) == 2 and not NOT_LINEAR.search(name)
            and not (keep and keep.search(name)))


def logical_shape(info: TensorInfo, kind: str) -> tuple[int, ...]:
    return (info.shape[0], 2 * info.shape[1]) if kind == "fp4" else info.shape


def plan_jobs(tensors: dict[str, TensorInfo], opts: Options) -> list[Job]:
    """Jobs in source (file, offset) order; scale tensors are consumed by their weights."""
    keep = re.compile(opts.keep) if opts.keep else None
    scales = {s: n for n in tensors if not ENGRAM_TABLE.search(n) and (s := sibling_scale(n, tensors))}
    src_scale_name = next((s.rsplit(".", 1)[1] for s in scales), None)
    # V4's official naming (`.attn.` / `.ffn.` modules) pairs weights with `scale`, HF naming with `weight_scale_inv`.
    official = any(".ffn." in n or ".attn." in n for n in tensors)
    scale_name = opts.scale_name if opts.scale_name != "auto" else (
        src_scale_name or ("scale" if official else "weight_scale_inv"))
    jobs = []
    if opts.target == "fp8" and opts.scale_fmt not in SCALE_FMTS:
        raise ValueError(f"scale_fmt: expected one of {SCALE_FMTS} (plan.resolve_scale_fmt resolves 'auto'), "
                         f"got {opts.scale_fmt!r}")
    if opts.engram_tables not in ENGRAM_TABLE_FORMATS:
        raise ValueError(f"engram_tables: expected one of {ENGRAM_TABLE_FORMATS}, got {opts.engram_tables!r}")
    for name, info in tensors.items():
        if ENGRAM_TABLE.search(name):
            jobs += _engram_table_job(name, info, tensors, opts.engram_tables)
            continue
        if name in scales:
            continue
        scale = tensors.get(sibling_scale(name, tensors) or "")
        kind = storage(info, scale)
        jobs.append(_job(name, info, scale if kind != "plain" else None, kind, opts, keep, scale_name))
    for job in jobs:
        if job.decode != "raw" and job.scale:
            _check_scale_dtype(job.decode, tensors[job.scale])
    return jobs


def _check_scale_dtype(kind: str, scale: TensorInfo) -> None:
    allowed = DECODED_SCALE_DTYPES[kind]
    if scale.dtype not in allowed:
        what = {"fp8": "FP8 weight's 128x128", "fp4": "MXFP4 weight's 1x32", "mxfp8": "float8 Engram table's 1x32"}[kind]
        raise CheckpointError(scale.file, f"a {what} scale: expected dtype {' or '.join(map(str, allowed))}, "
                                          f"got {scale.dtype}", scale.name)


def _engram_table_job(name: str, info: TensorInfo, tensors: dict[str, TensorInfo], fmt: str) -> list[Job]:
    """A table's weight (its scale with it when decoded to BF16), or its scale kept as shipped."""
    scale = tensors.get(name[: -len("weight")] + "scale") if name.endswith(".weight") else None
    decode = fmt == "bf16" and info.dtype == torch.float8_e4m3fn
    if decode and scale is None:
        raise CheckpointError(info.file, "a float8 Engram table without its .scale (one ue8m0 per 32 columns)", name)
    if name.endswith(".scale") and fmt == "bf16" and tensors.get(name[: -len("scale")] + "weight") is not None:
        return []  # consumed by its table's decode
    if not decode:
        return [Job(name, "raw", "raw", [OutSpec(name, info.dtype, info.shape)])]
    want = (info.shape[0], math.ceil(info.shape[1] / MX_BLOCK))
    if tuple(scale.shape) != want:
        raise CheckpointError(scale.file, f"Engram table scale shape {list(scale.shape)} does not match its table "
                                          f"{list(info.shape)} in 1x{MX_BLOCK} blocks {list(want)}", scale.name)
    return [Job(name, "mxfp8", "bf16", [OutSpec(name, torch.bfloat16, info.shape)], scale.name)]


def _job(name, info, scale, kind, opts, keep, scale_name) -> Job:
    stem = name[: -len("weight")] if name.endswith(".weight") else name + "."
    quantizable = kind != "plain" or is_linear(name, info.shape, keep)
    n_k = logical_shape(info, kind)
    t = opts.target
    raw_scale = [OutSpec(scale.name, scale.dtype, scale.shape)] if scale is not None else []
    if t == "copy" or not quantizable:
        return Job(name, "raw", "raw", [OutSpec(name, info.dtype, info.shape)] + raw_scale, scale and scale.name)
    decode = kind
    sname = scale.name if scale is not None else None
    if t == "bf16":
        if kind == "plain":
            return Job(name, "raw", "raw", [OutSpec(name, info.dtype, info.shape)])
        return Job(name, decode, "bf16", [OutSpec(name, torch.bfloat16, n_k)], sname)
    if t == "fp8":
        if kind == "fp8" and opts.scale_fmt == opts.source_scale_fmt:
            return Job(name, "raw", "raw", [OutSpec(name, info.dtype, info.shape),
                                            OutSpec(stem + scale_name, scale.dtype, scale.shape)], sname)
        return Job(name, decode, "fp8", [OutSpec(name, torch.float8_e4m3fn, n_k),
                                        OutSpec(stem + scale_name, torch.float32, quant.scale_shape(n_k, quant.WEIGHT_BLOCK))],
                   sname, extra={"scale_fmt": opts.scale_fmt})
    if t == "w8a8":
        n = n_k[0]
        return Job(name, decode, "int8", [OutSpec(name, torch.int8, n_k), OutSpec(stem + "weight_scale", torch.float32, (n, 1)),
                                          OutSpec(stem + "weight_offset", torch.float32, (n, 1))], sname, quant_type=W8A8_TYPE)
    if t == "mxfp8":
        if kind != "fp8":  # MXFP4 experts stay MXFP4 (A5 runs them natively); plain stays plain
            return Job(name, "raw", "raw", [OutSpec(name, info.dtype, info.shape)] + raw_scale, sname)
        return Job(name, decode, "mxfp8", [OutSpec(name, torch.float8_e4m3fn, n_k),
                                           OutSpec(stem + scale_name, torch.float8_e8m0fnu, (n_k[0], math.ceil(n_k[1] / MX_BLOCK)))], sname)
    raise ValueError(f"unknown target {t!r}; valid: {', '.join(TARGETS)}")


@contextlib.contextmanager
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def convert_rows(decode: str, encode: str, q: torch.Tensor, scale: torch.Tensor | None, row0: int, extra: dict,
                 out: torch.Tensor | None = None) -> list[torch.Tensor]:
    """Target pieces of rows [row0, row0 + len(q)) of a stored weight (row0 a multiple of 128):
    `decode_rows` then `encode_rows`, except FP8 -> int8, which goes in one pass where it can
    (`fp8_to_int8_rows`). `out`: where the main piece goes when it is BF16 or int8 (e.g. a
    writer's buffer, see ShardWriter.buffer); other paths return fresh tensors."""
    if decode == "fp8" and encode == "int8":
        fused = fp8_to_int8_rows(q, _block_rows(scale, row0, q.shape[0]), out)
        if fused is not None:
            return _w8a8_pieces(*fused)
    x = decode_rows(decode, q, scale, row0, torch.bfloat16 if encode == "bf16" else torch.float32,
                    out if encode == "bf16" else None)
    return encode_rows(encode, x, extra, out if encode == "int8" else None)


def float_scale(scale: torch.Tensor, info: TensorInfo) -> torch.Tensor:
    """A source scale as the decodes read it: `float8_e8m0fnu` (V4 ships its ue8m0 block scales
    so), or uint8 holding the same bytes (`DECODED_SCALE_DTYPES` says where one is read), becomes
    float32 exactly, 2**(byte - 127), which the quant contracts and the fast FP8 paths take; byte
    0xFF, e8m0's NaN, is refused naming the tensor (it would poison its whole block). Other dtypes
    pass unchanged (the contracts check them)."""
    if scale.dtype == torch.uint8:
        scale = scale.view(torch.float8_e8m0fnu)
    if scale.dtype != torch.float8_e8m0fnu:
        return scale
    nan = scale.view(torch.uint8) == 0xFF
    if bool(nan.any()):
        first = [int(i) for i in nan.nonzero()[0]]
        raise CheckpointError(info.file, f"{int(nan.sum())} scale(s) hold e8m0 byte 0xFF (NaN), first at {first}: "
                                         f"expected powers of two (bytes 0-254)", info.name)
    return scale.float()  # exact: every byte 0-254 is a float32 power of two (byte 0 a subnormal)


def _block_rows(scale: torch.Tensor, row0: int, rows: int) -> torch.Tensor:
    """The rows of a 128x128 block scale that rows [row0, row0 + rows) use."""
    b = quant.WEIGHT_BLOCK[0]
    return scale[row0 // b: math.ceil((row0 + rows) / b)]


def decode_rows(kind: str, q: torch.Tensor, scale: torch.Tensor | None, row0: int,
                out_dtype: torch.dtype = torch.float32, out: torch.Tensor | None = None) -> torch.Tensor:
    """Values of rows [row0, row0 + len(q)) of a stored weight (row0 a multiple of 128): the
    float32 product, rounded to `out_dtype` (BF16 straight away saves a pass for the BF16 target,
    with the same bits: the product is formed in float32 either way). `out`: where to put them
    (e.g. a writer's buffer, see ShardWriter.buffer), else a fresh tensor."""
    with _one_thread():
        if kind == "fp8":
            s = _block_rows(scale, row0, q.shape[0])
            if _fast_fp8(q, s, out_dtype):
                return _dequant_fp8(q, s, out_dtype, out)
            x = quant.dequantize_fp8(q, s, quant.WEIGHT_BLOCK, out_dtype=out_dtype)
        elif kind == "mxfp8":  # e4m3 rows with a ue8m0 scale per 32 columns (V4.1's Engram tables)
            x = quant.dequantize_fp8(q, scale[row0: row0 + q.shape[0]], (1, MX_BLOCK), out_dtype=out_dtype)
        elif kind == "plain":
            x = q.to(out_dtype)
        elif kind == "fp4":
            x = quant.dequantize_fp4(q.view(torch.uint8), scale[row0: row0 + q.shape[0]], out_dtype=out_dtype)
        else:
            raise ValueError(kind)
        return x if out is None else out.copy_(x)


def refuse_bf16_overflow(x: torch.Tensor, scale: torch.Tensor, row0: int, info: TensorInfo) -> None:
    """Rows [row0, ...) of an MX-scaled table decoded to BF16 (`x`) must be finite: a product of
    2^128 or more (an e4m3 code under scale bytes 247-254) rounds to +-inf, which the lookup would
    spread through the model. Refused naming the tensor and its first such scale."""
    if not bool((scale[row0: row0 + x.shape[0]] >= 2.0**120).any()):  # below byte 247 no product reaches 2^128
        return
    inf = x.isinf()
    if bool(inf.any()):
        row, col = (int(i) for i in inf.nonzero()[0])
        block = [row0 + row, col // MX_BLOCK]
        byte = int(torch.log2(scale[block[0], block[1]])) + 127
        raise CheckpointError(info.file, f"decoding to BF16 would overflow BF16 (products of 2^128 or more become "
                                         f"+-inf), first under scale {block} (byte {byte}); keep the float8 table "
                                         f"(--engram-tables keep)", info.name)


def _fast_fp8(q: torch.Tensor, s: torch.Tensor, out_dtype: torch.dtype) -> bool:
    """The bit trick applies: float32 scales of the right shape, every one non-negative, finite and
    small enough that scale * 2**120 stays finite. Anything else goes to the contract, which also
    refuses what no checkpoint should hold (NaN, Inf or negative scales, bad shapes)."""
    return (q.dtype == torch.float8_e4m3fn and q.dim() == 2 and s.dtype == torch.float32
            and out_dtype in (torch.float32, torch.bfloat16)
            and tuple(s.shape) == quant.scale_shape(tuple(q.shape), quant.WEIGHT_BLOCK)
            and bool(((s >= 0) & (s < 2.0 ** 8)).all()))


def _piece_rows(k: int) -> int:
    """Rows per piece: a power of two, so pieces never straddle a 128-row scale block."""
    return max(1, min(quant.WEIGHT_BLOCK[0], 1 << max(0, (_SUB_ELEMENTS // max(k, 1)).bit_length() - 1)))


def _dequant_fp8(q: torch.Tensor, s: torch.Tensor, out_dtype: torch.dtype, out: torch.Tensor | None = None) -> torch.Tensor:
    rows, k = q.shape
    out = torch.empty(rows, k, dtype=out_dtype) if out is None else out
    if kernels.enabled() and q.is_contiguous() and out.is_contiguous():
        return kernels.dequant_fp8(q, s.contiguous(), out)
    col_scale = _column_scales(s, k)
    step = _piece_rows(k)
    work = torch.empty(min(step, rows), k, dtype=torch.int32)
    for r in range(0, rows, step):
        n = min(step, rows - r)
        v = e4m3_as_f32(q[r:r + n], work[:n])
        if out_dtype == torch.float32:
            torch.mul(v, col_scale[r // quant.WEIGHT_BLOCK[0]], out=out[r:r + n])
        else:
            out[r:r + n].copy_(v.mul_(col_scale[r // quant.WEIGHT_BLOCK[0]]))
    return restore_nan_codes(q, out)


def _column_scales(s: torch.Tensor, k: int) -> torch.Tensor:
    """A block scale's rows spread over the k columns, times 2**120 (the bit trick's bias: exact,
    a power of two)."""
    return (s * _UNBIAS).repeat_interleave(quant.WEIGHT_BLOCK[1], dim=1)[:, :k]


def _amax_rows(x: torch.Tensor, amax: torch.Tensor) -> torch.Tensor:
    """amax |x| per row of a 2-d piece, into `amax`: max(max x, -min x), two reductions that
    write nothing (cheaper than |x| then its max; NaN and Inf still come out non-finite)."""
    low = torch.amin(x, dim=-1)
    return torch.maximum(torch.amax(x, dim=-1, out=amax), low.neg_(), out=amax)


def _to_int8(x: torch.Tensor, scale: torch.Tensor, work: torch.Tensor, out: torch.Tensor) -> None:
    """out = round(x / scale) (half to even), scale = max(amax, 1e-8) / 127 per row of a 2-d
    float32 piece, as quant.quantize_int8; `scale` holds the rows' amax |x| on entry, `work` is
    scratch of x's shape (x itself may be it). No clamp to +-127 is needed: |x| <= amax, so
    |x| / scale <= 127 * (1 + 2**-24), which rounds to at most 127."""
    scale.clamp_min_(1e-8).div_(quant.INT8_MAX)
    out.copy_(torch.div(x, scale.unsqueeze(-1), out=work).round_())


def fp8_to_int8_rows(q: torch.Tensor, s: torch.Tensor, out: torch.Tensor | None = None
                     ) -> tuple[torch.Tensor, torch.Tensor] | None:
    """quant.quantize_int8 of the FP8 rows `q` decoded with the block scale rows `s`, piece by
    piece: each piece is decoded (the bit trick, times its column scales, as `_dequant_fp8`) and
    encoded (as `_quantize_int8`) while it is in cache, into `out` (int8, q's shape) or a fresh
    tensor. Returns (int8 rows, scale per row), or None where the bit trick does not apply or q
    holds a NaN code: the two-step path then gives the contract's answer (it refuses NaN)."""
    with _one_thread():
        if not _fast_fp8(q, s, torch.float32) or has_nan_codes(q):
            return None
        rows, k = q.shape
        out = torch.empty(rows, k, dtype=torch.int8) if out is None else out
        scale = torch.empty(rows, dtype=torch.float32)
        if kernels.enabled() and q.is_contiguous() and out.is_contiguous():
            kernels.fp8_to_int8(q, s.contiguous(), out, scale)
            return out, scale
        col_scale = _column_scales(s, k)
        step = _piece_rows(k)
        work = torch.empty(min(step, rows), k, dtype=torch.int32)
        for r in range(0, rows, step):
            n = min(step, rows - r)
            x = e4m3_as_f32(q[r:r + n], work[:n]).mul_(col_scale[r // quant.WEIGHT_BLOCK[0]])
            _to_int8(x, _amax_rows(x, scale[r:r + n]), x, out[r:r + n])
        return out, scale


def _quantize_int8(x: torch.Tensor, out: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """quant.quantize_int8 of a 2-d float32 x, piece by piece with the same float32 operations,
    into `out` or a fresh tensor; NaN / Inf go to the contract, which rejects them."""
    rows, k = x.shape
    q = torch.empty(rows, k, dtype=torch.int8) if out is None else out
    scale = torch.empty(rows, dtype=torch.float32)
    step = max(1, _SUB_ELEMENTS // max(k, 1))
    work = torch.empty(min(step, rows), k, dtype=torch.float32)
    for r in range(0, rows, step):
        n = min(step, rows - r)
        if not bool(torch.isfinite(_amax_rows(x[r:r + n], scale[r:r + n])).all()):
            return quant.quantize_int8(x)
        _to_int8(x[r:r + n], scale[r:r + n], work[:n], q[r:r + n])
    return q, scale


def _w8a8_pieces(q: torch.Tensor, scale: torch.Tensor) -> list[torch.Tensor]:
    """msmodelslim's W8A8 pieces: int8 weight, scale [N, 1], offset [N, 1] (zeros: symmetric)."""
    s = scale.unsqueeze(1)
    return [q, s, torch.zeros_like(s)]


def encode_rows(encode: str, x: torch.Tensor, extra: dict, out: torch.Tensor | None = None) -> list[torch.Tensor]:
    """Target pieces for a row chunk: [main, *side pieces] (side pieces concatenate along dim 0).
    `out`: where an int8 main piece goes (else a fresh tensor)."""
    with _one_thread():
        if encode == "bf16":
            return [x]  # decoded straight to BF16
        if encode == "fp8":
            q, s = quant.quantize_fp8(x, quant.WEIGHT_BLOCK, extra["scale_fmt"])
            return [q, s]
        if encode == "int8":
            return _w8a8_pieces(*(_quantize_int8(x, out) if x.dtype == torch.float32 and x.dim() == 2
                                  else quant.quantize_int8(x)))
        if encode == "mxfp8":
            q, s = quant.quantize_fp8(x, (1, MX_BLOCK), "ue8m0")
            return [q, s.to(torch.float8_e8m0fnu)]  # exact: s is a power of two
    raise ValueError(encode)
