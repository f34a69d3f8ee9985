"""Exact, differentiable IR-drop (parasitic wire resistance) solver for crossbar arrays.

Implements PHYSICS.md §6. Two topologies:

* **input-source** (full crossbar): input k drives row line k from its column-0 end; cells connect
  row node (k, n) to bit-line node (k, n); bit line n ends in a virtual-ground integrator below
  row K-1.
* **gated-source**: each column n has a supply line (source at the top, next to row 0) and a bit
  line (integrator at the bottom); a selected cell connects the two with a series drive `b[k]`.

Both are two families of resistive lines ("A-lines": row lines or supply lines; "B-lines": bit
lines) coupled through the cells. The node equations are solved by block Gauss-Seidel, starting
from the bit lines solved with ideal A-lines (the bit-line drop is the large effect): an exact
solve along every A-line given the bit-line voltages, then along every B-line given the A-line
voltages, with adaptive over-relaxation (block SOR, optimal for this 2-cyclic system) when the
sweeps converge slowly. Each line solve is the exact O(L) elimination written in physical
admittance form (see `_line_factor`), so zero resistances (also a line shorted behind a
terminal resistance) need no special case and nothing is divided by a resistance. Sweeps stop on
an error estimate of the output currents built from their relative change per sweep and the
observed contraction rate (see `SolveInfo`).

Input-source circuits do not depend on the inputs. With at least `N` input vectors the solver
therefore computes the transfer matrix `M` (`I = v @ M.T`) from `N` adjoint solves
(reciprocity: row j of `M` is the set of driver currents when column j is driven) and applies it
with one matrix product, converging on the currents of the given vectors. Lowered for a CPU, a
float32 transfer matrix is computed by the numba kernel of `jaxbar.core.ir_cpu` (the same
block Gauss-Seidel iteration, fused into one pass over the rows per sweep, 16 adjoint circuits per
SIMD vector), which falls back to this solver where Gauss-Seidel sweeps converge slowly.

Gated-source columns do not touch each other: each is a ladder (its supply and bit lines, the
cells as rungs), eliminated exactly per input vector (`_ladder_xla`; on CPUs the kernel of
`jaxbar.core._ir_ladder`, which skips rows whose bit is 0). Their forward solve needs no
sweeps; their gradients use the sweeps above.

Gradients use implicit differentiation (`jax.custom_vjp`): the adjoint of the linear
circuit is the same circuit driven by the output cotangents, solved by the same solver, and
resistance sensitivities are products of forward and adjoint segment currents. Only reverse-mode
differentiation is supported.

Precision: the iteration error is controlled by `tol`; float32 rounding adds about
`sqrt(K) * eps` relative (~1e-6 for K = 1152), more when most of the current is lost to IR drop.
An interleaved pair's output is a difference: the rounding is that of the two polarities'
currents, which can exceed `tol` relative to a small difference (`error_scale="cells"`
converges relative to them). Use float64 where that matters.

All voltages and currents are normalized (PHYSICS.md §0, §6): conductances `g = G/Gmax`,
resistances `r = R*Gmax`, currents in array output units (the ideal result is `v @ g`).
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
from jax import lax

from jaxbar.core import ir_cpu, line_scan
from jaxbar.core.ir_constants import MAX_MU2, MAX_RATE, NOISE_ULPS, SAFETY, SOR_THRESHOLD, SOR_WAIT

__all__ = [
    "ConvergenceError",
    "LINES_PARALLEL",
    "LINES_SEQUENTIAL",
    "NodeVoltages",
    "PATH_DIRECT",
    "PATH_KERNEL",
    "PATH_KERNEL_THEN_XLA",
    "PATH_LADDER",
    "PATH_LADDER_KERNEL",
    "PATH_TRANSFER",
    "SolveInfo",
    "check_convergence",
    "convergence_error",
    "default_tol",
    "gated_source_nodes",
    "input_source_nodes",
    "quiet_callback_logs",
    "solve_gated_source",
    "solve_gated_source_per_read",
    "solve_input_source",
    "solving",
]

Array = jax.Array

# Working-set budget of one batch chunk when `batch_chunk=None` (bytes of solver fields).
_CHUNK_BYTES = 384 * 2**20
# A vector whose output change has not halved for this many sweeps has stalled (rounding
# noise): the solve stops early and reports it unconverged instead of running max_iters.
_STALL = 100
# Matrix products are exact float32 (no TF32/bf16 passes on accelerators).
_HIGHEST = lax.Precision.HIGHEST
# Input-source batches of at least this many vectors per column use the transfer matrix.
_TRANSFER_RATIO = 1


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
#: `SolveInfo.lines` codes.
LINES_SEQUENTIAL, LINES_PARALLEL = 0, 1


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


class ConvergenceError(RuntimeError):
    """Raised by `check_convergence` when an IR-drop solve did not converge."""


# --------------------------------------------------------------------------------------------
# Line primitives.
#
# Field layout inside the solver: (K, N, P, Bc): rows, columns, polarity (1, or 2 interleaved),
# batch chunk innermost so every slice along a line is vectorized over the batch.


def _index(x, j, axis):
    """Slice `x` at position `j` of `axis` (broadcast axes of size 1 are just squeezed)."""
    if x.shape[axis] == 1:
        return lax.index_in_dim(x, 0, axis, keepdims=False)
    return lax.dynamic_index_in_dim(x, j, axis, keepdims=False)


def _scan_axis(body, init, inputs, axis, length, reverse, out_shape, dtype):
    """Sequential loop along `axis`: `carry, y_j = body(carry, j, slices_j)`; y stacked."""

    def step(i, state):
        carry, out = state
        j = length - 1 - i if reverse else i
        carry, y = body(carry, j, tuple(_index(x, j, axis) for x in inputs))
        out = lax.dynamic_update_index_in_dim(out, y.astype(dtype), j, axis)
        return carry, out

    out = jnp.zeros(out_shape, dtype)
    return lax.fori_loop(0, length, step, (init, out))


def _line_factor(G, axis, boundary_first, r_end, r_seg, lines):
    """Admittance factors of a family of lines (the O(L) elimination, done once per circuit).

    Each line has L nodes along `axis`; node j connects through a cell of conductance `G_j`
    to a node of known voltage, through segment resistances to its neighbours, and through the
    boundary segment `r_end` to its source or integrator (at index 0 if `boundary_first`,
    else at L-1); the other end is open. Eliminating from the open end, the rest of the line seen
    from node j is an admittance `Y_j = G_j + rho_{j+1} Y_{j+1}` with `rho_j = 1 / (1 + R_j
    Y_j)` (a series segment R_j in front of it). All quantities are non-negative sums and
    products, so the elimination is stable, exact for R = 0 and never divides by a resistance.
    `lines`: "sequential" (a loop step per node) or "parallel" (`line_scan`: log-depth scans).

    Returns:
      rho: same shape as `G`.
    """
    if lines == "parallel":
        return line_scan.line_factor(G, axis, boundary_first, r_end, r_seg)
    L = G.shape[axis]
    b_idx = 0 if boundary_first else L - 1
    slice_shape = G.shape[:axis] + G.shape[axis + 1 :]

    def body(carry, j, xs):
        (Gj,) = xs
        Y = Gj + carry
        rho = 1.0 / (1.0 + jnp.where(j == b_idx, r_end, r_seg) * Y)
        return rho * Y, rho

    _, rho = _scan_axis(
        body, jnp.zeros(slice_shape, G.dtype), (G,), axis, L, boundary_first, G.shape, G.dtype
    )
    return rho


def _line_solve(rho, c_fn, c_inputs, c_shape, axis, boundary_first, r_end, r_seg, relax, lines,
                acc_fn=None, acc_inputs=()):
    """Exact solve of a family of lines for given cell current injections.

    `c_fn(*slices)` returns the current injected at node j of every line (e.g. `G (e - w)`),
    which is reduced by `G_j` times the node's own drop. A first pass from the open end
    accumulates Norton currents `H_j = c_j + rho_{j+1} H_{j+1}`; a second pass from the boundary
    recovers the drops `d_j = rho_j (d_{j-1} + R_j H_j)` (`d` = voltage drop measured from
    the boundary: row/supply drop for A-lines, bit-line voltage for B-lines).

    Args:
      relax: `(old, omega)`: the returned field is `old + omega (d - old)` (block SOR);
        None: `d` (Gauss-Seidel, without reading the old field).
      lines: "sequential" (loops) or "parallel" (`line_scan`; `c_fn` and `acc_fn` then see
        whole fields instead of slices, and the reduction is a sum after the scans).
      acc_fn: optional `acc_fn(out_j, *acc_slices)` summed over the line during the second
        pass (fused reduction of the new field).

    Returns:
      (out, J, acc): the relaxed drops (shape `c_shape`), the (unrelaxed) boundary currents
      (the current through the boundary segment: integrator currents for bit lines) and the
      reduction (None if no acc_fn).
    """
    if lines == "parallel":
        c = jnp.broadcast_to(c_fn(*c_inputs), c_shape)
        d, J = line_scan.line_solve(rho, c, axis, boundary_first, r_end, r_seg)
        out = d if relax is None else relax[0] + relax[1] * (d - relax[0])
        acc = None if acc_fn is None else jnp.sum(acc_fn(out, *acc_inputs), axis=axis)
        return out, J, acc
    L = c_shape[axis]
    b_idx = 0 if boundary_first else L - 1
    slice_shape = c_shape[:axis] + c_shape[axis + 1 :]
    dtype = rho.dtype

    def h_body(carry, j, xs):
        rho_j, *rest = xs
        H = c_fn(*rest) + carry
        return rho_j * H, H

    J, H = _scan_axis(
        h_body, jnp.zeros(slice_shape, dtype), (rho, *c_inputs), axis, L, boundary_first,
        c_shape, dtype,
    )

    def d_body(carry, j, xs):
        d_prev, acc = carry
        if relax is None:
            rho_j, H_j, *rest = xs
        else:
            rho_j, H_j, old_j, *rest = xs
        d = rho_j * (d_prev + jnp.where(j == b_idx, r_end, r_seg) * H_j)
        out = d if relax is None else old_j + relax[1] * (d - old_j)
        if acc_fn is not None:
            acc = acc + acc_fn(out, *rest)
        return (d, acc), out

    acc0 = None if acc_fn is None else jnp.zeros(slice_shape, dtype)
    (_, acc), out = _scan_axis(
        d_body, (jnp.zeros(slice_shape, dtype), acc0),
        (rho, H, *(() if relax is None else relax[:1]), *acc_inputs), axis, L,
        not boundary_first, c_shape, dtype,
    )
    return out, J, acc


# --------------------------------------------------------------------------------------------
# The block Gauss-Seidel / SOR iteration for one batch chunk.


class _Circuit(NamedTuple):
    """Everything that defines the linear circuit of one chunk (arrays in solver layout)."""

    g: Array  # (K, N, P, 1) cell conductances
    mask: Array | None  # gated: (K, 1, 1, Bc) |bit| (cell selected); None for input-source
    rho_a: Array  # A-line factors: (K, N, P, 1) or (K, N, P, Bc)
    rho_b: Array  # B-line factors: (K, N, 1, 1) or (K, N, 1, Bc)
    r_a: Array  # A-line segment
    r_a_end: Array  # first A-line segment (with the driver's terminal resistance)
    r_b: Array  # bit-line segment
    r_b_end: Array  # last bit-line segment (unused rows and integrator resistance)

    @property
    def a_axis(self) -> int:
        """Axis of the A-lines: 1 (row lines along N, input-source), 0 (supply lines, gated).

        The topology is carried by the mask (None for input-source), so the circuit stays a
        plain pytree of arrays. (Row-line steps read strided slices; measured faster on CPU
        than transposing the fields twice per sweep.)
        """
        return 1 if self.mask is None else 0


def _make_circuit(topology, g_l, mask, res, lines):
    """Factor the A- and B-lines of a circuit (g_l: (K, N, P, 1); mask: None or (K,1,1,Bc))."""
    assert (mask is None) == (topology == "input_source")
    r_a, r_a_end, r_b, r_b_end = res
    G = g_l if mask is None else g_l * mask
    rho_a = _line_factor(G, 1 if mask is None else 0, True, r_a_end, r_a, lines)
    rho_b = _line_factor(jnp.sum(G, axis=2, keepdims=True), 0, False, r_b_end, r_b, lines)
    return _Circuit(g_l, mask, rho_a, rho_b, r_a, r_a_end, r_b, r_b_end)


def _cell_g(g, m):
    return g if m is None else g * m


def _sweep(cir, e_row, e_col, a, w, omega, with_loss, lines):
    """One block-SOR sweep (omega = 1: Gauss-Seidel); `lines`: the line solves' form.

    The unknowns are drops: `a` (K, N, P, Bc) along the A-lines (row lines: drive minus node
    voltage; supply lines: minus the node voltage) and `w` (K, N, 1, Bc), the bit-line node
    voltages; a cell sees `e - a - w`. `e_row` (K, 1, P, Bc) and `e_col` (1, N, 1, Bc)
    are the cell drives per row and per column (either may be None); a cell's drive `e` is
    their sum.

    Returns:
      (a, w, J_a, J_b, loss): new fields; the boundary currents of the A-lines (driver / source
      currents: (K, P, Bc) input-source, (N, P, Bc) gated) and of the bit lines (integrator
      currents, (N, 1, Bc)); `loss` (N, 1, Bc) = sum over rows and polarities of
      `G (a + w)` (the output currents are also the ideal ones minus this loss), None unless
      `with_loss`.
    """
    mask = () if cir.mask is None else (cir.mask,)
    has_mask = cir.mask is not None
    drives = tuple(e for e in (e_row, e_col) if e is not None)
    n_drives = len(drives)

    def split(rest):
        m = rest[0] if has_mask else None
        rest = rest[1:] if has_mask else rest
        e = rest[0]
        for extra in rest[1:n_drives]:
            e = e + extra
        return m, e, rest[n_drives:]

    def c_a(g, *rest):  # A-node injection: G (e - w) (the cell current is this - G a)
        m, e, (w_j,) = split(rest)
        return _cell_g(g, m) * (e - w_j)

    def c_b(g, *rest):  # B-node injection: sum_p G (e - a)
        m, e, (a_j,) = split(rest)
        return jnp.sum(_cell_g(g, m) * (e - a_j), axis=-2, keepdims=True)

    def loss(w_j, g, a_j, *m):  # sum_p G (a + w) at one row, accumulated along the bit line
        return jnp.sum(_cell_g(g, m[0] if m else None) * (a_j + w_j), axis=-2, keepdims=True)

    # omega (Bc,) broadcasts against every line slice (..., Bc).
    a, J_a, _ = _line_solve(
        cir.rho_a, c_a, (cir.g, *mask, *drives, w), a.shape, cir.a_axis, True, cir.r_a_end,
        cir.r_a, (a, omega), lines,
    )
    w, J_b, lost = _line_solve(
        cir.rho_b, c_b, (cir.g, *mask, *drives, a), w.shape, 0, False, cir.r_b_end, cir.r_b,
        (w, omega), lines, loss if with_loss else None, (cir.g, a, *mask) if with_loss else (),
    )
    return a, w, J_a, J_b, lost


def _ideal(cir, e_row, e_col):
    """Ideal (IR-free) output currents (Bc, N) of the chunk's drives, by matrix products."""
    g = cir.g[..., 0]  # (K, N, P)
    drive = e_row[:, 0] if cir.mask is None else e_row[:, 0] * cir.mask[:, 0]  # (K, P, Bc)
    ideal = jnp.einsum("knp,kpb->bn", g, drive, precision=_HIGHEST)
    if e_col is not None:
        if cir.mask is None:
            gsum = jnp.sum(g, axis=(0, 2))[None, :]  # (1, N)
        else:
            gsum = jnp.einsum("knp,kb->bn", g, cir.mask[:, 0, 0], precision=_HIGHEST)
        ideal = ideal + gsum * e_col[0, :, 0, :].T
    return ideal


