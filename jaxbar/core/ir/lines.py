"""Line primitives of the IR-drop solver: exact O(L) eliminations along families of resistive lines.

Field layout inside the solver: (K, N, P, Bc): rows, columns, polarity (1, or 2 interleaved),
batch chunk innermost so every slice along a line is vectorized over the batch.
"""

from __future__ import annotations

import jax.numpy as jnp
from jax import lax

from jaxbar.core.ir import line_scan


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


def line_factor(G, axis, boundary_first, r_end, r_seg, lines):
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


def line_solve(rho, c_fn, c_inputs, c_shape, axis, boundary_first, r_end, r_seg, relax, lines,
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
