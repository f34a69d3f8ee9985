"""Array currents with parasitic wire resistance: the tiles of a layer through the IR solver.

Every array (row partition × weight slice × polarity × column partition) is solved
on its own with its own inputs (PHYSICS §6). Padding rows and columns of a tile
hold no cells (g = 0), which is exactly the physics of unused rows below a short
partition: the bit line runs past them. When the physical array is taller than
the tile (`array.rows`), the remaining rows lengthen the last bit-line segment.
With read noise (gated-source arrays), every read (input vector and input bit) sees its own
conductances `g + s(g)·ε`, drawn per cell from the read key, and is solved with them.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jaxbar.config import CrossbarConfig
from jaxbar.core import devices, ir, mapping

__all__ = ["array_currents"]


def _solver(config: CrossbarConfig):
    p = config.parasitics
    return ir.solve_input_source if p.topology == "input_source" else (
        ir.solve_gated_source)


# Bytes of per-read conductances drawn at a time (read noise): vectors are solved in chunks.
_READ_CHUNK_BYTES = 128 * 2**20


def _noisy_reads(gt, v, key, config, extra_rows, g_neg=None):
    """Currents of one gated-source array whose every read has its own noisy conductances.

    Args:
      gt: (K, N) conductances.
      v: (B, K) input bits, one read each.
      key: this array's read key; chunk i of the reads draws from `fold_in(key, i)`.
      config: the crossbar config.
      extra_rows: unused rows below the tile.
      g_neg: (K, N) conductances of the interleaved negative cells, or None.

    Returns:
      (B, N) integrator currents and the `ir.SolveInfo` of the solves.
    """
    p = config.parasitics
    noise = config.device.read_noise
    B = v.shape[0]
    K, N = gt.shape
    cells = (gt,) if g_neg is None else (gt, g_neg)
    chunk = max(1, min(B, _READ_CHUNK_BYTES // (len(cells) * K * N * gt.dtype.itemsize)))
    n_chunks = -(-B // chunk)
    vs = jnp.pad(v, ((0, n_chunks * chunk - B), (0, 0))).reshape(n_chunks, chunk, K)
    stds = [devices.noise_std(a, noise) for a in cells]

    def one(args):
        i, vc = args
        keys = jax.random.split(jax.random.fold_in(key, i), len(cells))
        gs = [a + s * jax.random.normal(k, (chunk, K, N), a.dtype)
              for a, s, k in zip(cells, stds, keys, strict=True)]
        return ir.solve_gated_source_per_read(
            gs[0], vc, p.r_row, p.r_col, g_neg=gs[1] if len(gs) == 2 else None,
            r_driver=p.r_driver, r_integrator=p.r_integrator, extra_rows=extra_rows,
            cpu_kernel=config.ir_solver.cpu_kernel)

    y, info = jax.lax.map(one, (jnp.arange(n_chunks), vs))
    return y.reshape(-1, N)[:B], jax.tree_util.tree_map(lambda a: a[0], info)  # exact: alike


def array_currents(u: jax.Array, g: jax.Array, config: CrossbarConfig,
                   lay: mapping.Layout, error_scale: str = "output",
                   key: jax.Array | None = None, with_info: bool = False):
    """Column currents of every array of a layer with IR drop.

    Args:
      u: input slices (J, *batch, K) (im2col patches for convolutions).
      g: tiles (pr, rows, S, P, M) from `program`.
      config: the crossbar config (its parasitics and ir_solver sections are used).
      lay: the layer's layout.
      error_scale: of input-source solves (see `ir.solve_input_source`).
      key: the read key (read noise on gated-source arrays).
      with_info: also return the arrays' `ir.SolveInfo`.

    Returns:
      (J, *batch, pr, S, P', M): P' = 1 after analog differential subtraction (of two
      separate arrays, or of one interleaved array), else P. With `with_info`, also the
      `ir.SolveInfo` of every array, leaves of shape (pr, S, pc) for an interleaved
      pair, (pr, S, 2, pc) for separate pairs and (pr, S, P, pc) otherwise (pc: column
      partitions; the unit column of an offset layer shares its partition's arrays).
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
    s = config.ir_solver
    kwargs = dict(r_driver=p.r_driver, r_integrator=p.r_integrator, extra_rows=extra,
                  tol=s.tol, max_iters=s.max_iters, batch_chunk=s.batch_chunk)
    kwargs.update(cpu_kernel=s.cpu_kernel)
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

    # Input-source arrays with read noise are rejected by `mvm`; `program`'s transfer matrices
    # are noise-free.
    noisy = config.device.read_noise.active and p.topology == "gated_source"
    if noisy and key is None:
        raise ValueError("read noise is on (device.read_noise): pass a PRNG key to matmul")

    def one_array(gt, v, g_neg, k):
        if noisy:
            return _noisy_reads(gt, v, k, config, extra, g_neg)
        y, info = solve(gt, v, p.r_row, p.r_col, g_neg=g_neg, **kwargs)
        ir.check_convergence(info, s.on_nonconvergence,
                             {"parasitics.r_row": p.r_row, "parasitics.r_col": p.r_col})
        return y, info

    def split(k, n):  # read keys of n arrays (placeholders without read noise)
        return jax.random.split(k, n) if noisy else jnp.zeros((n,), jnp.uint32)

    # vmap over column partitions of one (row partition, slice, polarity).
    def arrays(gp, v, k, gn=None):
        tp, ks = tile_columns(gp), split(k, pc)
        if gn is None:
            y, info = jax.vmap(lambda t, kc: one_array(t, v, None, kc), out_axes=(-2, 0))(tp, ks)
        else:
            y, info = jax.vmap(lambda a, b, kc: one_array(a, v, b, kc), out_axes=(-2, 0))(
                tp, tile_columns(gn), ks)
        return untile(y), info

    def stacked(outs, combine):
        ys, infos = zip(*outs, strict=True)
        return combine(ys), jax.tree_util.tree_map(lambda *a: jnp.stack(a), *infos)

    analog_diff = config.mapping.scheme == "differential" and config.mapping.subtract == "analog"

    def group(gs, v, k):  # one (row partition, slice): gs (rows, P, M), v (Bt, rows)
        if analog_diff and p.interleaved:
            y, info = arrays(gs[:, 0], v, k, gs[:, 1])
            return y[:, None], info
        ks = split(k, P)
        outs = [arrays(gs[:, q], v, ks[q]) for q in range(P)]
        if analog_diff:
            return stacked(outs, lambda ys: (ys[0] - ys[1])[:, None])
        return stacked(outs, lambda ys: jnp.stack(ys, axis=1))

    keys = split(key, pr * S).reshape(pr, S, *(() if not noisy else split(key, 1).shape[1:]))
    over_slices = jax.vmap(group, in_axes=(1, None, 0), out_axes=(1, 0))
    over_parts = jax.vmap(over_slices, in_axes=(0, 1, 0), out_axes=(1, 0))
    y, info = over_parts(g, u, keys)  # (Bt, pr, S, P', M)
    y = y.reshape(*lead, *y.shape[1:])
    return (y, info) if with_info else y
