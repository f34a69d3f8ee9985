"""The IR solver's line eliminations as associative scans: logarithmic sequential depth.

The exact O(L) elimination of a resistive line (docs/ir_solver.md, "Line solves") is three
recurrences along the line. Written as prefix products of associative maps, each is a
`lax.associative_scan`: O(L) work, O(log L) sequential steps, which suits accelerators; a
loop with one step per node does less work and suits CPUs.

- The admittance seen from node j towards the open end, `Y_j = G_j + rho_{j+1} Y_{j+1}`
  with `rho_j = 1 / (1 + R_j Y_j)`, is a Moebius map of `Y_{j+1}`: a product of 2 x 2
  matrices with non-negative entries, each partial product scaled by its largest entry
  (`Y` is a ratio of two entries, so the scale cancels and nothing overflows), refined by
  one step on the recurrence's local residuals.
- The Norton currents `H_j = c_j + rho_{j+1} H_{j+1}` and the drops
  `d_j = rho_j (d_{j-1} + R_j H_j)` are first-order linear recurrences: compositions of affine
  maps `x -> a x + b`, whose products of `rho` in (0, 1] stay bounded.

Every entry of the scans is a sum or product of non-negative terms (only `c`, and with it
`H` and `d`, may carry either sign, as in the loop; the refinement's residuals are small
differences): exact for R = 0, no division by a resistance. Functions take the line's axis
and whether the boundary (driver or integrator) is its first node; the open end is the other
one.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax

__all__ = ["affine_recurrence", "line_factor", "line_solve", "segment_resistances"]

Array = jax.Array


def segment_resistances(length, ndim, axis, boundary_first, r_end, r_seg):
    """Resistance `R_j` in front of each node (towards the boundary), shaped along `axis`.

    Args:
      length: nodes per line.
      ndim: rank of the fields the result broadcasts against.
      axis: the lines' axis.
      boundary_first: the boundary segment `r_end` is in front of node 0 (else of node L-1).
      r_end: the boundary segment's resistance (scalar).
      r_seg: the other segments' resistance (scalar).

    Returns:
      Array of shape (1, ..., L, ..., 1) (L at `axis`).
    """
    b_idx = 0 if boundary_first else length - 1
    r = jnp.where(jnp.arange(length) == b_idx, r_end, r_seg)
    shape = [1] * ndim
    shape[axis] = length
    return r.reshape(shape)


def _previous(x, axis, reverse):
    """`x` of the previous node in scan order (0 before the first)."""
    length = x.shape[axis]
    zero = jnp.zeros_like(lax.slice_in_dim(x, 0, 1, axis=axis))
    if reverse:
        return jnp.concatenate([lax.slice_in_dim(x, 1, length, axis=axis), zero], axis)
    return jnp.concatenate([zero, lax.slice_in_dim(x, 0, length - 1, axis=axis)], axis)


def _compose_affine(first, second):
    """The affine map `second o first` (`first` applies first)."""
    a1, b1 = first
    a2, b2 = second
    return a2 * a1, a2 * b1 + b2


def affine_recurrence(a, b, axis, reverse):
    """`x_t = a_t x_(t-1) + b_t` from `x_(-1) = 0`, in scan order along `axis`.

    Args:
      a: the factors, broadcast against `b`.
      b: the offsets.
      axis: the recurrence's axis.
      reverse: scan from the last index to the first.

    Returns:
      x, of the common shape.
    """
    a, b = jnp.broadcast_arrays(a, b)
    return lax.associative_scan(_compose_affine, (a, b), reverse=reverse, axis=axis)[1]


def _compose_moebius(first, second):
    """The matrix product `second @ first` of 2 x 2 non-negative matrices, max entry 1.

    A matrix is the tuple of its entries (m00, m01, m10, m11). The scale of a Moebius map's
    matrix is arbitrary: dividing by the largest entry keeps products of a thousand factors
    (1 + R G) finite.
    """
    a00, a01, a10, a11 = first
    b00, b01, b10, b11 = second
    c = (b00 * a00 + b01 * a10, b00 * a01 + b01 * a11,
         b10 * a00 + b11 * a10, b10 * a01 + b11 * a11)
    scale = jnp.maximum(jnp.maximum(c[0], c[1]), jnp.maximum(c[2], c[3]))
    inv = 1.0 / jnp.where(scale > 0, scale, 1.0)
    return tuple(ci * inv for ci in c)


def line_factor(G, axis, boundary_first, r_end, r_seg):
    """Admittance factors `rho_j = 1 / (1 + R_j Y_j)` of a family of lines, by a scan.

    From the open end, `Y_t = G_t + Y_(t-1) / (1 + R_(t-1) Y_(t-1))` (t in elimination
    order): `[Y_t, 1]` is proportional to `M_t [Y_(t-1), 1]` with
    `M_t = [[1 + G_t R_(t-1), G_t], [R_(t-1), 1]]`, and `Y_(-1) = 0` picks the second column
    of the product `M_t ... M_0`: `Y_t = P_01 / P_11`, refined once (see the comment), and
    `rho_t = 1 / (1 + R_t Y_t)`.

    Args:
      G: (..., L, ...) node conductances (cells to nodes of known voltage), >= 0.
      axis: the lines' axis.
      boundary_first: the boundary is at node 0 (else at node L-1).
      r_end: the boundary segment's resistance (scalar, >= 0).
      r_seg: the other segments' resistance (scalar, >= 0).

    Returns:
      rho, the shape of `G`.
    """
    reverse = boundary_first  # elimination starts at the open end
    R = segment_resistances(G.shape[axis], G.ndim, axis, boundary_first, r_end, r_seg)
    R = jnp.broadcast_to(R, G.shape).astype(G.dtype)
    r_prev = _previous(R, axis, reverse)
    one = jnp.ones_like(G)
    mats = (one + G * r_prev, G, r_prev, one)
    _, p01, _, p11 = lax.associative_scan(_compose_moebius, mats, reverse=reverse, axis=axis)
    Y = p01 / p11
    # One step of iterative refinement. A partial product is shared by every node after it,
    # so its rounding shifts many admittances alike; in float32 that error accumulates in the
    # products of rho along the line. The local residuals of the recurrence carry only each
    # node's own rounding, and the error follows the linearized recurrence
    # e_t = res_t + rho_(t-1)^2 e_(t-1): an affine scan.
    Y_prev = _previous(Y, axis, reverse)
    rho_prev = 1.0 / (1.0 + r_prev * Y_prev)
    res = G + rho_prev * Y_prev - Y
    Y = Y + affine_recurrence(rho_prev * rho_prev, res, axis, reverse)
    return 1.0 / (1.0 + R * Y)


def line_solve(rho, c, axis, boundary_first, r_end, r_seg):
    """Drops along a family of lines for node injections `c`, by two scans.

    From the open end the Norton currents `H_t = c_t + rho_(t-1) H_(t-1)`; from the boundary
    the drops `d_t = rho_t (d_(t-1) + R_t H_t)` (each in its scan order).

    Args:
      rho: factors from `line_factor` (broadcastable to `c`).
      c: (..., L, ...) current injected at each node.
      axis: the lines' axis.
      boundary_first: the boundary is at node 0 (else at node L-1).
      r_end: the boundary segment's resistance.
      r_seg: the other segments' resistance.

    Returns:
      (d, J): the drops, the shape of `c`, measured from the boundary; the current through
      each line's boundary segment, `c`'s shape without `axis`.
    """
    L = c.shape[axis]
    rho = jnp.broadcast_to(rho, c.shape)
    H = affine_recurrence(_previous(rho, axis, boundary_first), c, axis, boundary_first)
    b_idx = 0 if boundary_first else L - 1
    J = (lax.index_in_dim(rho, b_idx, axis, keepdims=False)
         * lax.index_in_dim(H, b_idx, axis, keepdims=False))
    R = segment_resistances(L, c.ndim, axis, boundary_first, r_end, r_seg).astype(c.dtype)
    d = affine_recurrence(rho, rho * R * H, axis, not boundary_first)
    return d, J
