"""Training stamps made in chunks: one function over a list of chunk jobs, in this process or in a pool of
worker processes, the results in the jobs' order, with progress after each chunk."""
from __future__ import annotations

from concurrent.futures import ProcessPoolExecutor
from contextlib import nullcontext
from typing import Any, Callable, Iterable

__all__ = ["map_chunks"]


def map_chunks(fn: Callable[[Any], Any], jobs: Iterable, workers: int,
               progress: Callable[[int, int], None] | None = None, total: int = 0,
               size: Callable[[Any], int] = len) -> list:
    """[fn(job) for job in jobs], run here (workers <= 1) or in `workers` processes (fn and the jobs must then
    pickle); after each chunk `progress(done, total)`, done the sum of `size` of the results so far."""
    out, done = [], 0
    with ProcessPoolExecutor(workers) if workers > 1 else nullcontext() as pool:
        for part in (pool.map(fn, jobs) if pool is not None else map(fn, jobs)):
            out.append(part)
            done += size(part)
            if progress:
                progress(done, total)
    return out
