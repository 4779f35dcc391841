"""Parity and speed cases for the quantized-matmul family and the basic ops (rms_norm, linear):
real V4-Flash / V4-Pro / V3.2 linear shapes plus small and ragged ones.

Judging: quantizers are compared through their dequantized values (a float32 and a float64
quantizer may round an element exactly at a midpoint differently: one e4m3 / e2m1 / int8 step is
allowed on at most 0.1% of the elements); quantized GEMMs use DeepGEMM's figure of merit with a
limit of 1e-5 (both sides share the quantized inputs, so only the GEMM's own rounding counts:
about 7e-4 is DeepGEMM's normal against an unquantized BF16 reference). Dense BF16 linears use it
too: with a bias, outputs near zero come from cancelling BF16-rounded terms, which no per-element
relative tolerance can judge.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from v4hal import ops
from v4hal.bench.cases import SHAPES, Case, SpeedCase, Tolerance, randn

GEMM = Tolerance("fp8", diff=1e-5)
EXACT = Tolerance("exact")
SCALE = Tolerance("close", rtol=1e-6, atol=0.0)
F32 = torch.float32


def _expand(scale: torch.Tensor, block: tuple[int, int], shape: tuple[int, ...]) -> torch.Tensor:
    bm, bk = block
    s = scale.double().repeat_interleave(bk, dim=-1)[..., : shape[-1]]
    return s.repeat_interleave(bm, dim=0)[: shape[0]] if bm > 1 else s


def _within_one_step(step_rel: float, share: float = 1e-3):
    """check(): dequantized values differ by at most one quantization step (`step_rel` of the
    value, or of the block scale for subnormal codes) on at most `share` of the elements."""

    def check(ref: dict, out: dict, inputs: dict) -> tuple[bool, str]:
        r, o = ref["dequant"].double(), out["dequant"].double()
        unit = out["unit"].double()
        diff = (r - o).abs()
        differ = diff > 0
        bound = step_rel * torch.maximum(r.abs(), o.abs()) + unit
        if bool((diff > bound).any()):
            return False, f"{int((diff > bound).sum())} element(s) off by more than one step"
        frac = float(differ.double().mean())
        return frac <= share, f"{frac:.2e} of elements one step apart" if frac else ""

    return check


# --------------------------------------------------------------------------- FP8 quantize / dequant

def _fp8_quant_compare(block):
    def compare(out):
        q, scale = out
        s = _expand(scale, block, tuple(q.shape))
        # one e4m3 step: 2**-3 relative for normals, 2**-9 of the scale for subnormals
        return {"dequant": q.double() * s, "scale": scale, "unit": s * 2.0 ** -9}

    return compare


def _fp8_quant_case(name, shape, block, fmt, quick, scale=1.0):
    def make(g):
        x = randn(g, *shape, scale=scale)
        if x.numel() > 4:  # exercise the e4m3 limit: one element is its block's amax exactly
            x.view(-1)[3] = -x.abs().max() * 1.5
        return dict(x=x, block=block, scale_fmt=fmt)

    return Case("quantize_fp8", f"{name}-{fmt}", ops.quantize_fp8, make,
                {"dequant": Tolerance("fp8", diff=1e-5), "scale": SCALE, "unit": SCALE}, quick=quick,
                compare=_fp8_quant_compare(block), check=_within_one_step(2.0 ** -3))


def _fp8_dequant_case(name, shape, block, out_dtype, quick):
    def make(g):
        q, s = ops.quantize_fp8(randn(g, *shape), block)
        return dict(q=q, scale=s, block=block, out_dtype=out_dtype)

    tol = Tolerance.for_dtype(out_dtype) if out_dtype != F32 else Tolerance("close", rtol=1.3e-6, atol=0.0)
    return Case("dequantize_fp8", f"{name}-{str(out_dtype)[6:]}", ops.dequantize_fp8, make, tol, quick=quick)


def _fp8_matmul_inputs(m: int, n: int, k: int, fmt: str = "fp32"):
    def make(g: torch.Generator) -> dict:
        a, a_s = ops.quantize_fp8(randn(g, m, k), (1, 128), fmt)
        b, b_s = ops.quantize_fp8(randn(g, n, k, scale=0.05), (128, 128), fmt)
        return dict(a=a, a_scale=a_s, b=b, b_scale=b_s, out_dtype=torch.bfloat16)

    return make


# (name, M, N, K, quick): small, ragged, a prefill-sized M, then real linear shapes (N, K).
_F, _P, _V = SHAPES["v4-flash"], SHAPES["v4-pro"], SHAPES["v3.2"]
FP8_SHAPES = [("small", 4, 256, 512, True), ("ragged", 3, 200, 300, True), ("tall", 40, 384, 640, True),
              ("batched", 2 * 3, 130, 257, True),
              ("v4-flash/q_a", 16, _F["q_lora"], _F["hidden"], False),
              ("v4-flash/o_b", 16, _F["hidden"], _F["o_lora"], False),
              ("v4-pro/q_a", 16, _P["q_lora"], _P["hidden"], False),
              ("v4-pro/o_b", 16, _P["hidden"], _P["o_lora"], False),
              ("v3.2/q_a", 16, _V["q_lora"], _V["hidden"], False),
              ("v3.2/kv_a", 16, _V["kv_lora"] + _V["rope_dim"], _V["hidden"], False)]
FP4_SHAPES = [("small", 4, 64, 256, True), ("ragged-n", 3, 70, 96, True),
              ("v4-flash/expert_up", 8, _F["moe_inter"], _F["hidden"], False),
              ("v4-pro/expert_down", 8, _P["hidden"], _P["moe_inter"], False)]

PARITY: list[Case] = []
PARITY += [_fp8_quant_case(name, shape, block, fmt, quick)
           for name, shape, block, quick in [("act-small", (4, 256), (1, 128), True),
                                             ("act-ragged-3d", (2, 3, 200), (1, 128), True),
                                             ("weight-small", (256, 384), (128, 128), True),
                                             ("weight-ragged", (200, 300), (128, 128), True),
                                             ("act-v4-pro", (16, _P["hidden"]), (1, 128), False),
                                             ("weight-v4-flash", (_F["q_lora"], _F["hidden"]), (128, 128), False)]
           for fmt in ("fp32", "ue8m0")]
PARITY += [_fp8_quant_case("act-tiny-values", (3, 256), (1, 128), "ue8m0", True, scale=1e-6)]
PARITY += [_fp8_dequant_case(name, shape, block, dt, quick)
           for name, shape, block, quick in [("weight-ragged", (200, 300), (128, 128), True),
                                             ("act-3d", (2, 3, 260), (1, 128), True),
                                             ("weight-v3.2", (_V["q_lora"], _V["hidden"]), (128, 128), False)]
           for dt in (torch.bfloat16, F32)]
PARITY += [Case("fp8_matmul", name, ops.fp8_matmul, _fp8_matmul_inputs(m, n, k), GEMM, quick=quick)
           for name, m, n, k, quick in FP8_SHAPES]
PARITY += [Case("fp8_matmul", "ragged-ue8m0", ops.fp8_matmul, _fp8_matmul_inputs(5, 136, 400, "ue8m0"), GEMM,
                quick=True)]


# ------------------------------------------------------------------------------------------- FP4

def _fp4_quant_compare(out):
    packed, scale = out
    s = scale.double().repeat_interleave(32, dim=-1)
    return {"dequant": _e2m1(packed) * s, "scale": scale, "unit": s * 0.5}


def _e2m1(packed: torch.Tensor) -> torch.Tensor:
    table = torch.tensor([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0], dtype=torch.float64, device=packed.device)
    codes = torch.stack((packed & 0xF, packed >> 4), dim=-1).flatten(-2).long()
    v = table[codes & 7]
    return torch.where(codes >= 8, -v, v)


def _fp4_weight(g, n, k, scale_dtype=F32):
    packed, scale = ops.quantize_fp4(randn(g, n, k, scale=0.05))
    if scale_dtype == torch.uint8:
        scale = (torch.log2(scale).round() + 127).to(torch.uint8)
    elif scale_dtype == torch.float8_e8m0fnu:
        scale = (torch.log2(scale).round() + 127).to(torch.uint8).view(torch.float8_e8m0fnu)
    return packed, scale


def _fp4_reference_inputs(inputs: dict) -> dict:
    """float64 for the float operands; the packed weight and its ue8m0 scale stay as they are
    (a float64 scale is not an MXFP4 scale format)."""
    keep = {"packed", "b", "scale", "b_scale", "weight"}
    out = {k: (v.double() if isinstance(v, torch.Tensor) and v.is_floating_point() and k not in keep
               and v.dtype != torch.float8_e4m3fn else v) for k, v in inputs.items()}
    if "out_dtype" in out:
        out["out_dtype"] = torch.float64
    if inputs.get("a_scale") is not None:
        out["a_scale"] = inputs["a_scale"].double()
    return out


def _fp4_matmul_inputs(m, n, k, fp8_act: bool):
    def make(g):
        b, b_s = _fp4_weight(g, n, k)
        if fp8_act:
            a, a_s = ops.quantize_fp8(randn(g, m, k), (1, 128))
        else:
            a, a_s = randn(g, m, k, dtype=torch.bfloat16), None
        return dict(a=a, b=b, b_scale=b_s, a_scale=a_s, out_dtype=torch.bfloat16)

    return make


PARITY += [Case("quantize_fp4", name, ops.quantize_fp4, (lambda shape: lambda g: dict(w=randn(g, *shape)))(shape),
                {"dequant": EXACT, "scale": EXACT, "unit": EXACT}, quick=quick, compare=_fp4_quant_compare,
                check=_within_one_step(0.5))
           for name, shape, quick in [("small", (8, 64), True), ("odd-rows", (7, 96), True),
                                      ("v4-flash/expert", (_F["moe_inter"], _F["hidden"]), False)]]
PARITY += [Case("dequantize_fp4", f"{name}-{str(sd)[6:]}",
                ops.dequantize_fp4,
                (lambda n, k, sd: lambda g: dict(zip(("packed", "scale"), _fp4_weight(g, n, k, sd)), out_dtype=F32))(n, k, sd),
                EXACT, quick=quick, reference_inputs=_fp4_reference_inputs)
           for name, n, k, quick in [("small", 8, 64, True), ("v4-pro/expert", _P["moe_inter"], _P["hidden"], False)]
           for sd in (F32, torch.uint8, torch.float8_e8m0fnu)]
PARITY += [Case("fp4_matmul", f"{name}-{'fp8' if fp8 else 'bf16'}-act", ops.fp4_matmul,
                _fp4_matmul_inputs(m, n, k, fp8), GEMM, quick=quick, reference_inputs=_fp4_reference_inputs)
           for name, m, n, k, quick in FP4_SHAPES for fp8 in (False, True)]


# ------------------------------------------------------------------------------------------ int8

def _int8_quant_compare(out):
    q, scale = out
    s = scale.double().unsqueeze(-1)
    return {"dequant": q.double() * s, "scale": scale, "unit": s}


PARITY += [Case("quantize_int8", name, ops.quantize_int8, (lambda shape: lambda g: dict(x=randn(g, *shape)))(shape),
                {"dequant": Tolerance("fp8", diff=1e-5), "scale": SCALE, "unit": SCALE}, quick=quick,
                compare=_int8_quant_compare, check=_within_one_step(0.0))
           for name, shape, quick in [("tokens", (5, 300), True), ("3d", (2, 3, 64), True),
                                      ("v4-pro/weight", (_P["q_lora"], _P["hidden"]), False)]]


def _int8_matmul_inputs(m, n, k):
    def make(g):
        a, a_s = ops.quantize_int8(randn(g, m, k))
        b, b_s = ops.quantize_int8(randn(g, n, k, scale=0.05))
        return dict(a=a, a_scale=a_s, b=b, b_scale=b_s, out_dtype=torch.bfloat16)

    return make


PARITY += [Case("int8_matmul", name, ops.int8_matmul, _int8_matmul_inputs(m, n, k), GEMM, quick=quick)
           for name, m, n, k, quick in [("small", 4, 64, 256, True), ("ragged", 3, 70, 130, True),
                                        ("v4-flash/q_a", 16, _F["q_lora"], _F["hidden"], False),
                                        ("v3.2/q_a", 16, _V["q_lora"], _V["hidden"], False)]]


# ------------------------------------------------------------------------------- rms_norm, linear

def _rms_inputs(shape, dtype, weighted):
    def make(g):
        return dict(x=randn(g, *shape, dtype=dtype, scale=3.0),
                    weight=randn(g, shape[-1], dtype=dtype) if weighted else None, eps=1e-6)

    return make


PARITY += [Case("rms_norm", f"{name}-{str(dt)[6:]}{'' if w else '-unweighted'}", ops.rms_norm,
                _rms_inputs(shape, dt, w), Tolerance.for_dtype(dt), quick=quick)
           for name, shape, quick in [("small", (3, 5, 64), True), ("v4-pro/hidden", (16, _P["hidden"]), False)]
           for dt in (torch.bfloat16, F32) for w in (True, False)]


def _linear_inputs(m, n, k, fmt, bias=False):
    def make(g):
        x = randn(g, m, k, dtype=torch.bfloat16)
        w = randn(g, n, k, scale=0.05)
        if fmt == "dense":
            weight, scale = w.bfloat16(), None
        elif fmt.startswith("fp8"):
            weight, scale = ops.quantize_fp8(w, (128, 128))
        elif fmt == "fp4":
            weight, scale = ops.quantize_fp4(w)
        else:
            weight, scale = ops.quantize_int8(w)
        return dict(x=x, weight=weight, scale=scale, bias=randn(g, n, dtype=torch.bfloat16) if bias else None,
                    act_scale_fmt="ue8m0" if fmt == "fp8-ue8m0" else "fp32")

    return make


LINEAR_SHAPES = [("small", 4, 96, 256, True), ("ragged", 3, 136, 320, True),
                 ("v4-flash/q_a", 16, _F["q_lora"], _F["hidden"], False),
                 ("v3.2/kv_a", 16, _V["kv_lora"] + _V["rope_dim"], _V["hidden"], False)]
PARITY += [Case("linear", f"{name}-{fmt}", ops.linear, _linear_inputs(m, n, k, fmt, bias=(name == "ragged")),
                GEMM, quick=quick,
                reference_inputs=_fp4_reference_inputs if fmt == "fp4" else None)
           for name, m, n, k, quick in LINEAR_SHAPES for fmt in ("dense", "fp8", "fp8-ue8m0", "fp4", "int8")
           if not (fmt == "fp4" and k % 32)]


# ---------------------------------------------------------------------------------------- speed

def _fp8_speed(m: int, n: int, k: int):
    def make(device: torch.device):
        g = torch.Generator().manual_seed(0)
        x, w = randn(g, m, k).to(device), randn(g, n, k, scale=0.05).to(device)
        a, a_s = ops.quantize_fp8(x, (1, 128))
        b, b_s = ops.quantize_fp8(w, (128, 128))
        x16, w16 = x.bfloat16(), w.bfloat16()
        return (lambda: ops.fp8_matmul(a, a_s, b, b_s)), {"F.linear bf16": lambda: F.linear(x16, w16)}

    return make


def _fp4_speed(m: int, n: int, k: int):
    def make(device: torch.device):
        g = torch.Generator().manual_seed(0)
        x, w = randn(g, m, k, dtype=torch.bfloat16).to(device), randn(g, n, k, scale=0.05).to(device)
        b, b_s = ops.quantize_fp4(w)
        w16 = w.bfloat16()
        return (lambda: ops.fp4_matmul(x, b, b_s)), {"F.linear bf16": lambda: F.linear(x, w16)}

    return make


def _int8_speed(m: int, n: int, k: int):
    def make(device: torch.device):
        g = torch.Generator().manual_seed(0)
        x, w = randn(g, m, k).to(device), randn(g, n, k, scale=0.05).to(device)
        a, a_s = ops.quantize_int8(x)
        b, b_s = ops.quantize_int8(w)
        x16, w16 = x.bfloat16(), w.bfloat16()
        return (lambda: ops.int8_matmul(a, a_s, b, b_s)), {"F.linear bf16": lambda: F.linear(x16, w16)}

    return make


def _linear_speed(m: int, n: int, k: int):
    def make(device: torch.device):
        g = torch.Generator().manual_seed(0)
        x, w = randn(g, m, k, dtype=torch.bfloat16).to(device), randn(g, n, k, scale=0.05).to(device)
        q, s = ops.quantize_fp8(w, (128, 128))
        w16 = w.bfloat16()
        return (lambda: ops.linear(x, q, s)), {"F.linear bf16": lambda: F.linear(x, w16)}

    return make


def _dense_linear_speed(m: int, n: int, k: int):
    """float32 `ops.linear` (cpu_fast: ATen GEMV / oneDNN, backends/cpu_fast/basic.py) against
    torch's own F.linear (MKL on a CPU build)."""
    def make(device: torch.device):
        g = torch.Generator().manual_seed(0)
        x, w = randn(g, m, k).to(device), randn(g, n, k, scale=0.05).to(device)
        return (lambda: ops.linear(x, w)), {"F.linear f32": lambda: F.linear(x, w)}

    return make


