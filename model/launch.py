"""Running a subcommand under torchrun: the layout flags `generate`, `parity` and `bench` share,
how they read as a `Layout`, and joining that layout's process group for the command's body.

    --tp N            tensor parallel ranks
    --ep N            expert parallel ranks: with --tp N, each rank holds E/N whole experts; with
                      --tp 1, N data-parallel ranks each running its own sequences, their tokens
                      exchanged with the experts' owners all-to-all (ep = dp)
    --dist-timeout S  seconds to wait for every rank to join, and in each collective
    --dist-backend B  confirms the process-group backend the device implies (gloo / nccl / hccl)
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Callable

import torch
import torch.distributed as dist

from v4hal.model.parallel import Layout, LayoutError, Placement, join, local_placement
from v4hal.subcommand import error


def add_arguments(p: argparse.ArgumentParser) -> None:
    from v4hal.subcommand import at_least

    p.add_argument("--tp", type=at_least(1), default=1, help="tensor parallel ranks (run under torchrun)")
    p.add_argument("--ep", type=at_least(1), default=1,
                   help="expert parallel ranks: 1 or --tp; with --tp 1, that many data-parallel ranks "
                        "exchanging tokens with the experts' owners all-to-all")
    p.add_argument("--dist-timeout", type=at_least(1.0, float), default=300.0,
                   help="seconds to wait for every rank to join, and in each collective, before failing")
    p.add_argument("--dist-backend", choices=["auto", "gloo", "nccl", "hccl"], default="auto",
                   help="process-group backend under torchrun (auto: the one of the backend's device: "
                        "gloo on cpu, nccl on cuda:LOCAL_RANK, hccl on npu:LOCAL_RANK)")


def read_layout(ns: argparse.Namespace) -> Layout:
    """The layout `--tp` / `--ep` name: ep = dp when tp is 1 (the only runnable layout with
    experts split and heads whole), else dp = 1."""
    data_parallel = ns.ep if ns.tp == 1 and ns.ep > 1 else 1
    return Layout(tp=ns.tp, ep=ns.ep, dp=data_parallel)


def under_torchrun() -> bool:
    return "RANK" in os.environ


def run(command: str, ns: argparse.Namespace, layout: Layout, device: torch.device,
        body: Callable[[Placement | None], int], before_join: Callable[[], None] | None = None) -> int:
    """`body(placement)` on this rank of `layout` (placement None in one process, outside
    torchrun or in a torchrun world of one), `device` being the backend's device (its type picks
    the process group); `before_join()`, if given, runs on every rank just before it joins.
    Rank 0 prints; the other ranks' stdout goes nowhere. A layout without its
    torchrun world, a rank that never joins, or one that dies or stalls in a collective is an
    error naming the setting (never a hang: everything waits at most --dist-timeout)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if layout.devices == 1 and world == 1:
        return body(None)
    if not under_torchrun():
        return error(command, f"layout {layout} (--tp {ns.tp} --ep {ns.ep}): run under torchrun "
                              f"--nproc-per-node {layout.devices}")
    stdout = sys.stdout
    try:
        placement = local_placement(device, ns.dist_backend)
        if not dist.is_initialized():
            if before_join is not None:
                before_join()
            join(layout, placement, ns.dist_timeout)
        if dist.get_rank():
            sys.stdout = open(os.devnull, "w")
        return body(placement)
    except LayoutError as exc:
        return error(command, str(exc))
    except RuntimeError as exc:  # from a collective: a peer died (connection closed) or stalled (timeout)
        if not dist.is_initialized():  # before joining: not a collective's
            raise
        first = (str(exc).strip() or type(exc).__name__).splitlines()[0]
        return error(command, f"layout {layout}: rank {dist.get_rank()} stopped in a collective: {first} "
                              f"(another rank died or stalled; collectives wait --dist-timeout {ns.dist_timeout:g} s)")
    finally:
        if sys.stdout is not stdout:
            sys.stdout.close()
            sys.stdout = stdout
        if dist.is_initialized():
            dist.destroy_process_group()  # before exit, or gloo's threads abort the process
