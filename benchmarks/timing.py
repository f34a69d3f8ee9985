"""Timing helpers shared by the benchmark scripts."""

from __future__ import annotations

import statistics
import time
from typing import NamedTuple

import jax


class Timing(NamedTuple):
    """One call's timing over the rounds.

    Attributes:
      median: median wall seconds per call.
      cpu_load: process CPU seconds per wall second while it ran (2.0: two cores busy).
    """

    median: float
    cpu_load: float


def compile_settings() -> dict[str, dict]:
    """The compiler options each benchmark compiles its programs with, by name.

    XLA's defaults, and on a CPU also without XLA:CPU's YNNPACK library fusions (there a
    YNNPACK convolution alone keeps one core busy; `XLA_FLAGS` sets the same for a whole run).
    """
    settings = {"XLA's default options": {}}
    if jax.default_backend() != "cpu":
        return settings
    no_ynn = {"xla_cpu_experimental_ynn_fusion_type": ""}
    try:
        jax.jit(lambda x: x + 1).lower(1.0).compile(compiler_options=no_ynn)
    except jax.errors.JaxRuntimeError as e:  # an XLA without the option
        print(f"compiling with XLA's defaults only: {str(e).splitlines()[0]}")
        return settings
    settings["no YNNPACK fusions"] = no_ynn
    return settings


def compiled_calls(programs: dict, settings: dict[str, dict]) -> dict:
    """Every program compiled with every setting, ready for `interleaved_timings`.

    Args:
      programs: name -> (fn, args).
      settings: setting name -> compiler options (`compile_settings()`).

    Returns:
      (setting, name) -> (compiled fn, args).
    """
    return {(setting, name): (jax.jit(fn).lower(*args).compile(compiler_options=options), args)
            for setting, options in settings.items() for name, (fn, args) in programs.items()}


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
    return {name: t.median for name, t in interleaved_timings(calls, repeats=repeats).items()}


def interleaved_timings(calls: dict, *, repeats: int) -> dict[str, Timing]:
    """`interleaved_medians` with the CPU load of each call (how many cores it kept busy)."""
    for fn, args in calls.values():
        jax.block_until_ready(fn(*args))
    times = {name: [] for name in calls}
    cpu = dict.fromkeys(calls, 0.0)
    for _ in range(repeats):
        for name, (fn, args) in calls.items():
            c0, t0 = time.process_time(), time.perf_counter()
            jax.block_until_ready(fn(*args))
            times[name].append(time.perf_counter() - t0)
            cpu[name] += time.process_time() - c0
    return {name: Timing(statistics.median(t), cpu[name] / sum(t)) for name, t in times.items()}
