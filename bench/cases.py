"""The shared case set: parity cases and speed cases, one `cases_<family>.py` module per op family.

Each `cases_*` module in this package defines `PARITY: list[Case]` and `SPEED: list[SpeedCase]`;
they are discovered here, so adding a family needs no edit of this file. Shapes come from
`SHAPES` (the real V4-Flash, V4-Pro and V3.2 configs) plus small ones.
"""

from __future__ import annotations

import importlib
import pkgutil
from dataclasses import dataclass, field
from typing import Any, Callable

import torch

# Real model dimensions (transformers' DeepseekV4Config defaults = V4-Flash; V4-Pro and V3.2 from
# their published config.json files).
SHAPES = {
    "v4-flash": dict(hidden=4096, heads=64, q_lora=1024, head_dim=512, rope_dim=64, o_groups=8,
                     o_lora=1024, experts=256, topk=6, moe_inter=2048, index_heads=64,
                     index_dim=128, index_topk=512, window=128, hc=4, vocab=129280),
    "v4-pro": dict(hidden=7168, heads=128, q_lora=1536, head_dim=512, rope_dim=64, o_groups=16,
                   o_lora=1024, experts=384, topk=6, moe_inter=3072, index_heads=64,
                   index_dim=128, index_topk=1024, window=128, hc=4, vocab=129280),
    "v3.2": dict(hidden=7168, heads=128, q_lora=1536, kv_lora=512, nope_dim=128, rope_dim=64,
                 v_dim=128, experts=256, topk=8, n_group=8, topk_group=4, moe_inter=2048,
                 index_heads=64, index_dim=128, index_topk=2048, route_scale=2.5, vocab=129280),
}


@dataclass(frozen=True)
class Distributed:
    """This process's place when a case runs under torchrun: `layout` (a `model.parallel.Layout`,
    its process group joined) and `timeout_s`, the longest any collective of the case may wait."""

    layout: Any
    timeout_s: float


@dataclass(frozen=True)
class Tolerance:
    """How a backend's output is judged against the float64 reference.

    kind "close": |out - ref| <= atol + rtol * |ref| everywhere (torch.testing defaults per dtype,
    atol scaled by sqrt(reduction length)); "fp8": DeepGEMM's diff 1 - 2<x,y>/(<x,x>+<y,y>) <= diff;
    "exact": bitwise equal values. NaN never passes.
    """

    kind: str = "close"
    rtol: float = 1.3e-6
    atol: float = 1e-5
    diff: float = 1e-3

    @staticmethod
    def for_dtype(dtype: torch.dtype, reduction: int = 1) -> "Tolerance":
        rtol, atol = {torch.bfloat16: (1.6e-2, 1e-5), torch.float16: (1e-3, 1e-5),
                      torch.float32: (1.3e-6, 1e-5), torch.float64: (1e-7, 1e-7)}[dtype]
        return Tolerance("close", rtol, atol * max(1.0, reduction ** 0.5))


@dataclass(frozen=True)
class Case:
    """One parity case: `run(**make(generator))` under each backend vs the cpu reference in f64.

    run: the public v4hal function (or a composite of them) to call.
    make: builds the inputs (on CPU) from a seeded generator.
    tolerance: per output name, or one for all.
    compare: optional map from run's output to the named tensors to compare (default: the tensor
      outputs themselves, named out / out0, out1, ...).
    check: optional extra judgement `(ref_outputs, outputs, inputs) -> (ok, note)`, e.g. a
      tie-aware top-k comparison.
    reference_inputs: optional map from inputs to the reference's inputs (default: floating tensors
      other than fp8 upcast to float64, `out_dtype` set to float64).
    distributed: run also takes `distributed=Distributed(...)`: under torchrun it runs this rank's
      part of the work and returns the whole output on every rank (the reference stays one process).
    prepare: under torchrun, called on every rank before it joins the process group (transformers
      writes a checkpoint only on rank 0 once torch.distributed is initialised).
    """

    op: str
    name: str
    run: Callable[..., Any]
    make: Callable[[torch.Generator], dict]
    tolerance: Tolerance | dict[str, Tolerance] = Tolerance()
    quick: bool = False
    compare: Callable[[Any], dict[str, torch.Tensor]] | None = None
    check: Callable[[dict, dict, dict], tuple[bool, str]] | None = None
    reference_inputs: Callable[[dict], dict] | None = None
    tags: tuple[str, ...] = field(default_factory=tuple)
    distributed: bool = False
    prepare: Callable[[], Any] | None = None

    @property
    def id(self) -> str:
        return f"{self.op}/{self.name}"


@dataclass(frozen=True)
class SpeedCase:
    """One speed case. `make(device)` returns `(fn, peers)`: fn() runs v4hal's op on its inputs,
    peers maps a peer's name to a callable doing the same work another way (measured in the same
    run). flops / bytes: the work and the minimum memory traffic, for roofline shares.
    distributed: make also takes `distributed=Distributed(...)`: under torchrun, fn runs this rank's
    part of the work (every rank calls it in step); peers stay whole on every rank. prepare: as
    for `Case`."""

    op: str
    name: str
    make: Callable[[torch.device], tuple[Callable[[], Any], dict[str, Callable[[], Any]]]]
    flops: float = 0.0
    bytes: float = 0.0
    quick: bool = False
    tags: tuple[str, ...] = field(default_factory=tuple)
    distributed: bool = False
    prepare: Callable[[], Any] | None = None

    @property
    def id(self) -> str:
        return f"{self.op}/{self.name}"


def _modules():
    import v4hal.bench as pkg

    for info in sorted(pkgutil.iter_modules(pkg.__path__), key=lambda i: i.name):
        if info.name.startswith("cases_"):
            yield importlib.import_module(f"v4hal.bench.{info.name}")


def parity_cases(quick: bool = False, select: str | None = None) -> list[Case]:
    cases = [c for m in _modules() for c in getattr(m, "PARITY", [])]
    return [c for c in cases if (c.quick or not quick) and (select is None or select in c.id)]


def speed_cases(quick: bool = False, select: str | None = None) -> list[SpeedCase]:
    cases = [c for m in _modules() for c in getattr(m, "SPEED", [])]
    return [c for c in cases if (c.quick or not quick) and (select is None or select in c.id)]


def randn(g: torch.Generator, *shape: int, dtype: torch.dtype = torch.float32, scale: float = 1.0) -> torch.Tensor:
    return torch.randn(*shape, generator=g).mul_(scale).to(dtype)  # in place: no second buffer of an expert-sized tensor
