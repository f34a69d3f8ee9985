"""Timing helper shared by the benchmark scripts."""

from __future__ import annotations

import statistics
import time

import jax


def median_time(fn, *args, repeats: int) -> float:
    """Median wall time of `fn(*args)` over `repeats` calls, after one compiling call."""
    jax.block_until_ready(fn(*args))
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - t0)
    return statistics.median(times)
