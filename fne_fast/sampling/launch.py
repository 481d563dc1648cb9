"""Runs a function in W fresh local processes joined in one gloo process group: what the multi-process tests and
the sharded-bank benchmark use (training itself is launched with torchrun).

Each process reports back through a file, so the caller sees every rank's outcome (its return value, the
traceback it raised, or the exit code it died with), including ranks that failed because another one did.
"""

from __future__ import annotations

import os
import pickle
import tempfile
import time
import traceback
from dataclasses import dataclass
from datetime import timedelta

import torch.multiprocessing as multiprocessing

from fne_fast.io import atomic_output

__all__ = ["Outcome", "run_in_processes", "results_of"]


@dataclass
class Outcome:
    """One rank's end: ``value`` when it returned, ``error`` (a traceback) when it raised, ``exit_code`` when it
    died without reporting."""

    rank: int
    value: object = None
    error: str | None = None
    exit_code: int | None = None

    @property
    def ok(self) -> bool:
        return self.error is None and self.exit_code in (None, 0)


def _process_main(function, rank: int, world_size: int, store: str, threads: int, timeout_seconds: float,
                  report: str, args: tuple) -> None:
    import torch
    import torch.distributed as dist

    torch.set_num_threads(threads)
    outcome = Outcome(rank)
    try:
        dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world_size,
                                timeout=timedelta(seconds=timeout_seconds))
        try:
            outcome.value = function(rank, world_size, *args)
        finally:
            dist.destroy_process_group()
    except BaseException:  # noqa: BLE001  (reported to the parent, which raises or inspects it)
        outcome.error = traceback.format_exc()
    with atomic_output(report, "wb") as stream:
        pickle.dump(outcome, stream)


def run_in_processes(function, world_size: int, *args, threads: int = 1, timeout: float = 60.0,
                     deadline: float = 300.0) -> list[Outcome]:
    """Calls ``function(rank, world_size, *args)`` in ``world_size`` spawned processes with ``threads`` intra-op
    threads each, after joining them in a gloo group whose collectives time out after ``timeout`` seconds.
    Returns every rank's Outcome; processes still running after ``deadline`` seconds are killed and reported
    with their exit code. ``function`` and ``args`` must be picklable (a module-level function)."""
    context = multiprocessing.get_context("spawn")
    with tempfile.TemporaryDirectory(prefix="fne-fast-processes-") as directory:
        store = os.path.join(directory, "store")
        reports = [os.path.join(directory, f"rank{rank}.pickle") for rank in range(world_size)]
        started = time.time()
        processes = [context.Process(target=_process_main, args=(function, rank, world_size, store, threads,
                                                                 timeout, reports[rank], args))
                     for rank in range(world_size)]
        for process in processes:
            process.start()
        for process in processes:
            process.join(max(0.0, deadline - (time.time() - started)))
        outcomes = []
        for rank, process in enumerate(processes):
            if process.is_alive():
                process.kill()
                process.join()
            if os.path.exists(reports[rank]):
                with open(reports[rank], "rb") as stream:
                    outcomes.append(pickle.load(stream))
            else:
                outcomes.append(Outcome(rank, exit_code=process.exitcode))
        return outcomes


def results_of(outcomes: list[Outcome]) -> list:
    """The ranks' return values; raises with every failed rank's traceback or exit code if any failed."""
    failed = [outcome for outcome in outcomes if not outcome.ok]
    if failed:
        raise RuntimeError("\n".join(f"rank {outcome.rank} " + (f"raised:\n{outcome.error}" if outcome.error else
                                                                f"exited with code {outcome.exit_code}")
                                     for outcome in failed))
    return [outcome.value for outcome in outcomes]
