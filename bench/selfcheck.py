"""`v4hal selfcheck --out DIR`: the one device check (issue 21), prepared so that a short GPU slot
runs it once and still has time to run it again.

On the accelerator present (the `cuda` backend if torch.cuda.is_available(), else the CPU backends
`cpu_fast` and `cpu`) it runs, in this order and within one time budget (`--budget-s`):

1. backends: `v4hal info`'s report (backends, versions, the backend each op gets);
2. parity: every op's parity case (bench/cases_*.py) against the float64 cpu reference;
3. models: the tiny-v4, tiny-v32 and bench-v4 models' logits against the float64 cpu reference;
4. decode: bench-v4 decode steps, eager and through `StaticDecoder` (compiled at full size):
   the static step's logits against eager's, ms per step of each;
5. speed: a short list of speed cases, each with its same-run peers (F.linear in BF16, cuBLAS's
   block-scaled F.scaled_mm and the per-tensor torch._scaled_mm for fp8_matmul, SDPA over all
   rows for sparse attention, the dequantize-then-attend path and a BF16 cache for attention over
   the FP8 KV cache, transformers for the model decode step; on a GPU also the torch paths the
   Triton kernels replace, and the Triton FP8 GEMM timed on its own: bench/peers_cuda.py).

Sizes: `full` (the default on a GPU: every parity case, the real V4-Flash / V4-Pro / V3.2 shapes
included) or `small` (the default on CPU: the quick cases, short contexts, and the static decoder
left eager, because torch.compile takes minutes on a loaded 2-core CPU).

Each section gets a share of the time left when it starts; one that runs out keeps the rows it has
and says it was cut. Writes selfcheck.json, selfcheck.md and selfcheck.png (speedups over peers).
Exit codes (docs/cli.md): 0 every check that ran passed, 1 one failed, 2 bad input.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import signal
import statistics
import sys
import threading
import time
from pathlib import Path

import torch

from v4hal.backends import registry
from v4hal.bench import cases_model, parity, peers_cuda, speed
from v4hal.bench.cases import SpeedCase, Tolerance, parity_cases, speed_cases
from v4hal.bench.machine import describe, limits, synchronize
from v4hal.bench.metrics import judge, metrics

SECTIONS = ("backends", "parity", "models", "decode", "speed")
# Shares of the time left when a section starts. The backend report is not time-boxed: it probes
# every backend, and an import of a vendor package (mindspore) interrupted midway can crash Python.
SHARES = {"backends": 0.0, "parity": 0.35, "models": 0.15, "decode": 0.2, "speed": 0.3}


@dataclasses.dataclass(frozen=True)
class Size:
    quick_parity: bool
    bench_tokens: int        # bench-v4 logits parity: sequence length (window and HCA ratio are 128)
    decode_context: int      # decode section: prefill length before the timed steps
    decode_steps: int
    compile: bool            # StaticDecoder compiled (True) or its fixed-shape step run eagerly
    fp8_shapes: tuple        # fp8_matmul speed cases (M, N, K)
    speed_ids: tuple         # other speed cases by id, from bench/cases_*.py
    model_decode_context: int | None  # model decode vs transformers at this context (None: the ids say)
    roofline: bool           # measure the device's limits (bench.machine.limits: minutes of BF16 GEMM on CPU)


SIZES = {
    "full": Size(False, 640, 1024, 16, True, ((1, 4096, 4096), (4, 7168, 7168), (2048, 4096, 4096)),
                 ("sparse_attention/v4-flash/decode-N8192", "sparse_attention/v4-flash/decode-N32768",
                  "sparse_attention/v4-flash/decode-N32768-bf16", "indexer_select/v4-flash/decode-T32768",
                  "sparse_attention_fp8kv/v4-flash/decode-N32768", "indexer_scores_fp8kv/v4-flash/decode-T32768",
                  "hc_pre+hc_post/T2048-n4-D4096",
                  "model_decode/bench-v4/16k-context", "model_decode/bench-v4/16k-context/compiled"), None, True),
    "small": Size(True, 160, 160, 4, False, ((1, 4096, 4096),), ("sparse_attention/v4-flash/decode-N8192",), 512,
                  False),
}


class OutOfTime(BaseException):
    """Raised by `time_box` (a BaseException, so the harnesses' `except Exception` lets it pass)."""


@contextlib.contextmanager
def time_box(seconds: float):
    """Interrupt the block after `seconds` (SIGALRM; the running torch op finishes first). A box
    inside another ends no later than the outer one, which runs on afterwards. Only in the main
    thread of a Unix process; elsewhere the section deadlines alone bound the run."""
    if threading.current_thread() is not threading.main_thread() or not hasattr(signal, "setitimer"):
        yield
        return

    def expire(signum, frame):
        raise OutOfTime(f"its time box of {seconds:.0f} s ran out")

    start = time.monotonic()
    previous = signal.signal(signal.SIGALRM, expire)
    outer_left, _ = signal.setitimer(signal.ITIMER_REAL, max(seconds, 0.01))
    if outer_left:
        signal.setitimer(signal.ITIMER_REAL, max(min(seconds, outer_left), 0.01))
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
        if outer_left:
            signal.setitimer(signal.ITIMER_REAL, max(outer_left - (time.monotonic() - start), 0.01))


def run_items(items: list, run_one, deadline: float, name=lambda item: item.id) -> tuple[list, str | None]:
    """Rows of `run_one(item)` for each item until `deadline` (time.monotonic()); the note says
    what was cut, or None."""
    rows: list = []
    for i, item in enumerate(items):
        left = deadline - time.monotonic()
        try:
            if left <= 0:
                raise OutOfTime("the section's time was spent")
            with time_box(left):
                rows.extend(run_one(item))
        except OutOfTime as exc:
            return rows, f"{name(item)} stopped ({exc}); {len(items) - i} of {len(items)} not finished"
    return rows, None


def device_backends() -> list[str]:
    return ["cuda"] if torch.cuda.is_available() else ["cpu_fast", "cpu"]


def _selected(cases: list, select: str | None) -> list:
    return [c for c in cases if select is None or select in c.id]


def parity_section(size: Size, backends: list[str], deadline: float, select: str | None = None) -> dict:
    cases = [c for c in parity_cases(quick=size.quick_parity, select=select) if c.op != "model_logits"]
    rows, cut = run_items(cases, lambda c: parity.run_case(c, backends), deadline)
    return {"rows": rows, "cut": cut}


def model_cases(size: Size, select: str | None = None) -> list:
    return _selected(cases_model.PARITY + [cases_model.logits_case("bench-v4", size.bench_tokens)], select)


def models_section(size: Size, backends: list[str], deadline: float, select: str | None = None) -> dict:
    rows, cut = run_items(model_cases(size, select), lambda c: parity.run_case(c, backends), deadline)
    return {"rows": rows, "cut": cut}


def _timed(fn, device: torch.device) -> tuple[torch.Tensor, float]:
    start = time.perf_counter()
    with torch.no_grad():
        out = fn()
    synchronize(device)
    return out, time.perf_counter() - start


def decode_check(backend: str, context: int, steps: int, compile: bool) -> dict:
    """bench-v4: prefill `context` tokens, then `steps` single-token steps eagerly and through
    StaticDecoder from the same cache; the static logits judged against eager's."""
    from v4hal.model.static import StaticDecoder

    row = {"case": f"bench-v4/decode-{context}-context", "backend": backend, "compiled": compile}
    with registry.forced(backend):
        device = registry.backend_module(backend).device()
        model = cases_model.model_for("bench-v4", device=str(device))
        ids = torch.randint(0, cases_model.BENCH_V4.vocab_size, (1, context + steps),
                            generator=torch.Generator().manual_seed(0)).to(device)
        cache = model.new_cache()
        with torch.no_grad():
            model(ids[:, :context], cache=cache, last_only=True)
            decoder = StaticDecoder(model, cache, capacity=context + steps + 1, compile=compile)
        tokens = [ids[:, i:i + 1] for i in range(context, context + steps)]
        eager = [_timed(lambda: model(t, cache=cache), device) for t in tokens]
        static = [_timed(lambda: decoder(t), device) for t in tokens]
    got, want = torch.cat([o for o, _ in static], 1).cpu(), torch.cat([o for o, _ in eager], 1).cpu().float()
    ok, note = judge(got, want, Tolerance("close", 1e-4, 1e-4))
    # The first static call compiles (when compile): it is reported apart, not in the median.
    return {**row, "status": "pass" if ok else "fail", "note": note, "metrics": metrics(got, want),
            "eager_ms": 1e3 * statistics.median(s for _, s in eager[1:] or eager),
            "static_ms": 1e3 * statistics.median(s for _, s in static[1:] or static),
            "first_static_call_s": static[0][1]}


def decode_section(size: Size, backends: list[str], deadline: float) -> dict:
    item = (size.decode_context, size.decode_steps, size.compile)
    rows, cut = run_items([item], lambda it: [decode_check(backends[0], *it)], deadline,
                          name=lambda it: f"decode-{it[0]}-context")
    return {"rows": rows, "cut": cut}


def _with_fp8_peers(case: SpeedCase, m: int, n: int, k: int, notes: list[str]) -> SpeedCase:
    def make(device):
        fn, peers = case.make(device)
        return fn, {**peers, **peers_cuda.fp8_peers(m, n, k, device, notes)}
    return dataclasses.replace(case, make=make)


def _triton_fp8_case(case: SpeedCase, m: int, n: int, k: int, notes: list[str]) -> SpeedCase:
    """The cuda backend's Triton GEMM on its own (the op itself takes cuBLAS where it can)."""
    def make(device):
        fn, why = peers_cuda.triton_fp8_matmul(m, n, k, device)
        if fn is None:
            raise registry.BackendError(why)
        return fn, peers_cuda.fp8_peers(m, n, k, device, notes)
    return dataclasses.replace(case, name=f"triton-kernel/{case.name}", make=make)


def speed_list(size: Size, notes: list[str], device: torch.device) -> list[SpeedCase]:
    """The section's cases: fp8_matmul with the cuBLAS FP8 peers where they run (else a note) and,
    on a GPU, the Triton GEMM beside it; the other cases with their own peers."""
    by_id = {c.id: c for c in speed_cases()}
    cases = []
    for m, n, k in size.fp8_shapes:
        case = by_id[f"fp8_matmul/M{m}-N{n}-K{k}"]
        cases.append(_with_fp8_peers(case, m, n, k, notes))
        if device.type == "cuda":
            cases.append(_triton_fp8_case(case, m, n, k, notes))
    cases += [by_id[i] for i in size.speed_ids]
    if size.model_decode_context:
        ctx = size.model_decode_context
        cases.append(SpeedCase("model_decode", f"bench-v4/{ctx}-context", cases_model.decode(ctx, chunk=ctx)))
    return cases


def speed_section(size: Size, backends: list[str], deadline: float, repeats: int) -> dict:
    backend, notes = backends[0], []
    device = registry.backend_module(backend).device()
    unmeasured = dict.fromkeys(("bandwidth_gbs", "bf16_tflops", "fp32_tflops"), float("nan"))
    machine = {"machine": describe(device), "limits": limits(str(device)) if size.roofline else unmeasured}
    if not size.roofline:
        notes.append("roofline limits not measured at this size: shares show as nan")
    rows, cut = run_items(speed_list(size, notes, device),
                          lambda c: [speed.run_case(c, backend, repeats, machine["limits"])], deadline)
    return {"rows": rows, "cut": cut, "machines": {backend: machine}, "notes": notes}


def status(section: dict) -> str:
    """fail: a row failed or the section crashed; unavailable: every row was (nothing checked)."""
    rows = section.get("rows", [])
    if section.get("error") or any(r.get("status") == "fail" for r in rows):
        return "fail"
    if rows and all(r.get("status") == "unavailable" for r in rows):
        return "unavailable"
    return "cut" if section.get("cut") else "pass"


def run_section(name: str, size: Size, backends: list[str], deadline: float, select: str | None,
                repeats: int) -> dict:
    from v4hal.backends.info import report as backend_report

    if name == "backends":
        return {"report": backend_report(), "cut": None}
    if name == "parity":
        return parity_section(size, backends, deadline, select)
    if name == "models":
        return models_section(size, backends, deadline, select)
    if name == "decode":
        return decode_section(size, backends, deadline)
    return speed_section(size, backends, deadline, repeats)


def run(size: Size, budget_s: float, only: tuple[str, ...] = SECTIONS, select: str | None = None,
        repeats: int = 5) -> dict:
    start = time.monotonic()
    end, backends = start + budget_s, device_backends()
    sections: dict[str, dict] = {}
    todo = [s for s in SECTIONS if s in only]
    for i, name in enumerate(todo):
        shares = sum(SHARES[s] for s in todo[i:]) or 1.0
        deadline = time.monotonic() + (end - time.monotonic()) * SHARES[name] / shares
        t0 = time.monotonic()
        box = contextlib.nullcontext() if name == "backends" else time_box(deadline - t0 + 5.0)
        try:  # the items are boxed by the deadline; this box also bounds a section's set-up
            with box:
                section = run_section(name, size, backends, deadline, select, repeats)
        except OutOfTime as exc:
            section = {"rows": [], "cut": f"stopped in its set-up ({exc})"}
        except Exception as exc:  # a crashed section is reported; the next ones still run
            section = {"rows": [], "cut": None, "error": f"{type(exc).__name__}: {exc}"}
        sections[name] = {**section, "status": status(section), "seconds": time.monotonic() - t0}
    skipped = {"status": "skipped", "cut": None, "note": "not in --only"}
    sections = {name: sections.get(name, skipped) for name in SECTIONS}
    return {"device_backends": backends, "machine": describe(registry.backend_module(backends[0]).device()),
            "budget_s": budget_s, "seconds": time.monotonic() - start, "sections": sections,
            "failed": [n for n, s in sections.items() if s["status"] in ("fail", "unavailable")],
            "cut": {n: s["cut"] for n, s in sections.items() if s["cut"]}}


# ------------------------------------------------------------------------------------- reports

def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)] + ["| " + " | ".join(r) + " |" for r in rows]


