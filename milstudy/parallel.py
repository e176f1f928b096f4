"""Run independent jobs in worker processes, in order (model grids, E2E grids, ASMIL dynamics runs).

``process_map(fn, jobs, workers, progress, desc, threads, shared)`` returns ``[fn(job) for job in jobs]``, or
``[fn(job, shared) for job in jobs]`` when ``shared`` (data every job reads: a cohort, a list of bags) is given.
With ``workers > 1`` the jobs run in a pool of *spawned* processes (clean interpreters: no forked torch thread
pools, no inherited CUDA state), each limited to ``threads`` torch threads (default one, so that two workers fill a
2-core machine without oversubscribing it); ``shared`` is sent once per worker, not once per job. ``fn``, the jobs
and ``shared`` must be picklable (module-level functions, plain data). A job's result must not depend on where it
runs: every training job seeds itself.
"""

from __future__ import annotations

from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context
from typing import Any, Callable, Sequence, TypeVar

from tqdm.auto import tqdm

T = TypeVar("T")
_NOTHING = object()
_shared: Any = _NOTHING  # a worker's copy of ``shared``


def _start_worker(shared: Any, threads: int) -> None:
    global _shared
    import torch

    torch.set_num_threads(threads)
    _shared = shared


def _call(payload: tuple[Callable[..., T], Any]) -> T:
    fn, job = payload
    return fn(job) if _shared is _NOTHING else fn(job, _shared)


def process_map(fn: Callable[..., T], jobs: Sequence[Any], workers: int = 1, progress: bool = True,
                desc: str = "runs", threads: int = 1, shared: Any = _NOTHING) -> list[T]:
    """``[fn(job) for job in jobs]`` (``fn(job, shared)`` when ``shared`` is given), in ``workers`` spawned
    processes of ``threads`` torch threads each when ``workers > 1``; in this process, with its own thread
    setting, otherwise."""
    if workers < 1 or threads < 1:
        raise ValueError(f"process_map: workers and threads must be >= 1, got workers={workers}, threads={threads}")
    call = (lambda job: fn(job)) if shared is _NOTHING else (lambda job: fn(job, shared))
    results: list[T] = []
    with tqdm(total=len(jobs), desc=desc, disable=not progress) as bar:
        if workers == 1 or len(jobs) <= 1:
            for job in jobs:
                results.append(call(job))
                bar.update()
            return results
        with ProcessPoolExecutor(min(workers, len(jobs)), mp_context=get_context("spawn"), initializer=_start_worker,
                                 initargs=(shared, threads)) as pool:
            for result in pool.map(_call, [(fn, job) for job in jobs]):
                results.append(result)
                bar.update()
    return results
