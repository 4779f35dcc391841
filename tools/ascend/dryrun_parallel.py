"""The Ascend dry run's distributed case: one rank of a tensor + expert parallel layout.

`run_parallel_model(name, chip, layout)` builds rank 0's part of a real model (`model.build(...,
layout=...)`) on the meta device, the other ranks stood in for by torch's fake process group,
and runs a prefill and one decode step under the ascend backend: every vendor op sees the
per-rank shapes (1/tp of the heads, E/ep experts, 1/tp of the vocabulary). It passes when the
Meta kernels accept every call, the chip rules hold, the logits are whole float32
`[batch, tokens, vocab]` on every rank, and the collectives the decode step makes are, in order,
kind and bytes, those `bench.distributed.collectives` computes for the layout (the figures of
docs/distributed.md's communication table).

Runs only layouts whose collectives need no tensor values: tensor parallelism with ep = 1 or
ep = tp. (ep = dp exchanges tokens by all-to-all with data-dependent splits, which Meta tensors
cannot size.) Under ep = tp each rank's experts take their rows by a host read of the routing
offsets (`expert_parallel.LocalExperts`): one synchronisation per MoE layer on an NPU, reported as
a warning; on Meta tensors every row stands in.
"""

from __future__ import annotations

import contextlib
import time

import torch
import torch.distributed as dist

from v4hal.backends import registry
from v4hal.tools.ascend.dryrun import Result, _ascend_with_fallback, _compare, _model_args, WARNING_PREFIX, install

HOST_READ = ("expert_parallel.LocalExperts reads its experts' row range once per MoE layer "
             "(a host synchronisation on an NPU; on Meta tensors every row stands in)")


@contextlib.contextmanager
def _fake_world(size: int):
    """Rank 0 of a `size`-process default group whose peers exist only in name."""
    from torch.testing._internal.distributed.fake_pg import FakeStore

    if dist.is_initialized():
        raise RuntimeError("the distributed dry run needs a process without a process group")
    dist.init_process_group("fake", store=FakeStore(), rank=0, world_size=size)
    try:
        yield
    finally:
        dist.destroy_process_group()


def run_parallel_model(name: str, chip: str, layout, batch: int = 1, tokens: int = 16) -> Result:
    """Rank 0 of `layout` (model.parallel.Layout, tp > 1, ep 1 or tp) for the model `name` (a
    preset or a small config), bfloat16, on Meta tensors: prefill `tokens`, decode one."""
    from v4hal.bench.distributed import collectives
    from v4hal.model import model
    from v4hal.model.collectives import recording

    start, case = time.perf_counter(), f"model/{name}/{layout}"
    if layout.tp < 2 or layout.dp != 1 or layout.ep not in (1, layout.tp):
        raise ValueError(f"distributed dry run: layout {layout}: needs tp > 1 and ep 1 or tp={layout.tp}")
    args = _model_args(name)
    warnings, problems = [HOST_READ] if layout.ep > 1 else [], []
    with install(chip) as session, _fake_world(layout.devices):
        net = model.build(args, dtype=torch.bfloat16, device="meta", layout=layout)
        with _ascend_with_fallback(), torch.no_grad(), recording() as made:
            cache = net.new_cache()
            ids = torch.zeros(batch, tokens + 1, dtype=torch.long, device="meta")
            prefill = net(ids[:, :tokens], cache=cache)
            made.clear()
            decode = net(ids[:, tokens:], cache=cache)
            fell_back = sorted(registry.fallbacks())
        want = {"prefill": ((batch, tokens, args.vocab_size), torch.float32),
                "decode": ((batch, 1, args.vocab_size), torch.float32)}
        problems += _compare(want, {k: (tuple(v.shape), v.dtype) for k, v in (("prefill", prefill), ("decode", decode))})
        expected = collectives(args, layout, tokens + 1, tokens=batch)
        if made != expected:
            first = next((i for i, (m, e) in enumerate(zip(made, expected)) if m != e), min(len(made), len(expected)))
            problems.append(f"decode collectives: {len(made)} made, {len(expected)} computed "
                            f"(bench.distributed.collectives); first difference at #{first}: "
                            f"{made[first:first + 1]} vs {expected[first:first + 1]}")
        if fell_back:
            warnings.append(f"ops on the cpu reference (no ascend implementation): {', '.join(fell_back)}")
        for c in session.calls:
            for p in c.problems:
                (warnings if p.startswith(WARNING_PREFIX) else problems).append(p)
        note = "; ".join(dict.fromkeys(problems)) or (f"decode step: {len(made)} collectives, "
                                                      f"{sum(b for _, b in made):,} bytes of messages")
        return Result(case, "model", chip, "fail" if problems else "pass", note, list(session.calls),
                      list(dict.fromkeys(warnings)), time.perf_counter() - start)
