"""The block Gauss-Seidel / SOR iteration of the IR-drop solver, and the chunked direct solve.

The node equations are solved by block Gauss-Seidel, starting from the bit lines solved with ideal
A-lines (the bit-line drop is the large effect, `start_fields`): an exact solve along every
A-line given the bit-line voltages, then along every B-line given the A-line voltages (`sweep`),
with adaptive over-relaxation (block SOR, optimal for this 2-cyclic system) when the sweeps
converge slowly. Each line solve is the exact O(L) elimination written in physical admittance form
(`jaxbar.core.ir.lines`), so zero resistances (also a line shorted behind a terminal
resistance) need no special case and nothing is divided by a resistance. Sweeps stop on an error
estimate of the output currents built from their relative change per sweep and the observed
contraction rate (`jaxbar.core.ir.convergence`).
"""

from __future__ import annotations

import jax.numpy as jnp
from jax import lax

from jaxbar.core.ir.circuit import (
    HIGHEST,
    cell_g,
    chunk_circuit,
    chunking,
    ideal_currents,
    map_chunks,
    per_vector_bytes,
    shared_circuit,
    split_chunks,
    to_layout,
)
from jaxbar.core.ir.constants import STALL_SWEEPS
from jaxbar.core.ir.convergence import (
    PATH_DIRECT,
    control_init,
    control_step,
    make_info,
    safe_div,
)
from jaxbar.core.ir.lines import line_solve


def sweep(cir, e_row, e_col, a, w, omega, with_loss, lines):
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
        return cell_g(g, m) * (e - w_j)

    def c_b(g, *rest):  # B-node injection: sum_p G (e - a)
        m, e, (a_j,) = split(rest)
        return jnp.sum(cell_g(g, m) * (e - a_j), axis=-2, keepdims=True)

    def loss(w_j, g, a_j, *m):  # sum_p G (a + w) at one row, accumulated along the bit line
        return jnp.sum(cell_g(g, m[0] if m else None) * (a_j + w_j), axis=-2, keepdims=True)

    # omega (Bc,) broadcasts against every line slice (..., Bc).
    a, J_a, _ = line_solve(
        cir.rho_a, c_a, (cir.g, *mask, *drives, w), a.shape, cir.a_axis, True, cir.r_a_end,
        cir.r_a, (a, omega), lines,
    )
    w, J_b, lost = line_solve(
        cir.rho_b, c_b, (cir.g, *mask, *drives, a), w.shape, 0, False, cir.r_b_end, cir.r_b,
        (w, omega), lines, loss if with_loss else None, (cir.g, a, *mask) if with_loss else (),
    )
    return a, w, J_a, J_b, lost


