"""Array currents with parasitic wire resistance: the tiles of a layer through the IR solver.

Every array (row partition × weight slice × polarity × column partition) is solved
on its own with its own inputs (PHYSICS §6). Padding rows and columns of a tile
hold no cells (g = 0), which is exactly the physics of unused rows below a short
partition: the bit line runs past them. When the physical array is taller than
the tile (`array.rows`), the remaining rows lengthen the last bit-line segment.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jaxbar.config import CrossbarConfig
from jaxbar.core import mapping, parasitics

__all__ = ["array_currents"]


def _solver(config: CrossbarConfig):
    p = config.parasitics
    return parasitics.solve_input_source if p.topology == "input_source" else (
        parasitics.solve_gated_source)


def array_currents(u: jax.Array, g: jax.Array, config: CrossbarConfig,
                   lay: mapping.Layout, error_scale: str = "output") -> jax.Array:
    """Column currents of every array of a layer with IR drop.

    Args:
      u: input slices (J, *batch, K) (im2col patches for convolutions).
      g: tiles (pr, rows, S, P, M) from `program`.
      config: the crossbar config (its parasitics section is used).
      lay: the layer's layout.
      error_scale: of input-source solves (see `parasitics.solve_input_source`).

    Returns:
      (J, *batch, pr, S, P', M): P' = 1 after analog differential subtraction (of two
      separate arrays, or of one interleaved array), else P.
    """
    p = config.parasitics
    lead = u.shape[:-1]
    u = u.reshape(-1, u.shape[-1])  # (Bt, K)
    if lay.trivial_rows:
        u = u[:, None, :]
    else:
        u = jnp.pad(u, [(0, 0), (0, 1)])[:, lay.row_index]  # (Bt, pr, rows)
    pr, rows, S, P, M = g.shape
    pc = len(lay.col_sizes)
    has_unit = M > pc * lay.cols
    extra = 0 if config.array.rows is None else max(config.array.rows - rows, 0)
    solve = _solver(config)
    kwargs = dict(r_driver=p.r_driver, r_integrator=p.r_integrator, extra_rows=extra,
                  tol=p.tol, max_iters=p.max_iters, batch_chunk=p.batch_chunk)
    kwargs.update(cpu_kernel=p.cpu_kernel)
    if p.topology == "input_source":
        kwargs.update(error_scale=error_scale)

    def tile_columns(gt):  # (rows, M) → (pc, rows, cols[+1]); a unit column goes first
        main = gt[:, : pc * lay.cols].reshape(rows, pc, lay.cols).transpose(1, 0, 2)
        if has_unit:
            main = jnp.concatenate([gt[:, pc * lay.cols:].T[:, :, None], main], axis=-1)
        return main

    def untile(y):  # (..., pc, cols[+1]) → (..., M)
        if has_unit:
            return jnp.concatenate([y[..., 1:].reshape(*y.shape[:-2], -1), y[..., 0]], axis=-1)
        return y.reshape(*y.shape[:-2], -1)

    def one_array(gt, v, g_neg=None):
        y, info = solve(gt, v, p.r_row, p.r_col, g_neg=g_neg, **kwargs)
        parasitics.check_convergence(info, p.on_nonconvergence,
                                     {"parasitics.r_row": p.r_row, "parasitics.r_col": p.r_col})
        return y

    # vmap over column partitions of one (row partition, slice, polarity).
    def arrays(gp, v, gn=None):
        tp = tile_columns(gp)
        if gn is None:
            return untile(jax.vmap(lambda t: one_array(t, v), out_axes=-2)(tp))
        tn = tile_columns(gn)
        return untile(jax.vmap(lambda a, b: one_array(a, v, b), out_axes=-2)(tp, tn))

    analog_diff = config.mapping.scheme == "differential" and config.mapping.subtract == "analog"

    def group(gs, v):  # one (row partition, slice): gs (rows, P, M), v (Bt, rows)
        if analog_diff and p.interleaved:
            return arrays(gs[:, 0], v, gs[:, 1])[:, None]
        if analog_diff:
            return (arrays(gs[:, 0], v) - arrays(gs[:, 1], v))[:, None]
        return jnp.stack([arrays(gs[:, q], v) for q in range(P)], axis=1)

    over_slices = jax.vmap(group, in_axes=(1, None), out_axes=1)
    over_parts = jax.vmap(over_slices, in_axes=(0, 1), out_axes=1)
    y = over_parts(g, u)  # (Bt, pr, S, P', M)
    return y.reshape(*lead, *y.shape[1:])
