"""CPU cost of the converter's FP8 -> BF16 decode and FP8 -> W8A8 one-pass decode + encode: the
compiled kernels it uses (conversion/_kernels.c: AVX2 loops, portable loops) against its torch
path (the eager bit trick, `V4HAL_CONVERT_KERNELS=0`) and, for BF16, inductor-compiled
candidates (`torch.compile` on CPU), per piece as the converter decodes: CPU nanoseconds per
element (= CPU seconds per GB of FP8 input), thread CPU time, best of 5, all in one process,
interleaved. Each candidate is first checked bit for bit against the torch path on every e4m3
code (NaN codes included for BF16); one that differs is reported, not timed.

    OMP_NUM_THREADS=1 python -m v4hal.bench.convert_decode [--k 7168]

Not a test: prints two Markdown tables with the machine and its load average. The inductor
candidates (docs/conversion.md, "Tried and dropped") are why the decode is C, not compiled torch.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import time

import torch

from v4hal.conversion import formats, kernels
from v4hal.ops.e4m3 import e4m3_as_f32, restore_nan_codes


def compiled_int_bits(q, col, out):
    """Integer-only e4m3 -> float32 construction from the uint8 codes, one fused loop."""
    b = q.to(torch.int32)
    e, m = (b >> 3) & 0xF, b & 7
    units = torch.where(e == 0, m << 1, (m | 8) << e)  # |value| in units of 2**-10, an exact integer
    mag = units.to(torch.float32) * 2.0 ** -10
    val = torch.where((b & 0x7F) == 0x7F, float("nan"), torch.where(b >= 128, -mag, mag))
    out.copy_(val * col)


def compiled_float_codes(c, col, out):
    """From the codes as float32 (an eager widening, timed with it): float-only arithmetic, the
    power of two from compares and blends (exp2 alone costs more than the eager decode)."""
    neg = c >= 128
    c7 = torch.where(neg, c - 128, c)
    ep = torch.clamp_min(torch.floor(c7 * 0.125), 1)
    k = ep - 1
    b3 = k >= 8
    k = torch.where(b3, k - 8, k)
    b2 = k >= 4
    k = torch.where(b2, k - 4, k)
    b1 = k >= 2
    k = torch.where(b1, k - 2, k)
    units = (c7 - 8 * ep + 8) * (k + 1) * torch.where(b1, 4.0, 1.0) * torch.where(b2, 16.0, 1.0) * torch.where(b3, 256.0, 1.0)
    mag = units * 2.0 ** -9
    val = torch.where(c7 == 127, float("nan"), torch.where(neg, -mag, mag))
    out.copy_(val * col)


def compiled_scale_and_round(v, col, out):
    """The eager bit trick's float32 (value * 2**-120), then scale and BF16 rounding fused."""
    out.copy_(v * col)


def cpu_ns_per_element(fn, elements: int, n: int = 30) -> float:
    fn()
    best = float("inf")
    for _ in range(5):
        t = time.thread_time()
        for _ in range(n):
            fn()
        best = min(best, (time.thread_time() - t) / n / elements * 1e9)
    return best


@contextlib.contextmanager
def kernel_mode(mode: str):
    """V4HAL_CONVERT_KERNELS=mode while the block runs (1: AVX2 where the CPU has it, portable, 0: torch)."""
    before = os.environ.get("V4HAL_CONVERT_KERNELS")
    os.environ["V4HAL_CONVERT_KERNELS"] = mode
    try:
        yield
    finally:
        os.environ.pop("V4HAL_CONVERT_KERNELS") if before is None else os.environ.__setitem__("V4HAL_CONVERT_KERNELS", before)


def in_mode(mode: str, fn):
    def run():
        with kernel_mode(mode):
            return fn()
    return run


MODES = {"0": "torch path (eager bit trick; V4HAL_CONVERT_KERNELS=0)", "1": "compiled kernel, AVX2 loops",
         "portable": "compiled kernel, portable loops"}