def _gemm(name, op, make, m, n, k, weight_bytes_per_element, quick, act_bytes=1, out_bytes=2):
    return SpeedCase(op, name, make, flops=2 * m * n * k,
                     bytes=act_bytes * m * k + math.ceil(n * k * weight_bytes_per_element) + out_bytes * m * n,
                     quick=quick)


SPEED = [_gemm(f"M{m}-N{n}-K{k}", "fp8_matmul", _fp8_speed(m, n, k), m, n, k, 1, m <= 8 and n == 4096)
         for m, n, k in [(1, 4096, 4096), (4, 4096, 4096), (8, 4096, 4096), (1, 7168, 7168), (4, 7168, 7168),
                         (8, 7168, 7168), (2048, 4096, 4096)]]
SPEED += [_gemm(f"M{m}-N{n}-K{k}", "fp4_matmul", _fp4_speed(m, n, k), m, n, k, 0.5 + 1 / 32, m <= 8)
          for m, n, k in [(8, _F["moe_inter"], _F["hidden"]), (256, _F["moe_inter"], _F["hidden"])]]
SPEED += [_gemm(f"M{m}-N{n}-K{k}", "int8_matmul", _int8_speed(m, n, k), m, n, k, 1, m <= 8)
          for m, n, k in [(8, 4096, 4096), (2048, 4096, 4096)]]
SPEED += [_gemm(f"fp8-M{m}-N{n}-K{k}", "linear", _linear_speed(m, n, k), m, n, k, 1, m <= 8)
          for m, n, k in [(1, 4096, 4096), (2048, 4096, 4096)]]
SPEED += [_gemm(f"f32-M{m}-N{n}-K{k}", "linear", _dense_linear_speed(m, n, k), m, n, k, 4, m == 1 and n * k < 2 ** 20,
                act_bytes=4, out_bytes=4)
          for m, n, k in [(1, 1536, 512), (1, 4096, 4096), (512, 1536, 512), (2048, 4096, 4096)]]
