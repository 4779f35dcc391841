"""Compile the cuda backend's Triton kernels ahead of time for NVIDIA targets, on a machine with
no GPU: triton ships ptxas, so `triton.compile` takes a kernel to a cubin for any `GPUTarget`.

Run as a script (a process without TRITON_INTERPRET, which would make the kernels interpreted
functions): `python tests/triton_compile_util.py` prints one JSON line per (kernel, target,
configuration): the shared memory the cubin needs and its size. The arguments are the ones the
host wrappers pass, recorded by calling the wrappers on meta tensors of the real model shapes
with each kernel swapped for a recorder, so the compiled signature is the launched one."""

from __future__ import annotations

import json

import torch

# What each cuda arch lets one block use (bytes of shared memory, opt-in maximum).
SHARED_LIMIT = {80: 166912, 89: 101376, 90: 232448}
TYPES = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32", torch.int32: "i32",
         torch.int64: "i64", torch.float8_e4m3fn: "fp8e4nv", torch.uint8: "u8"}


class Recorder:
    """Stands in for a kernel: `kernel[grid](*args, **constexprs)` records the launch."""

    def __init__(self, kernel):
        self.kernel, self.launches = kernel, []

    def __getitem__(self, grid):
        return lambda *args, **constexprs: self.launches.append((args, constexprs))


def signature(kernel, args, constexprs) -> dict:
    sig = {}
    for name, arg in zip(kernel.arg_names, args):
        if isinstance(arg, torch.Tensor):
            sig[name] = "*" + TYPES[arg.dtype]
        elif isinstance(arg, int):
            sig[name] = "i32" if abs(arg) < 2**31 else "i64"
        else:
            sig[name] = "fp32"
    return {**sig, **dict.fromkeys(constexprs, "constexpr")}


def launches(module, kernel_name: str, call) -> list:
    """(kernel, args, constexprs) of every launch `call()` makes of `module.kernel_name`."""
    recorder = Recorder(getattr(module, kernel_name))
    setattr(module, kernel_name, recorder)
    try:
        call()
    finally:
        setattr(module, kernel_name, recorder.kernel)
    return [(recorder.kernel, args, consts) for args, consts in recorder.launches]


def meta(*shape, dtype=torch.bfloat16):
    return torch.empty(*shape, dtype=dtype, device="meta")


def model_launches() -> list:
    """The launches of the real shapes: V4-Flash (64 heads x 512) and V3.2 (128 heads, 576 / 512)
    decode attention in bf16 and fp32, one and several slices, with and without sink; the
    V4-Flash indexer; V4's mHC (4 streams of 4096, bf16); FP8 GEMMs at decode and prefill tile
    sizes, narrow and wide columns; attention over FP8 caches (V4-Flash on the v4 layout, V3.2 on
    v3.2, bf16 and fp32 queries, one and several slices) and the V4-Flash indexer over index keys."""
    from v4hal import ops
    from v4hal.backends.cuda import triton_attention as ta
    from v4hal.backends.cuda import triton_kv_cache as tk
    from v4hal.backends.cuda import triton_mhc as tm
    from v4hal.backends.cuda import triton_quant as tq

    out = []
    for dtype in (torch.bfloat16, torch.float32):
        for heads, d, v_dim, splits, sink in ((64, 512, 512, 1, True), (64, 512, 512, 4, True), (128, 576, 512, 1, False)):
            out += launches(ta, "_sparse_attention", lambda: ta.sparse_attention(
                meta(1, 1, heads, d, dtype=dtype), meta(1, 4096, d, dtype=dtype), meta(1, 1, 640, dtype=torch.int32),
                0.05, meta(heads, dtype=dtype) if sink else None, v_dim, splits=splits))
        out += launches(ta, "_indexer_scores", lambda: ta.indexer_scores(
            meta(1, 1, 64, 128, dtype=dtype), meta(1, 8192, 128, dtype=dtype), meta(1, 1, 64, dtype=dtype), 0.01))
    for dtype in (torch.bfloat16, torch.float32):
        for name, heads, splits, sink in (("v4", 64, 1, True), ("v4", 64, 4, True), ("v3.2", 128, 1, False)):
            lay = ops.KV_LAYOUTS[name]
            out += launches(tk, "_sparse_attention_fp8kv", lambda: tk.sparse_attention_fp8kv(
                meta(1, 1, heads, lay.dim, dtype=dtype), ops.kv_cache_fp8_empty(64, 64, name, device="meta"),
                meta(1, 1, 640, dtype=torch.int32), 0.05, lay, meta(heads, dtype=dtype) if sink else None, 512,
                splits=splits))
        out += launches(tk, "_indexer_scores_fp8kv", lambda: tk.indexer_scores_fp8kv(
            meta(1, 1, 64, 128, dtype=dtype), ops.kv_cache_fp8_empty(128, 64, "index", device="meta"),
            meta(1, 8192, dtype=torch.int64), meta(1, 1, 64, dtype=dtype), 0.01, ops.KV_LAYOUTS["index"]))
    out += launches(tm, "_hc_pre", lambda: tm.hc_pre(meta(1, 4, 4096), meta(24, 4 * 4096, dtype=torch.float32),
                                                     meta(3, dtype=torch.float32), meta(24, dtype=torch.float32),
                                                     1e-6, 1e-6, 20))
    fp8 = torch.float8_e4m3fn
    for m, block_n in ((1, 32), (1, 128), (2048, 128)):
        out += launches(tq, "_fp8_block_scaled_mm", lambda: tq.fp8_matmul(
            meta(m, 4096, dtype=fp8), meta(m, 32, dtype=torch.float32), meta(4096, 4096, dtype=fp8),
            meta(32, 32, dtype=torch.float32), torch.bfloat16, block_n=block_n))
    return out


def targets(kernel) -> tuple[int, ...]:
    """The archs the cuda backend runs `kernel` on: FP8 tensor cores from sm89, the rest from sm80."""
    return (89, 90) if kernel.__name__ == "_fp8_block_scaled_mm" else (80, 90)


def main() -> None:
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    for kernel, args, consts in model_launches():
        for arch in targets(kernel):
            compiled = triton.compile(ASTSource(kernel, signature(kernel, args, consts), constexprs=consts),
                                      target=GPUTarget("cuda", arch, 32))
            print(json.dumps({"kernel": kernel.__name__, "arch": arch, "constexprs": consts,
                              "shared": compiled.metadata.shared, "cubin_bytes": len(compiled.asm["cubin"])}),
                  flush=True)


if __name__ == "__main__":
    main()
