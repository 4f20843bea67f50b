"""Run one function over many jobs in worker processes, in order, with a progress callback."""

from __future__ import annotations

import multiprocessing
import os
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import Future, ProcessPoolExecutor, ThreadPoolExecutor
from typing import TypeVar

Job = TypeVar("Job")
Result = TypeVar("Result")


def default_workers() -> int:
    """Worker processes: the machine's cores, at most 8."""
    return max(1, min(8, os.cpu_count() or 1))


def _context() -> multiprocessing.context.BaseContext:
    """forkserver where it exists: forking a process that holds threads of native libraries
    (LanceDB's async runtime, ONNX Runtime, torch) can deadlock the child; Windows spawns."""
    methods = multiprocessing.get_all_start_methods()
    return multiprocessing.get_context("forkserver" if "forkserver" in methods else None)


def ordered_map(function: Callable[[Job], Result], jobs: Sequence[Job], *,
                workers: int | None = None, min_parallel: int = 32,
                chunksize: int = 8) -> Iterator[Result]:
    """``map(function, jobs)``, in processes when there are enough jobs; results in job order.

    ``function`` must be a module-level function (it is pickled to the workers).
    """
    workers = default_workers() if workers is None else workers
    if workers <= 1 or len(jobs) < min_parallel:
        yield from map(function, jobs)
        return
    with ProcessPoolExecutor(max_workers=workers, mp_context=_context()) as pool:
        yield from pool.map(function, jobs, chunksize=chunksize)


def threaded_map(function: Callable[[Job], Result], jobs: Iterable[Job], *, threads: int = 4,
                 in_flight: int = 256) -> Iterator[Result]:
    """``map(function, jobs)`` in threads (for work that waits on the disk), results in job
    order, at most ``in_flight`` jobs submitted at a time: memory stays bounded however many
    jobs (``Executor.map`` would hold a future for every job at once)."""
    with ThreadPoolExecutor(max_workers=threads) as pool:
        pending: deque[Future[Result]] = deque()
        for job in jobs:
            pending.append(pool.submit(function, job))
            if len(pending) >= in_flight:
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()