def _safe_div(num, den):
    """Num / den for num, den >= 0, with 0/0 = 0 and x/0 = inf (no reciprocal overflow)."""
    ok = den > 0
    return jnp.where(ok, num / jnp.where(ok, den, 1.0), jnp.where(num > 0, jnp.inf, 0.0))


class _Control(NamedTuple):
    """Per-vector convergence and relaxation control of the sweeps."""

    d: Array  # last relative change of the readout
    rate: Array  # last observed contraction d_t / d_{t-1}
    omega: Array  # relaxation factor (1: Gauss-Seidel)
    t_upd: Array  # sweep of the last relaxation update
    d_best: Array  # smallest change so far (halving reference for stall detection)
    stall_from: Array  # sweep when d_best last halved
    err: Array  # estimated error of the readout


def _control_init(n, dtype):
    one = jnp.ones((n,), dtype)
    return _Control(
        d=one, rate=0.0 * one, omega=one, t_upd=jnp.full((n,), -SOR_WAIT, jnp.int32),
        d_best=jnp.full((n,), jnp.inf, dtype), stall_from=jnp.zeros((n,), jnp.int32),
        err=jnp.full((n,), jnp.inf, dtype),
    )


def _control_step(ctl, t, d):
    """Update the control after sweep `t` (0-based) whose readout changed by `d`."""
    # Observed contraction per sweep (-> spectral radius of the iteration): inflates the change
    # into an error estimate when convergence is slow, and tunes the relaxation.
    rate = jnp.where(t > 0, _safe_div(d, ctl.d), 0.0)
    rate_c = jnp.clip(rate, 0.0, MAX_RATE)
    # Error left after this sweep, for geometric convergence: d rate / (1 - rate). Plain
    # Gauss-Seidel converges monotonically (real spectrum), so from the second sweep on (the first
    # ratio of two changes; the sweeps start from a solved state, see _start) this estimate, with
    # a safety factor, may also be below d: fast cases stop one sweep earlier. Over-relaxed
    # sweeps may oscillate: never below d there.
    tail = rate_c / (1.0 - rate_c)
    monotone = (t >= 1) & (ctl.omega == 1.0)
    err = d * jnp.where(monotone, SAFETY * tail, jnp.maximum(1.0, tail))
    # Changes of a few ulps carry no rate information: the sweeps have reached the rounding
    # floor (typically a fixed cycle in float32), and the error is that of rounding. Right
    # after a change above the noise, though, the true change is at most d + noise and the rate
    # at most (d + noise) / d_prev: that tail may be smaller (fast cases stop a sweep earlier).
    noise = NOISE_ULPS * jnp.finfo(d.dtype).eps
    hi = d + noise
    rate_hi = jnp.clip(_safe_div(hi, ctl.d), 0.0, MAX_RATE)
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
    mu2 = jnp.clip(_safe_div((rate_c + omega - 1.0) ** 2, rate_c * omega**2), 0.0, MAX_MU2)
    omega = jnp.where(update, jnp.maximum(omega, 2.0 / (1.0 + jnp.sqrt(1.0 - mu2))), omega)
    halved = d <= 0.5 * ctl.d_best
    return _Control(
        d=d, rate=rate, omega=omega, t_upd=jnp.where(update, t, ctl.t_upd),
        d_best=jnp.where(halved, d, ctl.d_best),
        stall_from=jnp.where(halved, t, ctl.stall_from), err=err,
    )