def _decode_row(r: dict) -> list[str]:
    if "eager_ms" not in r:
        return [r["case"], r["backend"], r["status"], "", "", "", "", r.get("note", "")]
    return [r["case"], r["backend"], r["status"], "compiled" if r["compiled"] else "eager (not compiled)",
            f"{r['eager_ms']:.3g}", f"{r['static_ms']:.3g}", f"{r['first_static_call_s']:.3g}",
            f"max_abs {r['metrics']['max_abs']:.2e}" + (f"; {r['note']}" if r["note"] else "")]


def format_markdown(result: dict, command: str) -> str:
    s = result["sections"]
    lines = ["# Device check", "", f"Command: `{command}`", "", f"- machine: {result['machine']}",
             f"- backends checked: {', '.join(result['device_backends'])}",
             f"- {result['seconds']:.0f} s of a {result['budget_s']:.0f} s budget",
             f"- failed sections: {', '.join(result['failed']) or 'none'}"]
    lines += [f"- **cut** {name}: {why}" for name, why in result["cut"].items()]
    lines += ["", "| section | status | seconds |", "|---|---|---|"]
    lines += [f"| {n} | {v['status']} | {v.get('seconds', 0):.1f} |" for n, v in s.items()]
    lines += [f"- **error** {n}: {v['error']}" for n, v in s.items() if v.get("error")]
    if "report" in s["backends"]:
        lines += ["", "## Backends", ""]
        lines += [f"- {b}: {'usable' if e['usable'] else 'unusable: ' + e['reason']}"
                  for b, e in s["backends"]["report"]["backends"].items()]
    for name in ("parity", "models"):
        if s[name].get("rows"):
            lines += ["", f"## {name.capitalize()} (against the float64 cpu reference)", ""]
            lines += _table(list(parity.COLUMNS), parity.table_rows(s[name]))
            lines += [f"- `{r['case']}` [{r['backend']}] {r['status']}: {r['note']}"
                      for r in s[name]["rows"] if r["status"] != "pass" and r.get("note")]
    if s["decode"].get("rows"):
        lines += ["", "## Decode: static step against eager", ""]
        lines += _table(["case", "backend", "status", "static step", "eager ms/step", "static ms/step",
                         "first static call s", "logits vs eager"], [_decode_row(r) for r in s["decode"]["rows"]])
    if s["speed"].get("rows"):
        lines += ["", "## Speed (speedup = peer / ours)", ""]
        lines += _table(speed.HEADER, [speed.format_row(r) for r in s["speed"]["rows"]])
        lines += [f"- {n}" for n in s["speed"]["notes"]]
    return "\n".join(lines) + "\n"


