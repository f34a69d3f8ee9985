"""The public IR-drop solves (PHYSICS.md §6) with their `custom_vjp`s, and node voltages.

`solve_input_source` (transfer matrix or per-vector sweeps), `solve_gated_source` (exact
ladders) and `solve_gated_source_per_read` (one set of conductances per read) return the
integrator currents and a `SolveInfo`; `input_source_nodes` / `gated_source_nodes` the node
voltages. Gradients use implicit differentiation (`jaxbar.core.ir.gradients`); only
reverse-mode differentiation is supported.

Precision: the iteration error is controlled by `tol`; float32 rounding adds about
`sqrt(K) * eps` relative (~1e-6 for K = 1152), more when most of the current is lost to IR drop.
An interleaved pair's output is a difference: the rounding is that of the two polarities'
currents, which can exceed `tol` relative to a small difference (`error_scale="cells"`
converges relative to them). Use float64 where that matters.

All voltages and currents are normalized (PHYSICS.md §0, §6): conductances `g = G/Gmax`,
resistances `r = R*Gmax`, currents in array output units (the ideal result is `v @ g`).
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import lax

from jaxbar.core.ir.circuit import HIGHEST, resistances
from jaxbar.core.ir.convergence import SolveInfo, make_info
from jaxbar.core.ir.gradients import pair_grads
from jaxbar.core.ir.ladder import ladder_currents
from jaxbar.core.ir.sweeps import solve_batch
from jaxbar.core.ir.transfer import kernel_or_xla, transfer_batch, use_transfer, uses_cpu_kernel

__all__ = [
    "NodeVoltages",
    "default_tol",
    "gated_source_nodes",
    "input_source_nodes",
    "solve_gated_source",
    "solve_gated_source_per_read",
    "solve_input_source",
]

Array = jax.Array


class NodeVoltages(NamedTuple):
    """Converged node voltages of a solve (for inspection and KCL checks).

    Attributes:
      line: (B, P, K, N) voltages of the row-line nodes (input-source) or supply-line nodes
        (gated-source); P = 2 when interleaved (index 1: the negative cells' lines).
      bit: (B, K, N) bit-line node voltages.
      currents: (B, N) integrator currents.
      info: the `SolveInfo`.
    """

    line: Array
    bit: Array
    currents: Array
    info: SolveInfo


# The line forms: "auto" resolves per platform when lowering (`_per_platform`).
_LINES = ("auto", "sequential", "parallel")


def _platform_forms(lines):
    """The line forms (on CPUs, elsewhere) for `lines`.

    "auto": the loops on CPUs (less work), the log-depth scans on accelerators (less sequential
    depth); a forced form applies everywhere.
    """
    return ("sequential", "parallel") if lines == "auto" else (lines, lines)


def _per_platform(lines, fn, *args):
    """`fn(form, *args)`, the form chosen by `lax.platform_dependent` when lowering."""
    cpu, other = _platform_forms(lines)
    if cpu == other:
        return fn(cpu, *args)
    return lax.platform_dependent(*args, cpu=functools.partial(fn, cpu),
                                 default=functools.partial(fn, other))


def _check_lines(lines):
    if lines not in _LINES:
        raise ValueError(f"lines must be one of {_LINES}, got {lines!r}")


def _forward(topology, tol, max_iters, batch_chunk, cpu_kernel, cells, lines, g_stack, x,
             scalars):
    P, _, N = g_stack.shape
    signs = jnp.asarray([1.0, -1.0][:P], g_stack.dtype)
    res = resistances(*scalars)
    if topology == "gated_source":
        I, path = ladder_currents(cpu_kernel, g_stack, x, res)
        zero = jnp.zeros((), g_stack.dtype)
        return (I, make_info(jnp.int32(0), zero, tol, g_stack.dtype, path)), None
    if use_transfer(topology, x.shape[0], N):
        def xla(form, g_stack, x, *res):
            M, info = transfer_batch(g_stack, x, res, tol, max_iters, batch_chunk, signs,
                                     form, cells)
            return M, info.iterations, info.error, info.path, info.lines

        if uses_cpu_kernel(cpu_kernel, g_stack.dtype):
            # Chosen when lowering: the kernel on a CPU, the XLA solver on accelerators.
            cpu_form, other_form = _platform_forms(lines)
            M, t, err, path, form = lax.platform_dependent(
                g_stack, x, *res,
                cpu=kernel_or_xla(tol, max_iters, batch_chunk, cells, cpu_form),
                default=functools.partial(xla, other_form))
        else:
            M, t, err, path, form = _per_platform(lines, xla, g_stack, x, *res)
        info = make_info(t, err, tol, g_stack.dtype, path, form)
        return (jnp.matmul(x, M.T, precision=HIGHEST), info), M

    def direct(form, g_stack, x, *res):
        return solve_batch(topology, g_stack, x, res, tol, max_iters, batch_chunk, signs, form,
                           False, cells)

    return _per_platform(lines, direct, g_stack, x, *res), None


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1, 2, 3, 4, 5, 6))
def _core(topology, tol, max_iters, batch_chunk, cpu_kernel, cells, lines, g_stack, x,
          *scalars):
    return _forward(topology, tol, max_iters, batch_chunk, cpu_kernel, cells, lines, g_stack, x,
                    scalars)[0]


def _core_fwd(topology, tol, max_iters, batch_chunk, cpu_kernel, cells, lines, g_stack, x,
              *scalars):
    out, M = _forward(topology, tol, max_iters, batch_chunk, cpu_kernel, cells, lines, g_stack,
                      x, scalars)
    # Node states are recomputed in the backward pass (together with the adjoint): storing them
    # would cost B*K*N*P values.
    return out, (g_stack, x, scalars, M)


def _core_bwd(topology, tol, max_iters, batch_chunk, cpu_kernel, cells, lines, saved,
              cotangents):
    g_stack, x, scalars, M = saved
    I_bar = cotangents[0].astype(g_stack.dtype)

    def grads(form, g_stack, x, I_bar, *scalars):
        return pair_grads(topology, tol, max_iters, batch_chunk, form, g_stack, x, I_bar,
                          scalars, cells)

    if M is None:
        g_bar, x_bar, r_bars = _per_platform(lines, grads, g_stack, x, I_bar, *scalars)
    else:
        # L = sum(I_bar * (x @ M.T)) is bilinear in the fields of forward and adjoint solves:
        # sum_b v(x_b) vhat(I_bar_b) = sum_j v(x~_j) vhat(e_j) with x~ = I_bar.T @ x, so N pairs
        # replace B; and dL/dx = I_bar @ M exactly.
        x_tilde = jnp.matmul(I_bar.T, x, precision=HIGHEST)
        eye = jnp.eye(I_bar.shape[1], dtype=I_bar.dtype)
        g_bar, _, r_bars = _per_platform(lines, grads, g_stack, x_tilde, eye, *scalars)
        x_bar = jnp.matmul(I_bar, M, precision=HIGHEST)
    cast = lambda v, ref: jnp.asarray(v).astype(jnp.result_type(ref))  # noqa: E731
    r_bars = tuple(cast(v, ref) for v, ref in zip(r_bars, scalars[:4], strict=True))
    return (g_bar.astype(g_stack.dtype), x_bar.astype(x.dtype), *r_bars,
            jnp.zeros_like(scalars[4]))


_core.defvjp(_core_fwd, _core_bwd)


def _prepare(g, v, r_row, r_col, g_neg, r_driver, r_integrator, extra_rows):
    g = jnp.asarray(g)
    if g.ndim != 2:
        raise ValueError(f"g must be (K, N) (vmap over arrays), got shape {g.shape}")
    parts = [g, v, r_row, r_col, r_driver, r_integrator] + ([g_neg] if g_neg is not None else [])
    dtype = jnp.result_type(*parts)
    if not jnp.issubdtype(dtype, jnp.floating):
        dtype = jnp.result_type(float)
    g_stack = g[None] if g_neg is None else jnp.stack([g, jnp.asarray(g_neg)])
    g_stack = g_stack.astype(dtype)
    v = jnp.asarray(v, dtype)
    K, N = g.shape
    if v.shape[-1] != K:
        raise ValueError(f"inputs must end in K={K}, got shape {v.shape}")
    lead = v.shape[:-1]
    x = v.reshape(-1, K)
    scalars = [
        jnp.asarray(s, dtype)
        for s in (r_row, r_col, r_driver, r_integrator, extra_rows)
    ]
    for s, name in zip(scalars, ("r_row", "r_col", "r_driver", "r_integrator", "extra_rows"),
                       strict=True):
        if s.ndim:
            raise ValueError(f"{name} must be a scalar (vmap to sweep it), got {s.shape}")
        if not isinstance(s, jax.core.Tracer) and not bool(s >= 0):
            raise ValueError(f"{name} must be >= 0, got {float(s)}")
    return g_stack, x, scalars, lead, N


def default_tol(dtype) -> float:
    """The solver tolerance when none is given: 1e-6 in float64, 1e-5 in float32 (and below).

    float32 sweeps over arrays of about a thousand rows resolve the output currents to a few
    1e-6 (rounding in the recurrences along the lines): at large r a float32 tolerance of 1e-6
    is then out of reach, or looks reached only when one change lands below it by chance.

    Args:
      dtype: the solve's floating-point dtype.

    Returns:
      The relative tolerance of the output currents.
    """
    return 1e-6 if jnp.finfo(dtype).eps < 1e-10 else 1e-5


def _solve(topology, g, v, r_row, r_col, g_neg, r_driver, r_integrator, extra_rows, tol,
           max_iters, batch_chunk, cpu_kernel=True, error_scale="output", lines="auto"):
    if error_scale not in _ERROR_SCALES:
        raise ValueError(f"error_scale must be one of {_ERROR_SCALES}, got {error_scale!r}")
    _check_lines(lines)
    g_stack, x, scalars, lead, N = _prepare(
        g, v, r_row, r_col, g_neg, r_driver, r_integrator, extra_rows
    )
    tol = default_tol(g_stack.dtype) if tol is None else tol
    if x.shape[0] == 0:
        z = jnp.zeros((), g_stack.dtype)
        return jnp.zeros(lead + (N,), g_stack.dtype), make_info(jnp.int32(0), z, tol, z.dtype)
    I, info = _core_jit(topology, float(tol), int(max_iters), batch_chunk, bool(cpu_kernel),
                        error_scale == "cells", lines, g_stack, x, *scalars)
    return I.reshape(lead + (N,)), info


# Compiled once per configuration, also for eager (un-jitted) callers; inlined under jit.
_core_jit = jax.jit(_core, static_argnums=(0, 1, 2, 3, 4, 5, 6))
_ERROR_SCALES = ("output", "cells")


def solve_input_source(g, v, r_row, r_col, *, g_neg=None, r_driver=0.0, r_integrator=0.0,
                       extra_rows=0, tol=None, max_iters=1000, batch_chunk=None,
                       cpu_kernel=True, error_scale="output", lines="auto"):
    """Column currents of an input-source (full crossbar) array with IR drop (PHYSICS.md §6).

    Input k drives row line k at its column-0 end through `r_row + r_driver`; `r_row` lies
    between adjacent cells (none after the last column); bit line n has `r_col` after each
    cell, the last one (plus `extra_rows * r_col + r_integrator`) into a virtual-ground
    integrator. With at least `N` input vectors the currents are computed through the
    array's transfer matrix (N adjoint solves, then `v @ M.T`; same tolerance on the currents).
    Differentiable (reverse mode) in `g`, `g_neg`, `v` and the resistances by implicit
    differentiation; jit- and vmap-compatible.

    Args:
      g: (K, N) normalized cell conductances `G / Gmax` of one array (vmap for more arrays).
      v: (..., K) normalized input voltages, one row per input vector (any sign).
      r_row: normalized segment resistance `Rp * Gmax` of the row lines (scalar >= 0, may be
        traced, e.g. swept with vmap).
      r_col: normalized segment resistance of the bit lines (scalar >= 0).
      g_neg: optional (K, N) conductances of interleaved negative cells: each shares the bit-line
        node of its positive partner and sits on its own row line, driven by `-v`. The output
        is then the net bit-line current (ideal: `v @ (g - g_neg)`). (Non-interleaved pairs
        are two calls.)
      r_driver: terminal resistance added to the driver-side segment of every row line.
      r_integrator: terminal resistance added to the last bit-line segment.
      extra_rows: unused physical rows below the used ones: the last bit-line segment becomes
        `(extra_rows + 1) * r_col`.
      tol: stop when the estimated relative error of each vector's currents (see
        `SolveInfo`) is at most `tol`. None: `default_tol` of the dtype (1e-6 in
        float64, 1e-5 in float32).
      max_iters: maximum number of sweeps.
      batch_chunk: input vectors (transfer path: adjoint columns) solved together; memory is
        about `chunk * K * N * (4 P + 4)` values. None: about 384 MiB of solver state.
      cpu_kernel: on the CPU backend, compute the transfer matrix with the numba kernel of
        `jaxbar.core.ir.cpu_kernel` (falling back to this solver where its Gauss-Seidel passes
        converge slowly); False: always this XLA solver.
      error_scale: what the error of each vector's currents is relative to: `"output"` its
        largest output current; `"cells"` its largest current of the cells of both polarities
        added (the same without `g_neg`). With interleaved cells the output is a difference,
        which float32 rounding of the two polarities' currents limits to about 1e-5 of their
        sum: where the differences are small (e.g. `program`'s single-row probes of a layer
        with zero-mean weights), `"output"` can be out of reach while `"cells"` is not.
      lines: the form of the XLA solver's line eliminations: `"sequential"` (a loop step
        per node), `"parallel"` (associative scans: logarithmic depth, more work), or
        `"auto"`: sequential where the computation is lowered for a CPU, parallel elsewhere.
        `SolveInfo.lines` reports the form that ran.

    Returns:
      (currents, info): currents (..., N) into the integrators in array output units (ideal:
      `v @ g`); `info` a `SolveInfo`. Non-convergence is only reported in `info`:
      pass it to `check_convergence`.
    """
    return _solve("input_source", g, v, r_row, r_col, g_neg, r_driver, r_integrator, extra_rows,
                  tol, max_iters, batch_chunk, cpu_kernel, error_scale, lines)


def solve_gated_source(g, b, r_row, r_col, *, g_neg=None, r_driver=0.0, r_integrator=0.0,
                       extra_rows=0, tol=None, max_iters=1000, batch_chunk=None,
                       cpu_kernel=True, lines="auto"):
    """Column currents of a gated-source array with IR drop (PHYSICS.md §6).

    Each column has a supply line (ideal source at the top, `r_row + r_driver` to row 0,
    `r_row` between rows) and a bit line (`r_col` after each cell, the last one plus
    `extra_rows * r_col + r_integrator` into the integrator). A cell whose bit is non-zero
    connects the two lines with a series drive: `i = |b| g (b + s - v)`; a cell whose bit is 0
    is off. One call is one input bit slice (PHYSICS.md §3). Every column is a ladder (its
    supply and bit lines, the cells as rungs) and is eliminated exactly, per input vector: the
    currents need no sweeps and carry no iteration error. Differentiable (reverse mode) in
    `g`, `g_neg` and the resistances (the gradient's adjoint solves are block Gauss-Seidel
    sweeps to `tol`); the gradient in `b` is the formal one of `|b| g (b + s - v)`. jit-
    and vmap-compatible.

    Args:
      g: (K, N) normalized cell conductances `G / Gmax` of one array (vmap for more arrays).
      b: (..., K) input bits in {-1, 0, +1}, one row per input vector.
      r_row: normalized segment resistance `Rp * Gmax` of the supply lines (scalar >= 0, may
        be traced).
      r_col: normalized segment resistance of the bit lines (scalar >= 0).
      g_neg: optional (K, N) conductances of interleaved negative cells: each shares the bit-line
        node of its positive partner, driven by `-b` from its own supply line. The output is
        then the net bit-line current (ideal: `b @ (g - g_neg)`).
      r_driver: terminal resistance added to the first supply-line segment of every column.
      r_integrator: terminal resistance added to the last bit-line segment.
      extra_rows: unused physical rows below the used ones: the last bit-line segment becomes
        `(extra_rows + 1) * r_col`.
      tol: of the gradient's adjoint sweeps (see `SolveInfo`). None:
        `default_tol` of the dtype (1e-6 in float64, 1e-5 in float32).
      max_iters: maximum number of adjoint sweeps.
      batch_chunk: input vectors of one adjoint solve; memory is about
        `chunk * K * N * (6 P + 6)` values. None: about 384 MiB of solver state.
      cpu_kernel: on a CPU, eliminate with the numba kernel of `jaxbar.core.ir.ladder_kernel`
        (rows whose bit is 0 skipped) where numba is installed; False: always the XLA scan.
      lines: the form of the line eliminations of the gradient's sweeps, as
        `solve_input_source`.

    Returns:
      (currents, info): currents (..., N) into the integrators in array output units (ideal:
      `b @ g`); `info` a `SolveInfo`. Non-convergence is only reported in `info`:
      pass it to `check_convergence`.
    """
    return _solve("gated_source", g, b, r_row, r_col, g_neg, r_driver, r_integrator, extra_rows,
                  tol, max_iters, batch_chunk, cpu_kernel, lines=lines)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _per_read(cpu_kernel, g_stack, x, *res):
    return ladder_currents(cpu_kernel, g_stack, x, res)


def _per_read_fwd(cpu_kernel, g_stack, x, *res):
    return _per_read(cpu_kernel, g_stack, x, *res), None


def _per_read_bwd(cpu_kernel, saved, cotangents):
    raise NotImplementedError(
        "solve_gated_source_per_read (read noise with parasitics) is not differentiable")


_per_read.defvjp(_per_read_fwd, _per_read_bwd)


def solve_gated_source_per_read(g, b, r_row, r_col, *, g_neg=None, r_driver=0.0,
                                r_integrator=0.0, extra_rows=0, cpu_kernel=True):
    """As `solve_gated_source` with one set of conductances per input vector.

    For reads whose conductances differ (read noise, PHYSICS.md §2): every vector's columns are
    eliminated exactly with its own cells. Not differentiable (forward only).

    Args:
      g: (..., K, N) conductances of each read (the leading axes of `b`).
      b: (..., K) input bits in {-1, 0, +1}.
      r_row, r_col, r_driver, r_integrator, extra_rows, cpu_kernel: as
        `solve_gated_source`.
      g_neg: optional (..., K, N) conductances of the interleaved negative cells of each read.

    Returns:
      (currents (..., N), info): `info` as `solve_gated_source` reports it.
    """
    b = jnp.asarray(b)
    g = jnp.asarray(g)
    parts = [g, b, r_row, r_col, r_driver, r_integrator] + ([g_neg] if g_neg is not None else [])
    dtype = jnp.result_type(*parts)
    if not jnp.issubdtype(dtype, jnp.floating):
        dtype = jnp.result_type(float)
    lead, K = b.shape[:-1], b.shape[-1]
    N = g.shape[-1]
    for name, a in (("g", g), ("g_neg", g_neg)):
        if a is not None and jnp.shape(a) != lead + (K, N):
            raise ValueError(f"{name} must be (..., K, N) with the leading axes of b "
                             f"{lead + (K,)}, got shape {jnp.shape(a)}")
    stack = [g] if g_neg is None else [g, jnp.asarray(g_neg)]
    g_stack = jnp.stack([a.reshape(-1, K, N) for a in stack], axis=1).astype(dtype)
    x = b.reshape(-1, K).astype(dtype)
    res = resistances(*(jnp.asarray(v, dtype) for v in (r_row, r_col, r_driver, r_integrator,
                                                          extra_rows)))
    I, path = _per_read(bool(cpu_kernel), g_stack, x, *res)
    zero = jnp.zeros((), dtype)
    return I.reshape(lead + (N,)), make_info(jnp.int32(0), zero, 0.0, dtype, path)


def _nodes(topology, g, v, r_row, r_col, g_neg, r_driver, r_integrator, extra_rows, tol,
           max_iters, batch_chunk, lines):
    _check_lines(lines)
    g_stack, x, scalars, lead, N = _prepare(
        g, v, r_row, r_col, g_neg, r_driver, r_integrator, extra_rows
    )
    g_stack, x, scalars = jax.lax.stop_gradient((g_stack, x, scalars))
    tol = default_tol(g_stack.dtype) if tol is None else tol
    I, info, line, w = _nodes_jit(topology, float(tol), int(max_iters), batch_chunk, lines,
                                  g_stack, x, *scalars)
    P, K = g_stack.shape[:2]
    return NodeVoltages(
        line=line.reshape(lead + (P, K, N)),
        bit=w.reshape(lead + (K, N)),
        currents=I.reshape(lead + (N,)),
        info=info,
    )


@functools.partial(jax.jit, static_argnums=(0, 1, 2, 3, 4))
def _nodes_jit(topology, tol, max_iters, batch_chunk, lines, g_stack, x, *scalars):
    P = g_stack.shape[0]
    signs = jnp.asarray([1.0, -1.0][:P], g_stack.dtype)

    def solve(form, g_stack, x, *scalars):
        return solve_batch(topology, g_stack, x, resistances(*scalars), tol, max_iters,
                           batch_chunk, signs, form, True)

    I, info, a, w = _per_platform(lines, solve, g_stack, x, *scalars)
    a = jnp.moveaxis(a, -1, 1)  # (B, P, K, N)
    if topology == "input_source":
        line = signs[None, :, None, None] * x[:, None, :, None] - a
    else:
        line = -a  # supply-node voltage: minus the drop from the source
    return I, info, line, w


def input_source_nodes(g, v, r_row, r_col, *, g_neg=None, r_driver=0.0, r_integrator=0.0,
                       extra_rows=0, tol=None, max_iters=1000, batch_chunk=None,
                       lines="auto"):
    """Node voltages of `solve_input_source` (same arguments; not differentiable).

    Returns:
      `NodeVoltages` with `line` the row-line node voltages (..., P, K, N).
    """
    return _nodes("input_source", g, v, r_row, r_col, g_neg, r_driver, r_integrator, extra_rows,
                  tol, max_iters, batch_chunk, lines)


def gated_source_nodes(g, b, r_row, r_col, *, g_neg=None, r_driver=0.0, r_integrator=0.0,
                       extra_rows=0, tol=None, max_iters=1000, batch_chunk=None,
                       lines="auto"):
    """Node voltages of `solve_gated_source` (same arguments; not differentiable).

    Returns:
      `NodeVoltages` with `line` the supply-line node voltages (..., P, K, N) (<= 0 for
      positive bits: the drop from the ideal source).
    """
    return _nodes("gated_source", g, b, r_row, r_col, g_neg, r_driver, r_integrator, extra_rows,
                  tol, max_iters, batch_chunk, lines)