def _start(cir, e_row, e_col, n_vec, with_loss, lines, cols=None):
    """Bit lines solved first, with ideal A-lines (`a = 0`): the starting fields of the sweeps.

    The bit-line drop is the large effect (a bit line collects the currents of every row), the
    A-line drop a correction to it; starting from zero instead makes the first A-line solve see
    grounded bit lines, which costs a sweep or more.

    Args:
      cols: for transfer-matrix chunks (`e_col` = -1 in column `cols[c]` of vector c, no
        `e_row`), the driven column of each vector: only that bit line carries current with
        ideal A-lines, so all of them are solved as one (K, N) family instead of (K, N, n_vec).

    Returns:
      (a, w, J_a, J_b, lost): as `_sweep`; `J_a` is the sum of the cell currents of each
      A-line (its boundary current when it has no drop).
    """
    dtype = cir.rho_b.dtype
    K, N, P = cir.g.shape[:3]
    a = jnp.zeros((K, N, P, n_vec), dtype)
    mask = () if cir.mask is None else (cir.mask,)
    G = cir.g if cir.mask is None else cir.g * cir.mask
    if cols is None:
        e = sum(x for x in (e_row, e_col) if x is not None)
        Ge = G * e  # cell currents with no drop anywhere
        n_lines = n_vec
    else:
        Ge = -cir.g  # (K, N, P, 1): column n driven, as vector "n" of a (K, N) family
        n_lines = 1

    def c_b(ge_j):
        return jnp.sum(ge_j, axis=-2, keepdims=True)

    def loss(w_j, g, *m):
        return jnp.sum(_cell_g(g, m[0] if m else None) * w_j, axis=-2, keepdims=True)

    w, J_b, lost = _line_solve(
        cir.rho_b, c_b, (Ge,), (K, N, 1, n_lines), 0, False, cir.r_b_end, cir.r_b, None, lines,
        loss if with_loss else None, (cir.g, *mask) if with_loss else (),
    )
    if cols is None:
        return a, w, jnp.sum(Ge - G * w, axis=cir.a_axis), J_b, lost
    # Spread the (K, N) family to the vectors: column cols[c] of vector c, nothing elsewhere
    # (a row line's only current is then that of its cell in the driven column).
    hot = (jnp.arange(N)[:, None] == cols[None, :]).astype(dtype)  # (N, n_vec)
    J_a = jnp.einsum("knp,nc->kpc", (Ge - G * w)[..., 0], hot, precision=_HIGHEST)
    lost = None if lost is None else lost * hot[:, None, :]
    return a, w * hot[None, :, None, :], J_a, J_b * hot[:, None, :], lost