def print_table(title: str, rows, elements: int) -> None:
    print(f"| {title} | bits equal the torch path (all 256 codes) | CPU ns per element (s per GB), best of 5 x 3 |")
    print("|---|---|---|")
    timings = {name: [] for name, _, _ in rows}
    for _ in range(3):  # interleaved
        for name, same, fn in rows:
            if same is not False:
                timings[name].append(cpu_ns_per_element(fn, elements))
    for name, same, _ in rows:
        figures = ", ".join(f"{v:.2f}" for v in timings[name]) or "-"
        print(f"| {name} | {'reference' if same is None else same} | {figures} |")
    print()


def w8a8_rows(fin_q: torch.Tensor, scale: torch.Tensor) -> list:
    with kernel_mode("0"):
        want_q, want_s = formats.fp8_to_int8_rows(fin_q, scale)
    out = torch.empty_like(want_q)
    rows = []
    for mode, name in MODES.items():
        run = in_mode(mode, lambda: formats.fp8_to_int8_rows(fin_q, scale, out))
        got_q, got_s = run()
        rows.append((name, None if mode == "0" else bool(torch.equal(got_q, want_q) and torch.equal(got_s, want_s)), run))
    return rows


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--k", type=int, default=7168, help="columns of the piece (128 rows)")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    gen = torch.Generator().manual_seed(0)
    codes = torch.randint(0, 256, (128, args.k), dtype=torch.uint8, generator=gen)
    codes.view(-1)[:256] = torch.arange(256, dtype=torch.uint8)
    scale = torch.rand(1, -(-args.k // 128), generator=gen) * 1e-3
    col = formats._column_scales(scale, args.k)[0]  # times 2**120, the bit trick's bias
    q = codes.view(torch.float8_e4m3fn)
    with kernel_mode("0"):
        want = formats._dequant_fp8(q, scale, torch.bfloat16)
    finite = torch.where((codes & 0x7F) == 0x7F, codes & 0xF0, codes)  # timing: no NaN codes, as in checkpoints
    out = torch.empty_like(want)
    as_float, bits = torch.empty(codes.shape), torch.empty(codes.shape, dtype=torch.int32)
    fin_q = finite.view(torch.float8_e4m3fn)

    def same_as_want() -> bool:
        nan = want.isnan()
        return torch.equal(nan, out.isnan()) and torch.equal(want[~nan].view(torch.int16), out[~nan].view(torch.int16))

    rows = []
    for mode, name in MODES.items():
        if mode != "0":
            if not kernels.enabled():
                continue  # not built here: kernels.describe() says why (printed below)
            with kernel_mode(mode):
                formats._dequant_fp8(q, scale, torch.bfloat16, out)
        rows.append((name, None if mode == "0" else same_as_want(), in_mode(mode, lambda: formats._dequant_fp8(fin_q, scale, torch.bfloat16, out))))
    for name, fn, check, run in (
            ("compiled: integer-only bit construction from uint8", compiled_int_bits,
             lambda c: c(codes, col / 2.0 ** 120, out), lambda c: lambda: c(finite, col / 2.0 ** 120, out)),
            ("compiled: float arithmetic from eagerly widened codes", compiled_float_codes,
             lambda c: c(as_float.copy_(codes), col / 2.0 ** 120, out),
             lambda c: lambda: c(as_float.copy_(finite), col / 2.0 ** 120, out)),
            ("eager bit trick + compiled scale and BF16 rounding", compiled_scale_and_round,
             lambda c: (c(e4m3_as_f32(q, bits), col, out), restore_nan_codes(q, out)),
             lambda c: lambda: c(e4m3_as_f32(fin_q, bits), col, out))):
        t = time.process_time()
        compiled = torch.compile(fn, dynamic=False)
        check(compiled)
        compile_s = time.process_time() - t
        rows.append((f"{name} (compile {compile_s:.1f} CPU s)", same_as_want(), run(compiled)))
    load = os.getloadavg()[0]
    print(f"Machine: {os.cpu_count()} logical cores, torch {torch.__version__}, "
          f"{torch.backends.cpu.get_cpu_capability()}, load average {load:.1f} before; piece 128 x {args.k}\n")
    print(f"kernels: {kernels.describe()}\n")
    print_table("FP8 -> BF16 decode", rows, codes.numel())
    if kernels.enabled():
        print_table("FP8 -> W8A8, decode + encode in one pass", w8a8_rows(fin_q, scale), codes.numel())
    print(f"load average {os.getloadavg()[0]:.1f} after")


if __name__ == "__main__":
    main()
