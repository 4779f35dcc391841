"""Several units (source shards) converted at once, in worker processes.

The parent alone decides what to do, writes the journal and the manifest; each worker runs
whole units (`plan.process_unit`: streaming, temporary name, fsync, rename) and hands back the
unit's record, which the parent journals as it arrives. Output bytes are a pure function of the
source and the options, so which worker converted a unit, and in what order units finished,
changes nothing written: a resume after a kill is byte-identical whatever the number of workers.

Workers are forked from the parent (no re-import of torch, the plan is inherited, not pickled)
before it starts any thread, and:
- share the output lock: the flock belongs to the open file, which fork shares, so the folder
  stays locked while any of them lives;
- die with the parent: each asks the kernel for SIGKILL when its parent dies (PR_SET_PDEATHSIG),
  so a killed conversion leaves no orphan writing into the folder;
- use one torch thread each (as the in-process conversion does), so N workers use N cores and
  never run OpenMP regions inherited in an unknown state across fork;
- stop at their next chunk when another unit failed (a shared flag read by the progress
  callback), removing their temporary files; the parent then raises the first error, as the
  worker raised it (exceptions cross the process boundary pickled: CheckpointError and
  ops.OpInputError pickle by their fields).
"""

from __future__ import annotations

import concurrent.futures as cf
import ctypes
import multiprocessing
import os
import signal

import torch

from v4hal.model import plan

_PR_SET_PDEATHSIG = 1
_context: dict = {}  # in a worker: what the parent left for it (inherited across fork)


class Stopped(Exception):
    """A worker's unit was abandoned because another unit failed."""


class WorkerDied(RuntimeError):
    """A worker process ended without a result (killed: by the out-of-memory killer, by hand)."""


WORKERS_PER_CORE = 4


def default_workers() -> int:
    """Four per core this process may run on (its affinity mask, not the machine's core count): a
    worker spends most of its time waiting for the disk (two workers kept 1.04 of 2 cores busy in
    the benchmark), and more workers keep more reads and writes queued (on the benchmark's VM, FP8
    -> BF16 ran fastest with 6-8 workers on 2 cores; docs/conversion.md, Workers). At most one per
    GiB of available memory: a worker streams row chunks and peaks at a few hundred MB."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    memory = plan.available_memory()
    return max(1, WORKERS_PER_CORE * cores if memory is None else min(WORKERS_PER_CORE * cores, memory // 2**30))


def _init_worker(parent: int) -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    if hasattr(libc, "prctl"):
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
    if os.getppid() != parent:  # the parent died before prctl took effect
        os._exit(1)
    torch.set_num_threads(1)


def _progress(n: int) -> None:
    with _context["done"].get_lock():
        _context["done"].value += n
    if _context["stop"].value:
        raise Stopped("stopped: another unit failed")


def _run(index: int) -> dict:
    return _context["work"](index, _progress)


def _settle(pending: dict, on_done) -> None:
    """After a failure: wait for the units still running (they stop at their next chunk) and
    pass on those that finished all the same, so what is on disk is journaled."""
    for future in cf.as_completed(pending):
        if not future.cancelled() and future.exception() is None:
            on_done(pending[future], future.result())


def run_units(work, units: list, workers: int, on_done, progress) -> None:
    """Call `work(unit_index, progress)` for every unit, in up to `workers` processes (in this
    one when 1, or when there is a single unit); `on_done(unit, record)` runs here, in this
    process, as each unit finishes; `progress(nbytes)` is fed the bytes read."""
    workers = min(workers, len(units))
    if workers <= 1:
        for unit in units:
            on_done(unit, work(unit.index, progress))
        return
    ctx = multiprocessing.get_context("fork")
    _context.update(work=work, done=ctx.Value("q", 0), stop=ctx.Value("b", 0, lock=False))
    pool = cf.ProcessPoolExecutor(workers, mp_context=ctx, initializer=_init_worker, initargs=(os.getpid(),))
    reported = 0
    try:
        pending = {pool.submit(_run, u.index): u for u in units}
        while pending:
            finished, _ = cf.wait(pending, timeout=0.25, return_when=cf.FIRST_COMPLETED)
            done = _context["done"].value
            progress(done - reported)
            reported = done
            for future in finished:
                on_done(pending.pop(future), future.result())
    except cf.process.BrokenProcessPool:
        _context["stop"].value = 1
        _settle(pending, on_done)
        raise WorkerDied("a conversion worker process died unexpectedly (out of memory? killed?); "
                         "rerun the same command to resume, with fewer --workers if memory is short") from None
    except BaseException:
        _context["stop"].value = 1
        _settle(pending, on_done)
        raise
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
        _context.clear()