def _sweep_loop(cir, e_row, e_col, tol, max_iters, n_vec, readout, readout_init, with_loss,
                lines, cols=None):
    """Block-SOR sweeps until every vector's readout converged or stalled, or max_iters.

    `readout(r_state, a, w, J_a, J_b, lost, omega) -> (r_state, d)` turns the fields after a
    sweep into the quantity whose relative change `d` (per vector) is the convergence measure.
    The sweeps start from `_start` (whose readout is the reference of the first change).

    Returns:
      (r_state, a, w, iterations, err).
    """
    dtype = cir.rho_b.dtype
    ones = jnp.ones((n_vec,), dtype)
    a0, w0, J_a, J_b, lost = _start(cir, e_row, e_col, n_vec, with_loss, lines, cols)
    readout_init, _ = readout(readout_init, a0, w0, J_a, J_b, lost, ones)

    def running(state):
        t, _, _, _, ctl = state
        # Stop when every vector has converged or stalled (its change has not halved for
        # _STALL sweeps: rounding noise, e.g. float32 at extreme IR loss), after at least two
        # sweeps (a single change carries no contraction rate).
        active = (ctl.err > tol) & (t - ctl.stall_from <= _STALL)
        return (t < max_iters) & ((t < 2) | jnp.any(active))

    def body(state):
        t, a, w, r_state, ctl = state
        a, w, J_a, J_b, lost = _sweep(cir, e_row, e_col, a, w, ctl.omega, with_loss, lines)
        r_state, d = readout(r_state, a, w, J_a, J_b, lost, ctl.omega)
        return t + 1, a, w, r_state, _control_step(ctl, t, d)

    state = (jnp.int32(0), a0, w0, readout_init, _control_init(n_vec, dtype))
    t, a, w, r_state, ctl = lax.while_loop(running, body, state)
    return r_state, a, w, t, ctl.err


def _iterate(cir, e_row, e_col, tol, max_iters, lines, cells=False):
    """Solve one chunk of input vectors to tolerance on the integrator currents.

    Args:
      cir: the `_Circuit`.
      e_row: (K, 1, P, Bc) cell drive per row (sign of the polarity included).
      e_col: None or (1, N, 1, Bc) cell drive per column (the adjoint sources).
      lines: the form of the line solves ("sequential" or "parallel").
      cells: converge relative to each vector's largest ideal current of the cells of both
        polarities added (`error_scale="cells"`), not to its largest output current.

    Returns:
      (I, a, w, iterations, error): I (Bc, N) integrator currents; a (K, N, P, Bc) A-line drops;
      w (K, N, 1, Bc) bit-line voltages; per-vector error (Bc,).
    """
    Bc = e_row.shape[-1]
    N = cir.g.shape[1]
    dtype = cir.rho_b.dtype
    ideal = _ideal(cir, e_row, e_col)
    if cells:
        # The polarities' currents are not tracked apart: their ideal sum sets the scale.
        floor = jnp.max(jnp.abs(_ideal(cir, jnp.abs(e_row), e_col)), axis=1)
    else:
        floor = jnp.zeros((Bc,), dtype)

    def readout(r_state, a, w, J_a, J_b, lost, omega):
        I, I_j = r_state
        # Two readings of the same currents: the integrator current of the bit-line solve
        # (relaxed like the fields), and the ideal current minus the IR loss. In float32 the
        # second is far more accurate while the loss is small, the first while it is large.
        I_j = I_j + omega[:, None] * (J_b[:, 0, :].T - I_j)
        lost = lost[:, 0, :].T
        I_new = jnp.where(jnp.abs(lost) <= 0.5 * jnp.abs(ideal), ideal - lost, I_j)
        scale = jnp.maximum(jnp.max(jnp.abs(I_new), axis=1), floor)
        d = _safe_div(jnp.max(jnp.abs(I_new - I), axis=1), scale)
        return (I_new, I_j), d

    zero = jnp.zeros((Bc, N), dtype)
    (I, _), a, w, t, err = _sweep_loop(
        cir, e_row, e_col, tol, max_iters, Bc, readout, (zero, zero), True, lines
    )
    return I, a, w, t, err


