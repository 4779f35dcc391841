"""Parity metrics (docs/parity.md): cosine, max abs/rel error, RMSE, the share of elements within 1/1000
and 1/100 relative error (msprobe's "dual thousandth"), and DeepGEMM's FP8 diff. All in float64."""

from __future__ import annotations

import torch

from v4hal.bench.cases import Tolerance

_TINY = 1e-30


def metrics(out: torch.Tensor, ref: torch.Tensor) -> dict[str, float]:
    x = out.detach().cpu().to(torch.float64).flatten()
    y = ref.detach().cpu().to(torch.float64).flatten()
    if x.numel() == 0:
        return {"numel": 0, "nan": 0}
    err = (x - y).abs()
    rel = err / y.abs().clamp_min(_TINY)
    xy, xx, yy = float(x @ y), float(x @ x), float(y @ y)
    return {
        "numel": x.numel(),
        "nan": int(torch.isnan(x).sum()),
        "cosine": xy / max((xx * yy) ** 0.5, _TINY) if xx > 0 or yy > 0 else 1.0,
        "max_abs": float(err.max()),
        "max_rel": float(rel.max()),
        "rmse": float(err.pow(2).mean().sqrt()),
        "within_1e-3": float((rel <= 1e-3).double().mean()),
        "within_1e-2": float((rel <= 1e-2).double().mean()),
        "fp8_diff": 1.0 - 2.0 * xy / (xx + yy) if xx + yy > 0 else 0.0,
    }


def judge(out: torch.Tensor, ref: torch.Tensor, tol: Tolerance) -> tuple[bool, str]:
    """(passed, note). Shapes must match; NaN in the output never passes."""
    if tuple(out.shape) != tuple(ref.shape):
        return False, f"shape {tuple(out.shape)} != reference {tuple(ref.shape)}"
    x = out.detach().cpu().to(torch.float64)
    y = ref.detach().cpu().to(torch.float64)
    if torch.isnan(x).any():
        return False, f"{int(torch.isnan(x).sum())} NaN in output"
    if tol.kind == "exact":
        ok = bool((x == y).all())
        return ok, "" if ok else f"{int((x != y).sum())} element(s) differ"
    if tol.kind == "fp8":
        d = metrics(x, y)["fp8_diff"]
        return d <= tol.diff, f"fp8 diff {d:.2e} (limit {tol.diff:.0e})"
    bound = tol.atol + tol.rtol * y.abs()
    bad = (x - y).abs() > bound
    ok = not bool(bad.any())
    return ok, "" if ok else f"{int(bad.sum())} element(s) beyond atol={tol.atol:.1e} rtol={tol.rtol:.1e}"
