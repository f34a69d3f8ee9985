"""Convergence control and reporting of the IR-drop solver.

The per-vector control of the sweeps (error estimate, stall detection, adaptive
over-relaxation: `Control`, `control_init`, `control_step`), the `SolveInfo` report with its
`PATH_*` codes, and how non-convergence reaches the user (`check_convergence`,
`ConvergenceError`, `convergence_error`, `solving`, `quiet_callback_logs`). The constants
live in `jaxbar.core.ir.constants`, shared with the CPU kernel.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import logging
import re
import warnings
from collections.abc import Iterator, Mapping
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from jaxbar.core.ir.constants import (
    MAX_MU2,
    MAX_RATE,
    NOISE_ULPS,
    SAFETY,
    SOR_THRESHOLD,
    SOR_WAIT,
)

Array = jax.Array


class SolveInfo(NamedTuple):
    """Convergence report of an IR-drop solve (worst case over the whole batch).

    Attributes:
      iterations: sweeps used (int32; the maximum over batch chunks).
      error: estimated relative error of the output currents at exit, the maximum over input
        vectors. Per vector, `d = max_n |dI_n| / max_n |I_n|` is the relative change of its
        currents in the last sweep (`error_scale="cells"`: relative to the currents of both
        polarities' cells added) and `q` the observed contraction (ratio of the last two
        changes); the estimate is the geometric tail `4 d q / (1 - q)` for monotone
        (Gauss-Seidel) sweeps and `d max(1, q / (1 - q))` for over-relaxed ones. A change of
        a few ulps (`noise`) is rounding: its estimate is `d`, or, right after a larger
        change `d_prev`, the smaller tail with `q = (d + noise) / d_prev` and `d + noise`.
      converged: `error <= tol`.
      tol: the tolerance that was asked for (for messages).
      path: how the currents were computed (int32): `PATH_DIRECT` (a solve per input
        vector), `PATH_TRANSFER` (the XLA transfer-matrix solve), `PATH_KERNEL` (the CPU
        kernel's transfer matrix) or `PATH_KERNEL_THEN_XLA` (the kernel gave up and XLA
        computed it), `PATH_LADDER` (gated-source: exact elimination in XLA, no sweeps:
        `iterations` 0, `error` 0) or `PATH_LADDER_KERNEL` (the same by the CPU kernel);
        under vmap, per array.
      lines: the form of the XLA line eliminations that ran (int32): `LINES_SEQUENTIAL` (a
        loop step per node), `LINES_PARALLEL` (associative scans), -1 when none ran (the CPU
        kernels, the gated-source ladder).
    """

    iterations: Array
    error: Array
    converged: Array
    tol: Array = float("nan")
    path: Array = -1
    lines: Array = -1


#: `SolveInfo.path` codes.
PATH_DIRECT, PATH_TRANSFER, PATH_KERNEL, PATH_KERNEL_THEN_XLA = 0, 1, 2, 3
PATH_LADDER, PATH_LADDER_KERNEL = 4, 5
#: `SolveInfo.lines` codes, by form ("sequential", "parallel"; None: no XLA line solve).
LINES_SEQUENTIAL, LINES_PARALLEL = 0, 1
LINES_CODES = {None: -1, "sequential": LINES_SEQUENTIAL, "parallel": LINES_PARALLEL}


class ConvergenceError(RuntimeError):
    """Raised by `check_convergence` when an IR-drop solve did not converge."""


def safe_div(num, den):
    """Num / den for num, den >= 0, with 0/0 = 0 and x/0 = inf (no reciprocal overflow)."""
    ok = den > 0
    return jnp.where(ok, num / jnp.where(ok, den, 1.0), jnp.where(num > 0, jnp.inf, 0.0))


class Control(NamedTuple):
    """Per-vector convergence and relaxation control of the sweeps."""

    d: Array  # last relative change of the readout
    rate: Array  # last observed contraction d_t / d_{t-1}
    omega: Array  # relaxation factor (1: Gauss-Seidel)
    t_upd: Array  # sweep of the last relaxation update
    d_best: Array  # smallest change so far (halving reference for stall detection)
    stall_from: Array  # sweep when d_best last halved
    err: Array  # estimated error of the readout


def control_init(n, dtype):
    """The control of `n` vectors before the first sweep."""
    one = jnp.ones((n,), dtype)
    return Control(
        d=one, rate=0.0 * one, omega=one, t_upd=jnp.full((n,), -SOR_WAIT, jnp.int32),
        d_best=jnp.full((n,), jnp.inf, dtype), stall_from=jnp.zeros((n,), jnp.int32),
        err=jnp.full((n,), jnp.inf, dtype),
    )


def control_step(ctl, t, d):
    """Update the control after sweep `t` (0-based) whose readout changed by `d`."""
    # Observed contraction per sweep (-> spectral radius of the iteration): inflates the change
    # into an error estimate when convergence is slow, and tunes the relaxation.
    rate = jnp.where(t > 0, safe_div(d, ctl.d), 0.0)
    rate_c = jnp.clip(rate, 0.0, MAX_RATE)
    # Error left after this sweep, for geometric convergence: d rate / (1 - rate). Plain
    # Gauss-Seidel converges monotonically (real spectrum), so from the second sweep on (the first
    # ratio of two changes; the sweeps start from a solved state, see `sweeps.start_fields`) this
    # estimate, with a safety factor, may also be below d: fast cases stop one sweep earlier.
    # Over-relaxed sweeps may oscillate: never below d there.
    tail = rate_c / (1.0 - rate_c)
    monotone = (t >= 1) & (ctl.omega == 1.0)
    err = d * jnp.where(monotone, SAFETY * tail, jnp.maximum(1.0, tail))
    # Changes of a few ulps carry no rate information: the sweeps have reached the rounding
    # floor (typically a fixed cycle in float32), and the error is that of rounding. Right
    # after a change above the noise, though, the true change is at most d + noise and the rate
    # at most (d + noise) / d_prev: that tail may be smaller (fast cases stop a sweep earlier).
    noise = NOISE_ULPS * jnp.finfo(d.dtype).eps
    hi = d + noise
    rate_hi = jnp.clip(safe_div(hi, ctl.d), 0.0, MAX_RATE)
    after_change = monotone & (ctl.d > noise)
    floor_err = jnp.where(
        after_change, jnp.minimum(d, hi * SAFETY * rate_hi / (1.0 - rate_hi)), d)
    err = jnp.where(d <= noise, floor_err, err)
    # Adaptive block SOR (Hageman & Young): for this 2-cyclic system a settled rate R at
    # relaxation w gives the squared block-Jacobi radius mu^2 = (R + w - 1)^2 / (R w^2), and the
    # optimal relaxation is 2 / (1 + sqrt(1 - mu^2)) (rate w - 1). R approaches the true rate
    # from below, so w only increases. Settled: the ratio is steady on the scale of its distance
    # to 1 (past the optimum the dominant eigenvalues are complex, the ratio oscillates around
    # w - 1 and no update happens).
    omega = ctl.omega
    settled = jnp.abs(rate - ctl.rate) <= 0.1 * (1.0 - rate)
    update = (
        (t >= 2) & (t - ctl.t_upd >= SOR_WAIT) & settled & (rate >= SOR_THRESHOLD)
        & (rate > omega - 1.0 + 0.02) & (rate < 1.0)
    )
    mu2 = jnp.clip(safe_div((rate_c + omega - 1.0) ** 2, rate_c * omega**2), 0.0, MAX_MU2)
    omega = jnp.where(update, jnp.maximum(omega, 2.0 / (1.0 + jnp.sqrt(1.0 - mu2))), omega)
    halved = d <= 0.5 * ctl.d_best
    return Control(
        d=d, rate=rate, omega=omega, t_upd=jnp.where(update, t, ctl.t_upd),
        d_best=jnp.where(halved, d, ctl.d_best),
        stall_from=jnp.where(halved, t, ctl.stall_from), err=err,
    )


def make_info(iterations, error, tol, dtype, path=PATH_DIRECT, lines=None):
    """The `SolveInfo` of a solve from its sweeps, error estimate, tolerance and path.

    `lines`: the line form that ran ("sequential", "parallel", None) or its code.
    """
    error = error.astype(dtype)
    return SolveInfo(
        iterations=iterations.astype(jnp.int32),
        error=error,
        converged=error <= tol,
        tol=jnp.asarray(tol, dtype),
        path=jnp.asarray(path, jnp.int32),
        lines=jnp.asarray(
            LINES_CODES[lines] if lines is None or isinstance(lines, str) else lines, jnp.int32),
    )


def _message(iterations, error, tol):
    return (
        f"IR-drop solve did not converge: {int(np.max(iterations))} iterations, estimated "
        f"relative error {float(np.max(error)):.3g} > tol {float(np.max(tol)):.3g} "
        "(raise max_iters, loosen tol, or use float64)"
    )


def _host_check(mode, where, iterations, error, converged, tol, *values, names=()):
    if bool(np.all(converged)):
        return
    settings = ", ".join(f"{n} = {float(np.max(v)):g}" for n, v in zip(names, values,
                                                                       strict=True))
    msg = (f"{where}: " if where else "") + _message(iterations, error, tol)
    if settings:
        msg = msg.replace(" did not converge:", f" did not converge ({settings}):", 1)
    if mode == "error":
        raise ConvergenceError(msg)
    warnings.warn(msg, RuntimeWarning, stacklevel=2)


def warn_if_unconverged(info, where):
    """Warn (from inside `jit`, when the computation runs) if `info` did not converge."""
    jax.debug.callback(
        functools.partial(_host_check, "warn", _label(where)),
        info.iterations, info.error, info.converged, info.tol,
    )


_WHERE: contextvars.ContextVar[str] = contextvars.ContextVar("jaxbar_ir_where", default="")


def _label(where: str = "") -> str:
    return "; ".join(w for w in (_WHERE.get(), where) if w)


@contextlib.contextmanager
def solving(where: str) -> Iterator[None]:
    """Names what the IR-drop solves traced inside this context belong to (e.g. a layer).

    The name is read when a solve is traced and starts its non-convergence message.

    Args:
      where: the name, e.g. `"layer 'stage1.block0.conv1'"`.
    """
    token = _WHERE.set(_label(where))
    try:
        yield
    finally:
        _WHERE.reset(token)


def check_convergence(info: SolveInfo, mode: str = "error",
                      values: Mapping[str, Any] | None = None) -> None:
    """Raise or warn if an IR-drop solve did not converge; usable inside `jit`.

    Args:
      info: the `SolveInfo` returned by a solve (any batch shape, e.g. under vmap).
      mode: "error" raises `ConvergenceError` (under `jit` it surfaces as a
        `JaxRuntimeError` carrying the same message, when the computation runs;
        `convergence_error` recovers it), "warn" issues a `RuntimeWarning`,
        "ignore" does nothing.
      values: settings named in the message (e.g. `{"parasitics.r_row": r}`; may be traced).
    """
    if mode not in ("error", "warn", "ignore"):
        raise ValueError(f"mode must be 'error', 'warn' or 'ignore', got {mode!r}")
    if mode == "ignore":
        return
    values = dict(values or {})
    leaves = (info.iterations, info.error, info.converged, info.tol, *values.values())
    check = functools.partial(_host_check, mode, _label(), names=tuple(values))
    if not any(isinstance(x, jax.core.Tracer) for x in leaves):
        check(*(np.asarray(x) for x in leaves))
        return
    jax.debug.callback(check, *leaves)


_CARRIED = re.compile(r"ConvergenceError: (.+)")


def convergence_error(exc: BaseException) -> ConvergenceError | None:
    """The `ConvergenceError` an exception is or carries, if any.

    Under `jit` the error raised in the host callback reaches the caller wrapped in a
    `JaxRuntimeError` whose text holds the callback's traceback; this finds it there.

    Args:
      exc: the exception caught.

    Returns:
      The ConvergenceError (rebuilt from the text when wrapped), or None.
    """
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, ConvergenceError):
            return exc
        m = _CARRIED.search(str(exc))
        if m:
            return ConvergenceError(m.group(1).strip())
        exc = exc.__cause__ or exc.__context__
    return None


class _DropConvergenceLogs(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        info = record.exc_info
        return not (info and isinstance(info[1], ConvergenceError))


@contextlib.contextmanager
def quiet_callback_logs() -> Iterator[None]:
    """A context in which JAX does not log tracebacks of a `ConvergenceError` in callbacks.

    The error still reaches the caller.
    """
    logger = logging.getLogger("jax._src.debugging")
    flt = _DropConvergenceLogs()
    logger.addFilter(flt)
    try:
        yield
    finally:
        logger.removeFilter(flt)
