"""Gradients of IR-drop solves by implicit differentiation: pairs of forward and adjoint solves.

The adjoint of the linear circuit is the same circuit driven by the output cotangents, solved
by the same sweeps; conductance sensitivities are products of forward and adjoint cell voltages,
resistance sensitivities products of forward and adjoint segment currents.
"""

from __future__ import annotations

import jax.numpy as jnp
from jax import lax

from jaxbar.core.ir.circuit import (
    chunk_circuit,
    chunking,
    per_vector_bytes,
    resistances,
    shared_circuit,
    split_chunks,
    to_layout,
)
from jaxbar.core.ir.convergence import make_info, warn_if_unconverged
from jaxbar.core.ir.sweeps import iterate


def pair_grads(topology, tol, max_iters, batch_chunk, lines, g_stack, x, I_bar, scalars,
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
    res = resistances(*scalars)
    n_chunks, chunk = chunking(
        B, 2 * per_vector_bytes(topology, K, N, P, dtype.itemsize), batch_chunk
    )
    shared = shared_circuit(topology, g_stack, res, lines)
    xs = split_chunks(x, n_chunks, chunk)
    bars = split_chunks(I_bar, n_chunks, chunk)
    gated = topology == "gated_source"

    def one(acc, inp):
        xc, barc = inp
        g_l, e_row, mask = to_layout(topology, g_stack, xc, signs)
        # Forward and adjoint solved as one batch of 2*chunk vectors of the same circuit: the
        # adjoint circuit is driven by -I_bar in every cell of each column.
        zeros = jnp.zeros_like(e_row)
        e_row2 = jnp.concatenate([e_row, zeros], axis=-1)
        e_col2 = jnp.concatenate(
            [jnp.zeros((1, N, 1, chunk), dtype), -barc.T[None, :, None, :]], axis=-1
        )
        mask2 = None if mask is None else jnp.concatenate([mask, mask], axis=-1)
        cir = chunk_circuit(topology, shared, g_l, mask2, res, lines)
        _, a, w, t, err = iterate(cir, e_row2, e_col2, tol, max_iters, lines, cells)
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
    warn_if_unconverged(make_info(t, err, tol, dtype), "adjoint (gradient) solve")
    g_bar = jnp.transpose(dg, (2, 0, 1))
    x_bar = dxs.reshape(n_chunks * chunk, K)[:B]
    r_bars = (d_ra, d_rb + (extra + 1.0) * d_rblast, d_rd, d_rblast)
    return g_bar, x_bar, r_bars