def _iterate_transfer(cir, e_col, cols, x, signs, tol, max_iters, lines, cells=False):
    """Rows of the transfer matrix `M` (I = x @ M.T) for a chunk of output columns.

    By reciprocity, row j of `M` (the response of integrator j to every input) is the set of
    driver currents of the adjoint circuit driven by -1 in every cell of column j (`e_col`).
    Converges on the currents of the actual inputs `x` (B, K): `max_b |dY_bj| / S_b` with
    `Y = x @ M_chunk.T` and `S_b` the largest |Y_bj| in the chunk (at most the largest
    current of vector b, so the test is conservative). `cols` (Nc,) are the driven columns
    (N or more: padding, not driven). `cells`: `S_b` from the currents of both polarities
    added instead (`error_scale="cells"`).

    Returns:
      (M (Nc, K), iterations, error (Nc,)).
    """
    Nc = e_col.shape[-1]
    K, _, P = cir.g.shape[:3]
    dtype = cir.rho_b.dtype
    g = cir.g[..., 0]  # (K, N, P)
    ideal = jnp.einsum("knp,nc->kpc", g, e_col[0, :, 0, :], precision=_HIGHEST)
    ideal_size = jnp.sum(jnp.abs(ideal), axis=(0, 1))

    def readout(r_state, a, w, J_a, J_b, lost, omega):
        # Two readings of the driver currents, as in _iterate: the ideal ones minus the IR loss
        # of the fields after the whole sweep (accurate in float32 while the loss is small), or
        # the A-line solve's own (accurate also for rows attenuated 10^4 times, but half a sweep
        # behind: they predate the bit-line update; relaxed like the fields). Chosen per driven
        # column: single entries may have no ideal current (a zero cell) and lose nothing.
        J, Y = r_state
        loss = jnp.einsum("knp,knpc->kpc", g, a + w, precision=_HIGHEST)
        small = jnp.sum(jnp.abs(loss), axis=(0, 1)) <= 0.5 * ideal_size
        J = jnp.where(small, ideal - loss, J + omega * (J_a - J))
        Y_new = jnp.matmul(x, _rows(J, signs).T, precision=_HIGHEST)
        Y_scale = Y_new if not cells else jnp.matmul(x, _rows(J, jnp.abs(signs)).T,
                                                     precision=_HIGHEST)
        scale = jnp.max(jnp.abs(Y_scale), axis=1, keepdims=True)
        d = jnp.max(_safe_div(jnp.abs(Y_new - Y), scale), axis=0)
        return (J, Y_new), d

    init = (jnp.zeros((K, P, Nc), dtype), jnp.zeros((x.shape[0], Nc), dtype))
    (J, _), _, _, t, err = _sweep_loop(
        cir, None, e_col, tol, max_iters, Nc, readout, init, False, lines, cols
    )
    return _rows(J, signs), t, err


def _rows(J, signs):
    """Transfer-matrix rows (Nc, K) from adjoint driver currents J (K, P, Nc)."""
    return -jnp.einsum("kpj,p->jk", J, signs, precision=_HIGHEST)


# --------------------------------------------------------------------------------------------
# Gated-source arrays: every column is a ladder, eliminated exactly.


def _ladder_segment(st, pa, pb):
    """Adds the supply segments `pa` and the bit-line segment `pb` above a ladder's top.

    `st` = (Y, A, Z, h, z): the part of the ladder below, seen from its top nodes, as
    `J = Y s + A C + h` (currents into its supply lines for supply voltages s and the current
    C entering its bit line) and `w = -A.T s + Z C + z` (its top bit-line voltage). Y is a
    tuple (y00,) or (y00, y01, y11); A and h are tuples of P entries.
    """
    Y, A, Z, h, z = st
    if len(A) == 1:
        m = 1.0 / (1.0 + pa * Y[0])
        A1, h1 = (m * A[0],), (m * h[0],)
        Y1 = (m * Y[0],)
    else:
        y00, y01, y11 = Y
        dety = y00 * y11 - y01 * y01
        inv = 1.0 / (1.0 + pa * (y00 + y11) + pa * pa * dety)
        m00, m11, m01 = (1.0 + pa * y11) * inv, (1.0 + pa * y00) * inv, -pa * y01 * inv
        A1 = (m00 * A[0] + m01 * A[1], m01 * A[0] + m11 * A[1])
        h1 = (m00 * h[0] + m01 * h[1], m01 * h[0] + m11 * h[1])
        Y1 = ((y00 + pa * dety) * inv, y01 * inv, (y11 + pa * dety) * inv)
    Z = Z + pb + pa * sum(a * b for a, b in zip(A, A1, strict=True))
    z = z + pa * sum(a * b for a, b in zip(A, h1, strict=True))
    return Y1, A1, Z, h1, z


def _ladder_cells(st, G, e):
    """Adds one row's cells (conductances G per polarity, drives e) at the ladder's top."""
    Y, A, Z, h, z = st
    gs = sum(G)
    ge = sum(gp * ep for gp, ep in zip(G, e, strict=True))
    s = 1.0 / (1.0 + Z * gs)
    z = s * (z + Z * ge)
    c = ge - gs * z
    h = tuple(hp + gp * (ep - z) + ap * c for hp, gp, ep, ap in zip(h, G, e, A, strict=True))
    if len(A) == 1:
        q = 1.0 + A[0]
        Y = (Y[0] + s * G[0] * q * q,)
    else:
        (g0, g1), (a0, a1) = G, A
        zg = Z * g0 * g1
        q0, q1 = 1.0 + a0, 1.0 + a1
        Y = (Y[0] + s * (g0 * q0 * q0 + g1 * a0 * a0 + zg),
             Y[1] + s * (g0 * a1 * q0 + g1 * a0 * q1 - zg),
             Y[2] + s * (g1 * q1 * q1 + g0 * a1 * a1 + zg))
    A = tuple(s * (ap - Z * gp) for ap, gp in zip(A, G, strict=True))
    return Y, A, s * Z, h, z