def write(result: dict, out: Path, command: str) -> list[Path]:
    out.mkdir(parents=True, exist_ok=True)
    paths = [out / "selfcheck.json", out / "selfcheck.md"]
    paths[0].write_text(json.dumps({**result, "command": command}, indent=1, default=str))
    paths[1].write_text(format_markdown(result, command))
    section = result["sections"]["speed"]
    if section.get("rows"):
        png = speed.plot({"machines": section["machines"], "rows": section["rows"]}, out / "selfcheck.png")
        paths += [png] if png else []
    return paths


def add_arguments(p) -> None:
    from v4hal.subcommand import at_least

    p.add_argument("--out", type=Path, required=True, help="folder for selfcheck.json / .md / .png")
    p.add_argument("--size", choices=tuple(SIZES), help="full: every parity case, real shapes, compiled decode "
                   "(default with CUDA); small: quick cases, short contexts, decode not compiled (default on CPU)")
    p.add_argument("--budget-s", type=at_least(1.0, float), default=300.0,
                   help="time for the whole run; sections cut by it say so (default 300)")
    p.add_argument("--only", action="append", choices=SECTIONS, help="run only this section (repeatable)")
    p.add_argument("--select", help="parity and model cases: only ids containing this text")
    p.add_argument("--repeats", type=at_least(1), default=5, help="timed calls per speed case")


def main(args) -> int:
    from v4hal.subcommand import CHECK_FAILED, OK, error

    size = SIZES[args.size or ("full" if torch.cuda.is_available() else "small")]
    only = tuple(args.only or SECTIONS)
    if args.select and {"parity", "models"} & set(only):
        found = [c for c in parity_cases(quick=size.quick_parity, select=args.select) if c.op != "model_logits"]
        if not found + model_cases(size, args.select):
            return error("selfcheck", f"--select {args.select!r}: no parity or model case id contains it")
    result = run(size, args.budget_s, only, args.select, args.repeats)
    command = "v4hal " + " ".join(sys.argv[1:])
    print(format_markdown(result, command))
    print("wrote " + ", ".join(str(p) for p in write(result, args.out, command)))
    return CHECK_FAILED if result["failed"] else OK
