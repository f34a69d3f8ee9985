"""Transfer matrices of input-source arrays (`I = v @ M.T`), by XLA sweeps or the CPU kernel.

Input-source circuits do not depend on the inputs. With at least `N` input vectors the solver
therefore computes the transfer matrix `M` from `N` adjoint solves (reciprocity: row j of `M`
is the set of driver currents when column j is driven) and applies it with one matrix product,
converging on the currents of the given vectors. Lowered for a CPU, a float32 transfer matrix is
computed by the numba kernel of `jaxbar.core.ir.cpu_kernel` (the same block Gauss-Seidel
iteration, fused into one pass over the rows per sweep, 16 adjoint circuits per SIMD vector),
which falls back to the XLA sweeps where Gauss-Seidel passes converge slowly.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax

from jaxbar.core.ir import cpu_kernel as ir_cpu
from jaxbar.core.ir.circuit import (
    HIGHEST,
    chunking,
    map_chunks,
    per_vector_bytes,
    shared_circuit,
)
from jaxbar.core.ir.convergence import (
    LINES_CODES,
    PATH_KERNEL,
    PATH_KERNEL_THEN_XLA,
    PATH_TRANSFER,
    make_info,
    safe_div,
)
from jaxbar.core.ir.sweeps import sweep_loop

# Input-source batches of at least this many vectors per column use the transfer matrix.
_TRANSFER_RATIO = 1


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
    ideal = jnp.einsum("knp,nc->kpc", g, e_col[0, :, 0, :], precision=HIGHEST)
    ideal_size = jnp.sum(jnp.abs(ideal), axis=(0, 1))

    def readout(r_state, a, w, J_a, J_b, lost, omega):
        # Two readings of the driver currents, as in iterate: the ideal ones minus the IR loss
        # of the fields after the whole sweep (accurate in float32 while the loss is small), or
        # the A-line solve's own (accurate also for rows attenuated 10^4 times, but half a sweep
        # behind: they predate the bit-line update; relaxed like the fields). Chosen per driven
        # column: single entries may have no ideal current (a zero cell) and lose nothing.
        J, Y = r_state
        loss = jnp.einsum("knp,knpc->kpc", g, a + w, precision=HIGHEST)
        small = jnp.sum(jnp.abs(loss), axis=(0, 1)) <= 0.5 * ideal_size
        J = jnp.where(small, ideal - loss, J + omega * (J_a - J))
        Y_new = jnp.matmul(x, _rows(J, signs).T, precision=HIGHEST)
        Y_scale = Y_new if not cells else jnp.matmul(x, _rows(J, jnp.abs(signs)).T,
                                                     precision=HIGHEST)
        scale = jnp.max(jnp.abs(Y_scale), axis=1, keepdims=True)
        d = jnp.max(safe_div(jnp.abs(Y_new - Y), scale), axis=0)
        return (J, Y_new), d

    init = (jnp.zeros((K, P, Nc), dtype), jnp.zeros((x.shape[0], Nc), dtype))
    (J, _), _, _, t, err = sweep_loop(
        cir, None, e_col, tol, max_iters, Nc, readout, init, False, lines, cols
    )
    return _rows(J, signs), t, err


def _rows(J, signs):
    """Transfer-matrix rows (Nc, K) from adjoint driver currents J (K, P, Nc)."""
    return -jnp.einsum("kpj,p->jk", J, signs, precision=HIGHEST)


def use_transfer(topology, B, N):
    """Whether B vectors are solved through the transfer matrix.

    Input-source circuits do not depend on the inputs: for many vectors it is cheaper to
    solve N adjoint circuits once (the transfer matrix) than B forward circuits. On
    1152 x 256 the break-even is B ~ 0.7-0.9 N; a transfer solve needs about one sweep more.
    """
    return topology == "input_source" and B >= _TRANSFER_RATIO * N


def transfer_batch(g_stack, x, res, tol, max_iters, batch_chunk, signs, lines, cells=False):
    """Transfer matrix M (N, K) of an input-source array (I = x @ M.T), chunked over columns."""
    P, K, N = g_stack.shape
    dtype = g_stack.dtype
    n_chunks, chunk = chunking(
        N, per_vector_bytes("input_source", K, N, P, dtype.itemsize), batch_chunk
    )
    shared = shared_circuit("input_source", g_stack, res, lines)
    cols = jnp.arange(n_chunks * chunk).reshape(n_chunks, chunk)

    def one(cols_c):
        # Adjoint drive of output column j: -1 in every cell of column j (padding: none).
        e_col = -(jnp.arange(N)[:, None] == cols_c[None, :]).astype(dtype)[None, :, None, :]
        M, t, err = _iterate_transfer(shared, e_col, cols_c, x, signs, tol, max_iters, lines,
                                      cells)
        return M, t, jnp.max(err)

    Ms, ts, errs = map_chunks(one, cols)
    M = Ms.reshape(n_chunks * chunk, K)[:N]
    return M, make_info(jnp.max(ts), jnp.max(errs), tol, dtype, PATH_TRANSFER, lines)


def uses_cpu_kernel(cpu_kernel, dtype):
    """Whether the numba kernel may compute float32 transfer matrices.

    It runs where the computation is lowered for a CPU (`lax.platform_dependent`).
    """
    return cpu_kernel and dtype == jnp.float32 and ir_cpu.available()


@functools.cache
def kernel_or_xla(tol, max_iters, batch_chunk, cells, lines):
    """Transfer matrix by the CPU kernel, falling back to the XLA solver (line form `lines`).

    Under vmap the fallback must stay a real branch (a batched `cond` would run both), so
    batches are mapped sequentially (the kernel runs one array at a time anyway).
    """

    @jax.custom_batching.custom_vmap
    def transfer(g_stack, x, *res):
        M, iterations, error, ok = ir_cpu.transfer(g_stack, x, res, tol, max_iters, cells)

        def xla(_):
            signs = jnp.asarray([1.0, -1.0][: g_stack.shape[0]], g_stack.dtype)
            M2, info = transfer_batch(g_stack, x, res, tol, max_iters, batch_chunk, signs,
                                      lines, cells)
            return M2, info.iterations, info.error, jnp.int32(PATH_KERNEL_THEN_XLA), info.lines

        kernel = (M, iterations, error, jnp.int32(PATH_KERNEL), jnp.int32(LINES_CODES[None]))
        return lax.cond(ok, lambda _: kernel, xla, None)

    @transfer.def_vmap
    def _rule(axis_size, in_batched, *args):
        args = [a if b else jnp.broadcast_to(a, (axis_size, *jnp.shape(a)))
                for a, b in zip(args, in_batched, strict=True)]
        return lax.map(lambda a: transfer(*a), tuple(args)), (True,) * 5

    return transfer