def _ladder_xla(g_stack, x, res):
    """Integrator currents (B, N) of a gated-source array by exact elimination (XLA).

    Each column is a ladder (its supply lines and its bit line, the cells as rungs), solved from
    the integrator up to the sources; a row whose bit is 0 has G = 0 and only adds its
    segments. One `lax.scan` step per row, vectorized over vectors and columns. `g_stack`
    is (P, K, N), or (B, P, K, N) with one set of conductances per vector.
    """
    P, K, N = g_stack.shape[-3:]
    B = x.shape[0]
    dtype = g_stack.dtype
    r_a, r_a_end, r_b, r_b_end = (jnp.asarray(r, dtype) for r in res)
    signs = (1.0, -1.0)[:P]
    zero = jnp.zeros((B, N), dtype)
    st0 = ((zero,) * (1 if P == 1 else 3), (zero,) * P, zero, (zero,) * P, zero)

    def row(st, inp):
        k, bk, gk = inp  # bk (B,), gk (P, N) or (B, P, N)
        st = _ladder_segment(st, jnp.where(k == K - 1, 0.0, r_a),
                             jnp.where(k == K - 1, r_b_end, r_b))
        on = jnp.abs(bk)[:, None]
        G = tuple(on * gk[..., p, :] for p in range(P))
        e = tuple(sp * bk[:, None] for sp in signs)
        return _ladder_cells(st, G, e), None

    st, _ = lax.scan(row, st0, (jnp.arange(K), x.T, jnp.moveaxis(g_stack, -2, 0)), reverse=True)
    Y, A, Z, h, z = _ladder_segment(st, r_a_end, jnp.zeros((), dtype))
    return sum(h)


# --------------------------------------------------------------------------------------------
# Batching, chunking and the custom VJP.


