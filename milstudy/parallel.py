"""Run independent jobs in worker processes, in order (model grids, ASMIL dynamics runs).

``process_map(fn, jobs, workers, progress, desc)`` returns ``[fn(job) for job in jobs]``. With ``workers > 1`` the
jobs run in a pool of *spawned* processes (clean interpreters: no forked torch thread pools, no inherited CUDA
state), each limited to ``threads`` torch threads (default one, so that two workers fill a 2-core machine without
oversubscribing it). ``fn`` and every job must be picklable (module-level functions, plain data). A job's result
does not depend on where it runs: every training job seeds itself.
"""

from __future__ import annotations

from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context
from typing import Any, Callable, Sequence, TypeVar

from tqdm.auto import tqdm

T = TypeVar("T")


def _call(payload: tuple[Callable[[Any], T], Any, int]) -> T:
    fn, job, threads = payload
    import torch

    torch.set_num_threads(threads)
    return fn(job)


def process_map(fn: Callable[[Any], T], jobs: Sequence[Any], workers: int = 1, progress: bool = True,
                desc: str = "runs", threads: int = 1) -> list[T]:
    """``[fn(job) for job in jobs]``, in ``workers`` spawned processes of ``threads`` torch threads each when
    ``workers > 1`` (in this process, with its own thread setting, otherwise)."""
    if workers < 1 or threads < 1:
        raise ValueError(f"process_map: workers and threads must be >= 1, got workers={workers}, threads={threads}")
    results: list[T] = []
    with tqdm(total=len(jobs), desc=desc, disable=not progress) as bar:
        if workers == 1 or len(jobs) <= 1:
            for job in jobs:
                results.append(fn(job))
                bar.update()
            return results
        with ProcessPoolExecutor(min(workers, len(jobs)), mp_context=get_context("spawn")) as pool:
            for result in pool.map(_call, [(fn, job, threads) for job in jobs]):
                results.append(result)
                bar.update()
    return results