def start_fields(cir, e_row, e_col, n_vec, with_loss, lines, cols=None):
    """Bit lines solved first, with ideal A-lines (`a = 0`): the starting fields of the sweeps.

    The bit-line drop is the large effect (a bit line collects the currents of every row), the
    A-line drop a correction to it; starting from zero instead makes the first A-line solve see
    grounded bit lines, which costs a sweep or more.

    Args:
      cols: for transfer-matrix chunks (`e_col` = -1 in column `cols[c]` of vector c, no
        `e_row`), the driven column of each vector: only that bit line carries current with
        ideal A-lines, so all of them are solved as one (K, N) family instead of (K, N, n_vec).

    Returns:
      (a, w, J_a, J_b, lost): as `sweep`; `J_a` is the sum of the cell currents of each
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
        return jnp.sum(cell_g(g, m[0] if m else None) * w_j, axis=-2, keepdims=True)

    w, J_b, lost = line_solve(
        cir.rho_b, c_b, (Ge,), (K, N, 1, n_lines), 0, False, cir.r_b_end, cir.r_b, None, lines,
        loss if with_loss else None, (cir.g, *mask) if with_loss else (),
    )
    if cols is None:
        return a, w, jnp.sum(Ge - G * w, axis=cir.a_axis), J_b, lost
    # Spread the (K, N) family to the vectors: column cols[c] of vector c, nothing elsewhere
    # (a row line's only current is then that of its cell in the driven column).
    hot = (jnp.arange(N)[:, None] == cols[None, :]).astype(dtype)  # (N, n_vec)
    J_a = jnp.einsum("knp,nc->kpc", (Ge - G * w)[..., 0], hot, precision=HIGHEST)
    lost = None if lost is None else lost * hot[:, None, :]
    return a, w * hot[None, :, None, :], J_a, J_b * hot[:, None, :], lost


def sweep_loop(cir, e_row, e_col, tol, max_iters, n_vec, readout, readout_init, with_loss,
               lines, cols=None):
    """Block-SOR sweeps until every vector's readout converged or stalled, or max_iters.

    `readout(r_state, a, w, J_a, J_b, lost, omega) -> (r_state, d)` turns the fields after a
    sweep into the quantity whose relative change `d` (per vector) is the convergence measure.
    The sweeps start from `start_fields` (whose readout is the reference of the first change).

    Returns:
      (r_state, a, w, iterations, err).
    """
    dtype = cir.rho_b.dtype
    ones = jnp.ones((n_vec,), dtype)
    a0, w0, J_a, J_b, lost = start_fields(cir, e_row, e_col, n_vec, with_loss, lines, cols)
    readout_init, _ = readout(readout_init, a0, w0, J_a, J_b, lost, ones)

    def running(state):
        t, _, _, _, ctl = state
        # Stop when every vector has converged or stalled (its change has not halved for
        # STALL_SWEEPS sweeps: rounding noise, e.g. float32 at extreme IR loss), after at least two
        # sweeps (a single change carries no contraction rate).
        active = (ctl.err > tol) & (t - ctl.stall_from <= STALL_SWEEPS)
        return (t < max_iters) & ((t < 2) | jnp.any(active))

    def body(state):
        t, a, w, r_state, ctl = state
        a, w, J_a, J_b, lost = sweep(cir, e_row, e_col, a, w, ctl.omega, with_loss, lines)
        r_state, d = readout(r_state, a, w, J_a, J_b, lost, ctl.omega)
        return t + 1, a, w, r_state, control_step(ctl, t, d)

    state = (jnp.int32(0), a0, w0, readout_init, control_init(n_vec, dtype))
    t, a, w, r_state, ctl = lax.while_loop(running, body, state)
    return r_state, a, w, t, ctl.err


def iterate(cir, e_row, e_col, tol, max_iters, lines, cells=False):
    """Solve one chunk of input vectors to tolerance on the integrator currents.

    Args:
      cir: the `Circuit`.
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
    ideal = ideal_currents(cir, e_row, e_col)
    if cells:
        # The polarities' currents are not tracked apart: their ideal sum sets the scale.
        floor = jnp.max(jnp.abs(ideal_currents(cir, jnp.abs(e_row), e_col)), axis=1)
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
        d = safe_div(jnp.max(jnp.abs(I_new - I), axis=1), scale)
        return (I_new, I_j), d

    zero = jnp.zeros((Bc, N), dtype)
    (I, _), a, w, t, err = sweep_loop(
        cir, e_row, e_col, tol, max_iters, Bc, readout, (zero, zero), True, lines
    )
    return I, a, w, t, err


def solve_batch(topology, g_stack, x, res, tol, max_iters, batch_chunk, signs, lines,
                with_states, cells=False):
    """Forward solve of all vectors x (B, K), chunked. Returns I (B, N), info, [states]."""
    B, K = x.shape
    P, _, N = g_stack.shape
    dtype = g_stack.dtype
    n_chunks, chunk = chunking(
        B, per_vector_bytes(topology, K, N, P, dtype.itemsize), batch_chunk
    )
    shared = shared_circuit(topology, g_stack, res, lines)
    xs = split_chunks(x, n_chunks, chunk)

    def one(xc):
        g_l, e_row, mask = to_layout(topology, g_stack, xc, signs)
        cir = chunk_circuit(topology, shared, g_l, mask, res, lines)
        I, a, w, t, err = iterate(cir, e_row, None, tol, max_iters, lines, cells)
        out = (I, t, jnp.max(err))
        if with_states:
            out = out + (jnp.moveaxis(a, -1, 0), jnp.moveaxis(w[:, :, 0, :], -1, 0))
        return out

    outs = map_chunks(one, xs)
    I = outs[0].reshape(n_chunks * chunk, N)[:B]
    info = make_info(jnp.max(outs[1]), jnp.max(outs[2]), tol, dtype, PATH_DIRECT, lines)
    if not with_states:
        return I, info
    a = outs[3].reshape((n_chunks * chunk,) + outs[3].shape[2:])[:B]  # (B, K, N, P)
    w = outs[4].reshape((n_chunks * chunk,) + outs[4].shape[2:])[:B]  # (B, K, N)
    return I, info, a, w