def _chunking(B, per_vector_bytes, batch_chunk):
    if batch_chunk is None:
        batch_chunk = max(1, min(B, _CHUNK_BYTES // max(per_vector_bytes, 1)))
    batch_chunk = max(1, min(int(batch_chunk), B))
    n_chunks = -(-B // batch_chunk)
    chunk = -(-B // n_chunks)  # even chunks: least padding
    return n_chunks, chunk


def _resistances(r_row, r_col, r_driver, r_integrator, extra_rows):
    return (r_row, r_row + r_driver, r_col, (extra_rows + 1.0) * r_col + r_integrator)


def _to_layout(topology, g_stack, x, signs):
    """Solver-layout conductances, drives and masks for a chunk x (Bc, K)."""
    g_l = jnp.transpose(g_stack, (1, 2, 0))[..., None]  # (K, N, P, 1)
    xt = x.T  # (K, Bc)
    e_row = signs[None, None, :, None] * xt[:, None, None, :]  # (K, 1, P, Bc)
    mask = None if topology == "input_source" else jnp.abs(xt)[:, None, None, :]
    return g_l, e_row, mask


def _shared_circuit(topology, g_stack, res, lines):
    """Circuit factors shared by all vectors (input-source only; gated depends on the bits)."""
    if topology != "input_source":
        return None
    g_l = jnp.transpose(g_stack, (1, 2, 0))[..., None]
    return _make_circuit(topology, g_l, None, res, lines)


def _chunk_circuit(topology, shared, g_l, mask, res, lines):
    if shared is not None:
        return shared
    return _make_circuit(topology, g_l, mask, res, lines)


def _split_chunks(x, n_chunks, chunk):
    B = x.shape[0]
    pad = n_chunks * chunk - B
    x = jnp.pad(x, ((0, pad),) + ((0, 0),) * (x.ndim - 1))
    return x.reshape((n_chunks, chunk) + x.shape[1:])


def _map_chunks(fn, xs):
    """lax.map over chunks (sequential: bounded memory); a single chunk is called directly."""
    if jax.tree_util.tree_leaves(xs)[0].shape[0] == 1:
        return jax.tree_util.tree_map(lambda y: y[None], fn(jax.tree_util.tree_map(
            lambda x: x[0], xs)))
    return lax.map(fn, xs)


def _per_vector_bytes(topology, K, N, P, itemsize):
    # a, H_a, w, H_b, old copies and temporaries; gated also holds per-vector factors.
    fields = 4 * P + 4 + (2 * P + 2 if topology == "gated_source" else 0)
    return fields * K * N * itemsize


def _solve_batch(topology, g_stack, x, res, tol, max_iters, batch_chunk, signs, lines,
                 with_states, cells=False):
    """Forward solve of all vectors x (B, K), chunked. Returns I (B, N), info, [states]."""
    B, K = x.shape
    P, _, N = g_stack.shape
    dtype = g_stack.dtype
    n_chunks, chunk = _chunking(
        B, _per_vector_bytes(topology, K, N, P, dtype.itemsize), batch_chunk
    )
    shared = _shared_circuit(topology, g_stack, res, lines)
    xs = _split_chunks(x, n_chunks, chunk)

    def one(xc):
        g_l, e_row, mask = _to_layout(topology, g_stack, xc, signs)
        cir = _chunk_circuit(topology, shared, g_l, mask, res, lines)
        I, a, w, t, err = _iterate(cir, e_row, None, tol, max_iters, lines, cells)
        out = (I, t, jnp.max(err))
        if with_states:
            out = out + (jnp.moveaxis(a, -1, 0), jnp.moveaxis(w[:, :, 0, :], -1, 0))
        return out

    outs = _map_chunks(one, xs)
    I = outs[0].reshape(n_chunks * chunk, N)[:B]
    info = _make_info(jnp.max(outs[1]), jnp.max(outs[2]), tol, dtype, PATH_DIRECT, lines)
    if not with_states:
        return I, info
    a = outs[3].reshape((n_chunks * chunk,) + outs[3].shape[2:])[:B]  # (B, K, N, P)
    w = outs[4].reshape((n_chunks * chunk,) + outs[4].shape[2:])[:B]  # (B, K, N)
    return I, info, a, w


def _make_info(iterations, error, tol, dtype, path=PATH_DIRECT, lines=None):
    """The `SolveInfo`; `lines`: the line form that ran ("sequential", "parallel", None, a code)."""
    error = error.astype(dtype)
    return SolveInfo(
        iterations=iterations.astype(jnp.int32),
        error=error,
        converged=error <= tol,
        tol=jnp.asarray(tol, dtype),
        path=jnp.asarray(path, jnp.int32),
        lines=jnp.asarray(
            _LINES_CODES[lines] if lines is None or isinstance(lines, str) else lines, jnp.int32),
    )


# The line forms: "auto" resolves per platform when lowering (`_per_platform`).
_LINES = ("auto", "sequential", "parallel")
_LINES_CODES = {None: -1, "sequential": LINES_SEQUENTIAL, "parallel": LINES_PARALLEL}


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


def _use_transfer(topology, B, N):
    """Whether B vectors are solved through the transfer matrix.

    Input-source circuits do not depend on the inputs: for many vectors it is cheaper to
    solve N adjoint circuits once (the transfer matrix) than B forward circuits. On
    1152 x 256 the break-even is B ~ 0.7-0.9 N; a transfer solve needs about one sweep more.
    """
    return topology == "input_source" and B >= _TRANSFER_RATIO * N


def _transfer_batch(g_stack, x, res, tol, max_iters, batch_chunk, signs, lines, cells=False):
    """Transfer matrix M (N, K) of an input-source array (I = x @ M.T), chunked over columns."""
    P, K, N = g_stack.shape
    dtype = g_stack.dtype
    n_chunks, chunk = _chunking(
        N, _per_vector_bytes("input_source", K, N, P, dtype.itemsize), batch_chunk
    )
    shared = _shared_circuit("input_source", g_stack, res, lines)
    cols = jnp.arange(n_chunks * chunk).reshape(n_chunks, chunk)

    def one(cols_c):
        # Adjoint drive of output column j: -1 in every cell of column j (padding: none).
        e_col = -(jnp.arange(N)[:, None] == cols_c[None, :]).astype(dtype)[None, :, None, :]
        M, t, err = _iterate_transfer(shared, e_col, cols_c, x, signs, tol, max_iters, lines,
                                      cells)
        return M, t, jnp.max(err)

    Ms, ts, errs = _map_chunks(one, cols)
    M = Ms.reshape(n_chunks * chunk, K)[:N]
    return M, _make_info(jnp.max(ts), jnp.max(errs), tol, dtype, PATH_TRANSFER, lines)


def _uses_cpu_kernel(cpu_kernel, dtype):
    """Whether the numba kernel may compute float32 transfer matrices.

    It runs where the computation is lowered for a CPU (`lax.platform_dependent`).
    """
    return cpu_kernel and dtype == jnp.float32 and ir_cpu.available()


@functools.cache
def _kernel_or_xla(tol, max_iters, batch_chunk, cells, lines):
    """Transfer matrix by the CPU kernel, falling back to the XLA solver (line form `lines`).

    Under vmap the fallback must stay a real branch (a batched `cond` would run both), so
    batches are mapped sequentially (the kernel runs one array at a time anyway).
    """

    @jax.custom_batching.custom_vmap
    def transfer(g_stack, x, *res):
        M, iterations, error, ok = ir_cpu.transfer(g_stack, x, res, tol, max_iters, cells)

        def xla(_):
            signs = jnp.asarray([1.0, -1.0][: g_stack.shape[0]], g_stack.dtype)
            M2, info = _transfer_batch(g_stack, x, res, tol, max_iters, batch_chunk, signs,
                                       lines, cells)
            return M2, info.iterations, info.error, jnp.int32(PATH_KERNEL_THEN_XLA), info.lines

        kernel = (M, iterations, error, jnp.int32(PATH_KERNEL), jnp.int32(_LINES_CODES[None]))
        return lax.cond(ok, lambda _: kernel, xla, None)

    @transfer.def_vmap
    def _rule(axis_size, in_batched, *args):
        args = [a if b else jnp.broadcast_to(a, (axis_size, *jnp.shape(a)))
                for a, b in zip(args, in_batched, strict=True)]
        return lax.map(lambda a: transfer(*a), tuple(args)), (True,) * 5

    return transfer


def _ladder(cpu_kernel, g_stack, x, res):
    """Gated-source currents by exact elimination: (I (B, N), path).

    The CPU kernel (rows whose bit is 0 skipped) where numba is installed and the computation
    runs on a CPU, chosen per platform when lowering; the XLA scan elsewhere.
    """
    def xla(g_stack, x, *res):
        return _ladder_xla(g_stack, x, res), jnp.int32(PATH_LADDER)

    if not (cpu_kernel and ir_cpu.available()):
        return xla(g_stack, x, *res)

    def kernel(g_stack, x, *res):
        return ir_cpu.ladder(g_stack, x, res), jnp.int32(PATH_LADDER_KERNEL)

    return lax.platform_dependent(g_stack, x, *res, cpu=kernel, default=xla)


def _forward(topology, tol, max_iters, batch_chunk, cpu_kernel, cells, lines, g_stack, x,
             scalars):
    P, _, N = g_stack.shape
    signs = jnp.asarray([1.0, -1.0][:P], g_stack.dtype)
    res = _resistances(*scalars)
    if topology == "gated_source":
        I, path = _ladder(cpu_kernel, g_stack, x, res)
        zero = jnp.zeros((), g_stack.dtype)
        return (I, _make_info(jnp.int32(0), zero, tol, g_stack.dtype, path)), None
    if _use_transfer(topology, x.shape[0], N):
        def xla(form, g_stack, x, *res):
            M, info = _transfer_batch(g_stack, x, res, tol, max_iters, batch_chunk, signs,
                                      form, cells)
            return M, info.iterations, info.error, info.path, info.lines

        if _uses_cpu_kernel(cpu_kernel, g_stack.dtype):
            # Chosen when lowering: the kernel on a CPU, the XLA solver on accelerators.
            cpu_form, other_form = _platform_forms(lines)
            M, t, err, path, form = lax.platform_dependent(
                g_stack, x, *res,
                cpu=_kernel_or_xla(tol, max_iters, batch_chunk, cells, cpu_form),
                default=functools.partial(xla, other_form))
        else:
            M, t, err, path, form = _per_platform(lines, xla, g_stack, x, *res)
        info = _make_info(t, err, tol, g_stack.dtype, path, form)
        return (jnp.matmul(x, M.T, precision=_HIGHEST), info), M

    def direct(form, g_stack, x, *res):
        return _solve_batch(topology, g_stack, x, res, tol, max_iters, batch_chunk, signs, form,
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

    def pair_grads(form, g_stack, x, I_bar, *scalars):
        return _pair_grads(topology, tol, max_iters, batch_chunk, form, g_stack, x, I_bar,
                           scalars, cells)

    if M is None:
        g_bar, x_bar, r_bars = _per_platform(lines, pair_grads, g_stack, x, I_bar, *scalars)
    else:
        # L = sum(I_bar * (x @ M.T)) is bilinear in the fields of forward and adjoint solves:
        # sum_b v(x_b) vhat(I_bar_b) = sum_j v(x~_j) vhat(e_j) with x~ = I_bar.T @ x, so N pairs
        # replace B; and dL/dx = I_bar @ M exactly.
        x_tilde = jnp.matmul(I_bar.T, x, precision=_HIGHEST)
        eye = jnp.eye(I_bar.shape[1], dtype=I_bar.dtype)
        g_bar, _, r_bars = _per_platform(lines, pair_grads, g_stack, x_tilde, eye, *scalars)
        x_bar = jnp.matmul(I_bar, M, precision=_HIGHEST)
    cast = lambda v, ref: jnp.asarray(v).astype(jnp.result_type(ref))  # noqa: E731
    r_bars = tuple(cast(v, ref) for v, ref in zip(r_bars, scalars[:4], strict=True))
    return (g_bar.astype(g_stack.dtype), x_bar.astype(x.dtype), *r_bars,
            jnp.zeros_like(scalars[4]))


def _pair_grads(topology, tol, max_iters, batch_chunk, lines, g_stack, x, I_bar, scalars,
                cells=False):
    """Gradients of sum(I_bar * I(x)) by pairs of forward and adjoint solves (chunked).

    `lines`: the line solves' form. `cells`: the solves converge relative to both polarities'
    currents (as the forward).

    Returns:
      (g_bar (P, K, N), x_bar (B, K), (r_row_bar, r_col_bar, r_driver_bar, r_integrator_bar)).
    """
    B, K = x.shape
    P, _, N = g_stack.shape
    dtype = g_stack.dtype
    extra = scalars[4]
    signs = jnp.asarray([1.0, -1.0][:P], dtype)
    res = _resistances(*scalars)
    n_chunks, chunk = _chunking(
        B, 2 * _per_vector_bytes(topology, K, N, P, dtype.itemsize), batch_chunk
    )
    shared = _shared_circuit(topology, g_stack, res, lines)
    xs = _split_chunks(x, n_chunks, chunk)
    bars = _split_chunks(I_bar, n_chunks, chunk)
    gated = topology == "gated_source"

    def one(acc, inp):
        xc, barc = inp
        g_l, e_row, mask = _to_layout(topology, g_stack, xc, signs)
        # Forward and adjoint solved as one batch of 2*chunk vectors of the same circuit: the
        # adjoint circuit is driven by -I_bar in every cell of each column.
        zeros = jnp.zeros_like(e_row)
        e_row2 = jnp.concatenate([e_row, zeros], axis=-1)
        e_col2 = jnp.concatenate(
            [jnp.zeros((1, N, 1, chunk), dtype), -barc.T[None, :, None, :]], axis=-1
        )
        mask2 = None if mask is None else jnp.concatenate([mask, mask], axis=-1)
        cir = _chunk_circuit(topology, shared, g_l, mask2, res, lines)
        _, a, w, t, err = _iterate(cir, e_row2, e_col2, tol, max_iters, lines, cells)
        G = g_l if mask is None else g_l * mask  # (K, N, P, Bc) or (K, N, P, 1)
        a_f, a_b = a[..., :chunk], a[..., chunk:]
        w_f, w_b = w[..., :chunk], w[..., chunk:]
        v_f = e_row - a_f - w_f  # forward cell voltages (K, N, P, Bc)
        v_b = -barc.T[None, :, None, :] - a_b - w_b  # adjoint cell voltages
        i_f, i_b = G * v_f, G * v_b  # cell currents
        dG = -v_b * v_f  # dL/dG per vector
        # Inputs: e_p = s_p x (both topologies), G = |x| g (gated).
        dx = jnp.sum(signs[None, None, :, None] * (-i_b), axis=(1, 2))  # (K, Bc)
        if gated:
            dx = dx + jnp.sign(xc.T) * jnp.sum(g_l * dG, axis=(1, 2))
            dg = jnp.sum(mask * dG, axis=-1)
        else:
            dg = jnp.sum(dG, axis=-1)
        # Resistances: dL/dR of a segment = forward current x adjoint current through it.
        if gated:
            ja_f = jnp.flip(jnp.cumsum(jnp.flip(i_f, 0), 0), 0)  # supply segment above row k
            ja_b = jnp.flip(jnp.cumsum(jnp.flip(i_b, 0), 0), 0)
            ja0 = jnp.sum(ja_f[0] * ja_b[0])
        else:
            ja_f = jnp.flip(jnp.cumsum(jnp.flip(i_f, 1), 1), 1)  # row segment left of col n
            ja_b = jnp.flip(jnp.cumsum(jnp.flip(i_b, 1), 1), 1)
            ja0 = jnp.sum(ja_f[:, 0] * ja_b[:, 0])
        d_ra = jnp.sum(ja_f * ja_b)
        jb_f = jnp.cumsum(jnp.sum(i_f, axis=2), 0)  # bit-line segment below row k
        jb_b = jnp.cumsum(jnp.sum(i_b, axis=2), 0)
        jb_last = jnp.sum(jb_f[-1] * jb_b[-1])
        d_rb = jnp.sum(jb_f[:-1] * jb_b[:-1])
        g_acc, ra_acc, rd_acc, rb_acc, rbl_acc, t_acc, e_acc = acc
        acc = (
            g_acc + dg, ra_acc + d_ra, rd_acc + ja0, rb_acc + d_rb, rbl_acc + jb_last,
            jnp.maximum(t_acc, t), jnp.maximum(e_acc, jnp.max(err)),
        )
        return acc, dx.T

    z = jnp.zeros((), dtype)
    acc0 = (jnp.zeros((K, N, P), dtype), z, z, z, z, jnp.int32(0), z)
    acc, dxs = lax.scan(one, acc0, (xs, bars))
    dg, d_ra, d_rd, d_rb, d_rblast, t, err = acc
    _warn_if_unconverged(_make_info(t, err, tol, dtype), "adjoint (gradient) solve")
    g_bar = jnp.transpose(dg, (2, 0, 1))
    x_bar = dxs.reshape(n_chunks * chunk, K)[:B]
    r_bars = (d_ra, d_rb + (extra + 1.0) * d_rblast, d_rd, d_rblast)
    return g_bar, x_bar, r_bars


_core.defvjp(_core_fwd, _core_bwd)


# --------------------------------------------------------------------------------------------
# Public API.


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


def _check_lines(lines):
    if lines not in _LINES:
        raise ValueError(f"lines must be one of {_LINES}, got {lines!r}")


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
        return jnp.zeros(lead + (N,), g_stack.dtype), _make_info(jnp.int32(0), z, tol, z.dtype)
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
        `jaxbar.core.ir_cpu` (falling back to this solver where its Gauss-Seidel passes
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
      cpu_kernel: on a CPU, eliminate with the numba kernel of `jaxbar.core.ir_cpu`
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
    return _ladder(cpu_kernel, g_stack, x, res)


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
    res = _resistances(*(jnp.asarray(v, dtype) for v in (r_row, r_col, r_driver, r_integrator,
                                                          extra_rows)))
    I, path = _per_read(bool(cpu_kernel), g_stack, x, *res)
    zero = jnp.zeros((), dtype)
    return I.reshape(lead + (N,)), _make_info(jnp.int32(0), zero, 0.0, dtype, path)


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
        return _solve_batch(topology, g_stack, x, _resistances(*scalars), tol, max_iters,
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


# --------------------------------------------------------------------------------------------
# Convergence reporting.


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


def _warn_if_unconverged(info, where):
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

