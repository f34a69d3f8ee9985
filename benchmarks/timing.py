"""Timing helper shared by the benchmark scripts."""

from __future__ import annotations

import statistics
import time

import jax


def median_time(fn, *args, repeats: int) -> float:
    """Median wall time of `fn(*args)` over `repeats` calls, after one compiling call."""
    return interleaved_medians({"fn": (fn, args)}, repeats=repeats)["fn"]


def interleaved_medians(calls: dict, *, repeats: int) -> dict:
    """Median wall times of several calls, timed in turn (one of each per round).

    Alternating the calls spreads slow drifts of the machine's speed over all of them, so
    their ratios hold even when the absolute times move between rounds.

    Args:
      calls: name -> (fn, args); each is compiled by a first call before timing.
      repeats: timed rounds.

    Returns:
      name -> median seconds per call.
    """
    for fn, args in calls.values():
        jax.block_until_ready(fn(*args))
    times = {name: [] for name in calls}
    for _ in range(repeats):
        for name, (fn, args) in calls.items():
            t0 = time.perf_counter()
            jax.block_until_ready(fn(*args))
            times[name].append(time.perf_counter() - t0)
    return {name: statistics.median(t) for name, t in times.items()}
